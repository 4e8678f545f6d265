"""Per slide and stage: state, reason, counts, timings — one small file each, ``status.csv`` for reading.

The store is ``OUT/.status/<stage>/<slide id>.json``: recording a (slide, stage) writes
that one file (temp name + rename), and a task's resume gate reads that one file, so the
cost of a record does not grow with the cohort. Every (slide, stage) has one writer at a
time — the task that owns it — so no lock is needed, between Dask worker processes of one
host or of many (rename is atomic on local and network file systems alike).

``OUT/status.csv`` stays the readable table: :func:`export_status` writes it from the
store at the end of each command (and every few minutes during ``wsi-mil run``). An OUT
from an older version, with only ``status.csv``, is imported into the store on first use.
docs/cohort.md gives the measurements behind this choice (against SQLite in WAL mode).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from wsi_mil.io.atomic import host_tag, write_text_atomic
from wsi_mil.io.layout import STATUS_CSV as CSV_NAME
from wsi_mil.io.layout import STATUS_STORE as STORE_DIR

COLUMNS = ("slide_id", "stage", "state", "reason", "n_patches", "seconds", "detail", "worker", "updated")
STATES = ("done", "empty", "failed", "skipped")

_counter = itertools.count()
_ready: set[str] = set()  # stage folders known to exist, per process
_dirty: set[Path] = set()  # OUT folders this process recorded into since their last export
_guard = threading.Lock()


def _worker_name() -> str:
    """Name of the Dask worker running this code, or "" outside one (where a slide ran)."""
    distributed = sys.modules.get("distributed")  # never import Dask just to ask
    if distributed is None:
        return ""
    try:
        return str(distributed.get_worker().name)
    except ValueError:
        return ""


def _resolved(out: str | os.PathLike[str]) -> Path:
    """``out`` resolved; absolute paths once per process (resolving walks every component)."""
    return _resolved_abs(os.fspath(out)) if os.path.isabs(out) else Path(out).resolve()


@functools.lru_cache(maxsize=64)
def _resolved_abs(out: str) -> Path:
    return Path(out).resolve()


def _file_name(key: str) -> str:
    """A file name for a slide id or stage: readable, unique, never hidden, never too long."""
    name = quote(key, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 180:  # file systems stop at 255 bytes
        name = f"{name[:120]}-{hashlib.sha1(key.encode()).hexdigest()}"
    return name


def state_path(out: str | os.PathLike[str], slide_id: str, stage: str) -> Path:
    """Where the row of (``slide_id``, ``stage``) lives in the store."""
    return Path(out) / STORE_DIR / _file_name(stage) / f"{_file_name(slide_id)}.json"


def ensure_store(out: str | os.PathLike[str]) -> Path:
    """The store folder of ``out``; an older ``status.csv`` without a store is imported first.

    Safe when several processes race: each imports into its own folder and one rename wins.
    """
    store = Path(out) / STORE_DIR
    if store.is_dir():
        return store
    legacy = Path(out) / CSV_NAME
    if not legacy.is_file():
        store.mkdir(parents=True, exist_ok=True)
        return store
    tmp = Path(out) / f".status~{os.getpid()}@{host_tag()}~import.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for row in _read_csv(legacy):
        if row.get("slide_id") is None or not row.get("stage"):
            continue
        row = {c: row.get(c) or "" for c in COLUMNS}
        dest = tmp / _file_name(row["stage"]) / f"{_file_name(row['slide_id'])}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(row), encoding="utf-8")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, store)
    except OSError:  # another process imported (or recorded) first: use its store
        shutil.rmtree(tmp, ignore_errors=True)
    return store


def record(
    out: str | os.PathLike[str],
    slide_id: str,
    stage: str,
    state: str,
    *,
    reason: str = "",
    n_patches: int | None = None,
    seconds: float | None = None,
    detail: str = "",
) -> None:
    """Insert or replace the row of (``slide_id``, ``stage``); constant cost whatever the cohort size.

    Parameters
    ----------
    out : path-like
        Cohort folder.
    slide_id, stage : str
        The row's key (``"*"`` for cohort-level stages such as ``train``).
    state : str
        One of :data:`STATES`.
    reason, detail : str
        One-line cause of a failure; free text (timings, throughput).
    n_patches : int, optional
        Patches tiled / encoded / diagnosed.
    seconds : float, optional
        Wall time of the work.

    Examples
    --------
    >>> record("out", "slide-1", "tile", "done", n_patches=120, seconds=1.5)  # doctest: +SKIP
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    row = {
        "slide_id": slide_id, "stage": stage, "state": state,
        "reason": " ".join(reason.split()), "n_patches": "" if n_patches is None else str(n_patches),
        "seconds": "" if seconds is None else f"{seconds:.3f}", "detail": detail, "worker": _worker_name(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    path = state_path(out, slide_id, stage)
    folder = str(path.parent)
    if folder not in _ready:
        ensure_store(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        _ready.add(folder)
    # The temporary name carries pid and host, like atomic_path's, so a killed writer's is cleaned.
    tmp = path.parent / f".{path.name}~{os.getpid()}@{host_tag()}~{threading.get_ident()}-{next(_counter)}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, as outputs
    except FileNotFoundError:  # the store was removed under us (a fresh OUT): make it again
        _ready.discard(folder)
        ensure_store(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        _ready.add(folder)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.write(fd, json.dumps(row).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with _guard:
        _dirty.add(_resolved(out))


def get(out: str | os.PathLike[str], slide_id: str, stage: str) -> dict[str, str] | None:
    """The row of (``slide_id``, ``stage``), or None; reads one small file.

    Examples
    --------
    >>> get("out", "slide-1", "tile")["state"]  # doctest: +SKIP
    'done'
    """
    path = state_path(out, slide_id, stage)
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    if not (Path(out) / STORE_DIR).is_dir() and (Path(out) / CSV_NAME).is_file():
        ensure_store(out)  # an older OUT: import its status.csv, then look again
        with contextlib.suppress(FileNotFoundError):
            return _load(path)
    return None


def _load(path: Path) -> dict[str, str] | None:
    try:
        row = json.loads(path.read_bytes())
    except ValueError:  # not ours (a hand-made file): as if absent
        return None
    return {c: str(row.get(c, "")) for c in COLUMNS}


def _rows(store: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for stage_dir in os.scandir(store):
        if not stage_dir.is_dir() or stage_dir.name.startswith("."):
            continue
        for entry in os.scandir(stage_dir.path):
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue  # partials of writes in progress
            with contextlib.suppress(FileNotFoundError):
                row = _load(Path(entry.path))
                if row is not None:
                    rows.append(row)
    rows.sort(key=lambda r: (r["stage"], r["slide_id"]))
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_status(out: str | os.PathLike[str]) -> list[dict[str, str]]:
    """All rows, sorted by stage then slide id (empty if none yet); the same as ``status.csv``.

    Reads the store when there is one (always current, even during a run), else an older
    ``status.csv``.

    Examples
    --------
    >>> [r["state"] for r in read_status("out") if r["stage"] == "extract"]  # doctest: +SKIP
    ['done', 'done', 'failed']
    """
    store = Path(out) / STORE_DIR
    if store.is_dir():
        return _rows(store)
    legacy = Path(out) / CSV_NAME
    return _read_csv(legacy) if legacy.is_file() else []


def export_status(out: str | os.PathLike[str]) -> Path | None:
    """Write ``OUT/status.csv`` (atomically) from the store; None when there is no store.

    Examples
    --------
    >>> export_status("out")  # doctest: +SKIP
    PosixPath('out/status.csv')
    """
    store = Path(out) / STORE_DIR
    if not store.is_dir():
        return None
    with _guard:
        _dirty.discard(_resolved(out))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(_rows(store))
    path = Path(out) / CSV_NAME
    write_text_atomic(path, buf.getvalue())
    return path


def recorded_here(out: str | os.PathLike[str]) -> bool:
    """True when this process recorded into ``out`` since its last export."""
    return _resolved(out) in _dirty
