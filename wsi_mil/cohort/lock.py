"""One run per output folder: an exclusive ``flock`` on ``OUT/.wsi-mil.lock``.

The lock is held by the process that drives the run (the Dask client, or the process
running ``wsi-mil tile`` / ``extract``), for the whole run. A second run on the same
folder is refused at once with a message naming the holder. The kernel drops the lock
when its holder dies, however it dies, so a killed run never leaves a stale lock.
Workers do not take it: they write only through the run that holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from wsi_mil.errors import WsiMilError

LOCK_NAME = ".wsi-mil.lock"

# Folders this process already holds: nested runs (run_cohort calling tile_cohort) re-enter.
_held: dict[Path, int] = {}


class OutputLockedError(WsiMilError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str], command: str = "wsi-mil") -> Iterator[Path]:
    """Hold the exclusive lock of ``out`` for the duration of the ``with`` block.

    Parameters
    ----------
    out : path-like
        Cohort output folder (created if missing).
    command : str
        What is running, written into the lock file for the refusal message.

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
    if out in _held:  # this process already holds it
        _held[out] += 1
        try:
            yield out / LOCK_NAME
        finally:
            _held[out] -= 1
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
        _held[out] = 1
        try:
            yield path
        finally:
            del _held[out]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    who = f"{info.get('command', '?')}, pid {info.get('pid', '?')} on {info.get('host', '?')}"
    return f"{who} since {info.get('since', '?')}"
