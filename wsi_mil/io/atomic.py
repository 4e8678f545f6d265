"""Atomic file creation: outputs appear under their final name only once complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    The temporary name starts with a dot and ends in ``.partial`` so that nothing that
    looks for finished outputs (``*.h5``) ever sees it. On any exception the temporary
    file is removed and ``final`` is left untouched.

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
        prefix=f".{final.stem}.", suffix=f"{final.suffix}.partial", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs are shared with colleagues and viewers: honour the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if tmp.is_dir():
                import shutil

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
