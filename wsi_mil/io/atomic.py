"""Atomic file creation: outputs appear under their final name only once complete.

A temporary file carries its owner in its name — ``.<stem>~<pid>@<host>~<random><suffix>.partial``
— so that a cleaner can tell a partial still being written (its process is alive) from one
left by a killed writer (same host, process gone), and never deletes another process's work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

#: A partial whose owner runs on another host is removed only once this old (seconds):
#: its process cannot be checked from here, and no single write takes a day.
FOREIGN_PARTIAL_AGE_S = 24 * 3600.0

#: When this module was loaded in this process: every partial this process names (here and in
#: the status store, which imports this module) is created later, and a partial written
#: before it under this process's pid is a dead predecessor's with the same pid.
_LOADED = time.time()
#: File times come from the kernel's coarse clock, up to a tick behind ``time.time()``.
_CLOCK_SLACK_S = 0.02

_OWNER = re.compile(r"~(\d+)@([A-Za-z0-9-]*)~[^~]*\.partial$")
_umask_lock = threading.Lock()


@functools.cache
def host_tag() -> str:
    """This host's name as written into partial names (letters, digits and ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:63]


def _umask() -> int:
    """The process umask, read without changing it where the kernel allows (Linux ≥ 4.7)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:  # os.umask can only be read by setting it: keep other threads out
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    The temporary name starts with a dot and ends in ``.partial`` so that nothing that
    looks for finished outputs (``*.h5``) ever sees it; it names this process and host
    (see :func:`partial_owner`). On any exception the temporary file is removed and
    ``final`` is left untouched.

    Parameters
    ----------
    final : path-like
        Where the complete file must end up.

    Examples
    --------
    >>> with atomic_path(tmp_path / "a.txt") as p:  # doctest: +SKIP
    ...     p.write_text("done")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.stem}~{os.getpid()}@{host_tag()}~", suffix=f"{final.suffix}.partial", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs are shared with colleagues and viewers: honour the umask.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


def write_text_atomic(final: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``final`` atomically (temp file + rename)."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (temp file + rename)."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------- partials


def partial_owner(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """``(pid, host)`` encoded in a partial's name by :func:`atomic_path`, or None (older name)."""
    m = _OWNER.search(Path(path).name)
    return (int(m.group(1)), m.group(2)) if m else None


def _started_after(pid: int, when: float) -> bool:
    """True when process ``pid`` started after ``when`` (so it reused a dead writer's pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
    except (OSError, ValueError, IndexError, StopIteration):
        return False  # cannot tell: assume the owner lives
    return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:  # a killed process not yet reaped by its parent (a zombie) writes nothing more
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def is_orphan(
    path: str | os.PathLike[str], *, max_age: float = FOREIGN_PARTIAL_AGE_S, now: float | None = None
) -> bool:
    """True when a partial's writer is gone, so removing it cannot hurt anyone.

    Own host: the owner pid is not running (or was reused by a process started after the
    partial was last written — this process included, as when each run of a container is
    pid 1). Another host, or a name without an owner (older versions):
    the partial was last modified more than ``max_age`` seconds ago.

    Parameters
    ----------
    path : path-like
        A ``.*.partial`` file or folder.
    max_age : float
        Age after which a partial whose owner cannot be checked counts as abandoned.
    now : float, optional
        Current time (``time.time()``).

    Examples
    --------
    >>> is_orphan("out/patches/.a~999999@thishost~x1y2.h5.partial")  # doctest: +SKIP
    True
    """
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    owner = partial_owner(path)
    if owner is not None and owner[1] == host_tag():
        pid = owner[0]
        if pid == os.getpid():
            # This process's own write in progress — unless the partial is older than this
            # process: a killed run that had the same pid (a container starts every run as
            # the same pid, often 1), whose partial would otherwise never be removed.
            return mtime < _LOADED - _CLOCK_SLACK_S
        return not _alive(pid) or _started_after(pid, mtime)
    return (time.time() if now is None else now) - mtime > max_age


def remove_orphan_partials(root: str | os.PathLike[str], *, max_age: float = FOREIGN_PARTIAL_AGE_S) -> int:
    """Remove every ``.*.partial`` under ``root`` whose writer is gone (see :func:`is_orphan`).

    Partials of live writers — a concurrent ``train``, another worker — are left alone,
    so this is safe to call from any process at any time.

    Parameters
    ----------
    root : path-like
        Folder searched recursively (usually OUT).
    max_age : float
        Passed to :func:`is_orphan`.

    Returns
    -------
    int
        How many were removed.

    Examples
    --------
    >>> remove_orphan_partials("out")  # doctest: +SKIP
    0
    """
    n = 0
    for p in _partials(Path(root)):
        if not is_orphan(p, max_age=max_age):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove: leave it
    return n


def _partials(root: Path) -> Iterator[Path]:
    """``.*.partial`` entries under ``root``, not looking inside them nor inside ``*.zarr`` stores
    (a finished OME-Zarr holds thousands of chunk files and never a partial)."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(".partial"):
            yield Path(e.path)
        elif e.is_dir(follow_symlinks=False) and not e.name.endswith(".zarr"):
            yield from _partials(Path(e.path))
