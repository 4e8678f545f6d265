"""One writer per output folder: an exclusive ``flock`` on ``OUT/.wsi-mil.lock``.

Every command that writes under OUT holds it for its whole duration — ``tile``,
``extract``, ``train``, ``heatmap``, ``predict`` and ``run`` — taken by their library
entry points (:func:`locks_output`), so library users get it too. A second writer on
the same folder is refused at once with a message naming the holder. The kernel drops
the lock when its holder dies, however it dies, so a killed run never leaves a stale lock.
The lock is re-entrant within a process (``run`` calling ``tile_cohort``). Dask workers
do not take it: they write on behalf of the run that holds it (:func:`delegated`).

Taking the lock (outermost) imports an older ``status.csv`` into the status store and
removes partial files whose writer is dead; releasing it writes ``status.csv`` again when
this process recorded anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from wsi_mil.errors import WsiMilError
from wsi_mil.io.layout import LOCK as LOCK_NAME

# Folders this process already holds (or writes on behalf of): nested calls re-enter.
_held: dict[Path, int] = {}
_held_guard = threading.RLock()

F = TypeVar("F", bound=Callable[..., Any])


class OutputLockedError(WsiMilError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str], command: str = "wsi-mil", *, clean: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of ``out`` for the duration of the ``with`` block.

    Parameters
    ----------
    out : path-like
        Cohort output folder (created if missing).
    command : str
        What is running, written into the lock file for the refusal message.
    clean : bool
        On taking the lock, remove partial files whose writer is dead
        (:func:`~wsi_mil.io.atomic.remove_orphan_partials`).

    Raises
    ------
    OutputLockedError
        Another process holds the lock.

    Examples
    --------
    >>> with output_lock("out", "wsi-mil run"):  # doctest: +SKIP
    ...     ...
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        nested = out in _held
        if nested:  # this process already holds it
            _held[out] += 1
    if nested:
        try:
            yield out / LOCK_NAME
        finally:
            _release(out)
        return
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(f"{out}: in use by another run ({_describe(fd)}); wait for it to finish") from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _held_guard:
            _held[out] = 1
        try:
            _on_acquire(out, clean)
            yield path
        finally:
            try:
                _on_release(out)
            finally:
                with _held_guard:
                    del _held[out]
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _release(out: Path) -> None:
    with _held_guard:
        _held[out] -= 1
        if not _held[out]:
            del _held[out]


def _on_acquire(out: Path, clean: bool) -> None:
    from wsi_mil.harness import status
    from wsi_mil.io.atomic import remove_orphan_partials

    status.ensure_store(out)  # an older OUT's status.csv, before anyone records
    if clean:
        remove_orphan_partials(out)


def _on_release(out: Path) -> None:
    from wsi_mil.harness import status

    if status.recorded_here(out):
        status.export_status(out)


def holds(out: str | os.PathLike[str]) -> bool:
    """True when this process holds (or writes on behalf of the holder of) ``out``'s lock."""
    with _held_guard:
        return Path(out).resolve() in _held


@contextlib.contextmanager
def delegated(out: str | os.PathLike[str]) -> Iterator[None]:
    """Write under ``out`` on behalf of the process holding its lock (a Dask worker's task).

    Library calls inside the block that take :func:`output_lock` re-enter instead of
    being refused by the run that sent the task.

    Examples
    --------
    >>> with delegated(out):  # doctest: +SKIP
    ...     train_run(out, labels, "texture", cfg)
    """
    key = Path(out).resolve()
    with _held_guard:
        _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        _release(key)


def locks_output(command: str, param: str = "out", *, create: bool = True) -> Callable[[F], F]:
    """Decorate a library entry point so that it runs holding the lock of its output folder.

    Parameters
    ----------
    command : str
        Named in the refusal message of a concurrent writer (``"wsi-mil train"``).
    param : str
        The decorated function's parameter that holds the output folder.
    create : bool
        Create a missing folder and lock it; False: a missing folder is not locked (the
        function fails on its own, no stray folder is left behind).

    Examples
    --------
    >>> @locks_output("wsi-mil heatmap")  # doctest: +SKIP
    ... def heatmap_cohort(out, run_dir): ...
    """

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            out = sig.bind_partial(*args, **kwargs).arguments.get(param)
            if out is None or (not create and not Path(out).is_dir()):
                return fn(*args, **kwargs)
            with output_lock(out, command):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    who = f"{info.get('command', '?')}, pid {info.get('pid', '?')} on {info.get('host', '?')}"
    return f"{who} since {info.get('since', '?')}"
