"""``OUT/status.csv``: one row per slide and stage — state, reason, counts, timings.

Updates take an exclusive lock on ``status.csv.lock`` and rewrite the table atomically,
so several processes (Dask workers) can record results side by side.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from wsi_mil.io.atomic import write_text_atomic

COLUMNS = ("slide_id", "stage", "state", "reason", "n_patches", "seconds", "detail", "worker", "updated")
STATES = ("done", "empty", "failed", "skipped")


def _worker_name() -> str:
    """Name of the Dask worker running this code, or "" outside one (where a slide ran)."""
    distributed = sys.modules.get("distributed")  # never import Dask just to ask
    if distributed is None:
        return ""
    try:
        return str(distributed.get_worker().name)
    except ValueError:
        return ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_status(out_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """All rows of ``OUT/status.csv`` (empty if none yet)."""
    path = Path(out_dir) / "status.csv"
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def record(out_dir: str | os.PathLike[str], slide_id: str, stage: str, state: str, *,
           reason: str = "", n_patches: int | None = None, seconds: float | None = None,
           detail: str = "") -> None:
    """Insert or replace the row of (``slide_id``, ``stage``)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    path = Path(out_dir) / "status.csv"
    with _locked(path):
        rows = [r for r in read_status(out_dir) if (r["slide_id"], r["stage"]) != (slide_id, stage)]
        rows.append({
            "slide_id": slide_id, "stage": stage, "state": state,
            "reason": " ".join(reason.split()), "n_patches": "" if n_patches is None else str(n_patches),
            "seconds": "" if seconds is None else f"{seconds:.3f}", "detail": detail, "worker": _worker_name(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        rows.sort(key=lambda r: (r["stage"], r["slide_id"]))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, buf.getvalue())
