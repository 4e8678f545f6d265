"""The status store: constant cost per record, status.csv exported, older status.csv imported."""

from __future__ import annotations

import csv
import multiprocessing
import time
from pathlib import Path

from wsi_mil.harness import status
from wsi_mil.harness.lock import output_lock
from wsi_mil.harness.status import export_status, read_status, record


def _record_many(out: str, lo: int, hi: int) -> None:
    for i in range(lo, hi):
        record(out, f"s{i:05d}", "tile", "done", n_patches=i, seconds=0.1)


def _rate(out: Path, lo: int, hi: int) -> float:
    t = time.perf_counter()
    _record_many(str(out), lo, hi)
    return (time.perf_counter() - t) / (hi - lo)


def test_cost_per_record_does_not_grow_with_the_cohort(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _rate(out, 0, 400)  # into an empty store
    _record_many(str(out), 400, 8_000)
    later = min(_rate(out, 8_000 + k * 400, 8_400 + k * 400) for k in range(3))  # into 8,000 rows
    assert later < 2.5 * first + 2e-4, (first, later)  # the old CSV rewrite: ~40× slower by now
    # A gate reads one row, whatever the cohort.
    t = time.perf_counter()
    for i in range(0, 8_000, 40):
        assert status.get(out, f"s{i:05d}", "tile")["n_patches"] == str(i)  # type: ignore[index]
    assert (time.perf_counter() - t) / 200 < 5e-3
    assert status.get(out, "nope", "tile") is None


def test_export_matches_read_status_and_the_old_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    record(out, "b", "tile", "done", n_patches=3, seconds=1.23456, detail="mpp=0.5")
    record(out, "a", "tile", "failed", reason="cannot\n open  it")
    record(out, "a", "extract", "empty", reason="no patches")
    record(out, "*", "train", "done", detail="models/r1")
    record(out, "a", "tile", "done", n_patches=7)  # replaces its row
    rows = read_status(out)
    assert [(r["stage"], r["slide_id"], r["state"]) for r in rows] == [
        ("extract", "a", "empty"),
        ("tile", "a", "done"),
        ("tile", "b", "done"),
        ("train", "*", "done"),
    ]
    assert rows[2]["seconds"] == "1.235" and rows[2]["detail"] == "mpp=0.5"
    path = export_status(out)
    assert path == out / "status.csv"
    with path.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert table == rows
    assert list(table[0]) == list(status.COLUMNS)


def test_an_older_status_csv_is_imported(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    header = ",".join(status.COLUMNS)
    (out / "status.csv").write_text(
        f"{header}\n"
        "old_1,extract,done,,12,3.000,,w0,2025-01-01T00:00:00\n"
        "old_2,tile,failed,cannot open,,0.100,,,2025-01-01T00:00:00\n"
    )
    assert [r["slide_id"] for r in read_status(out)] == ["old_1", "old_2"]  # read as it is before any write
    assert status.get(out, "old_2", "tile")["reason"] == "cannot open"  # type: ignore[index]
    record(out, "new", "tile", "done", n_patches=1)
    with output_lock(out):  # a command: the table is written again when it ends
        record(out, "old_2", "tile", "done", n_patches=4)
    with (out / "status.csv").open(newline="") as fh:
        table = {(r["slide_id"], r["stage"]): r for r in csv.DictReader(fh)}
    assert set(table) == {("old_1", "extract"), ("old_2", "tile"), ("new", "tile")}
    assert table[("old_1", "extract")]["worker"] == "w0" and table[("old_2", "tile")]["n_patches"] == "4"


def test_processes_record_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    record(out, "parent", "tile", "done")  # caches of this process are inherited by the children
    procs = [ctx.Process(target=_record_many, args=(str(out), k * 300, (k + 1) * 300)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = read_status(out)
    assert len(rows) == 901 and len({(r["slide_id"], r["stage"]) for r in rows}) == 901
    assert not list((out / status.STORE_DIR).rglob("*.partial"))


def test_odd_slide_ids(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ids = ["a b", ".hidden", "x/y", "é€", "A" * 300, "%2E"]
    for sid in ids:
        record(out, sid, "tile", "done")
    assert sorted(r["slide_id"] for r in read_status(out)) == sorted(ids)
    assert all(status.get(out, sid, "tile") is not None for sid in ids)
