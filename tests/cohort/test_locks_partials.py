"""Every writing command takes OUT's lock before it writes anything, and partial files are
removed only when their writer is dead — real processes, no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cohort.conftest import BIN, write_config
from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.harness.lock import OutputLockedError
from wsi_mil.harness.status import read_status
from wsi_mil.io.atomic import FOREIGN_PARTIAL_AGE_S, host_tag, is_orphan, partial_owner, remove_orphan_partials

HOLD = """
import sys, time
from wsi_mil.harness.lock import output_lock
with output_lock(sys.argv[1], "wsi-mil train"):
    print("held", flush=True)
    time.sleep(120)
"""

# A writer in the middle of an atomic write (e.g. a worker of an interrupted run still busy).
WRITE = """
import sys, time
from wsi_mil.io.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print(tmp, flush=True)
    time.sleep(120)
"""


def _start(code: str, arg: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", code, str(arg)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/out`` (with an empty texture feature folder) locked by another process."""
    out = tmp_path / "out"
    (out / "features" / "texture" / "h5_files").mkdir(parents=True)
    proc, line = _start(HOLD, out)
    assert line == "held"
    try:
        yield out
    finally:
        _stop(proc)


def _refused(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "in use by another run (wsi-mil train, pid" in r.stderr, r.stderr


def test_train_heatmap_predict_refuse_while_another_process_holds_the_lock(held: Path, cohort_dir: Path) -> None:
    labels, model = cohort_dir / "labels.csv", held / "models" / "r1"
    wsi = str(BIN / "wsi-mil")
    _refused(subprocess.run([wsi, "train", "--out", str(held), "--labels", str(labels), "--encoder", "texture"],
                            capture_output=True, text=True))  # fmt: skip
    _refused(subprocess.run([wsi, "heatmap", "--out", str(held), "--model", str(model), "--no-progress"],
                            capture_output=True, text=True))  # fmt: skip
    slide = str(cohort_dir / "slides" / "tum_00.tif")
    _refused(subprocess.run([wsi, "predict", slide, "--model", str(model), "--out", str(held), "--no-progress"],
                            capture_output=True, text=True))  # fmt: skip
    # The library entry points, for library users.
    from wsi_mil.mil import train_run
    from wsi_mil.predict import heatmap_cohort

    with pytest.raises(OutputLockedError, match="in use by another run"):
        train_run(held, labels, "texture")
    with pytest.raises(OutputLockedError, match="in use by another run"):
        heatmap_cohort(held, model)
    assert not (held / "models").exists() and not (held / "heatmaps").exists() and not read_status(held)


def test_no_config_file_is_written_when_the_lock_is_refused(held: Path, cohort_dir: Path) -> None:
    wsi = str(BIN / "wsi-mil")
    (held / "patches").mkdir()
    (held / "patches" / "tum_00.h5").write_bytes(b"")  # something to extract, were the lock free
    _refused(subprocess.run([wsi, "tile", str(cohort_dir / "slides"), "--out", str(held)],
                            capture_output=True, text=True))  # fmt: skip
    _refused(subprocess.run([wsi, "extract", "--out", str(held), "--encoder", "texture"],
                            capture_output=True, text=True))  # fmt: skip
    cfg = write_config(cohort_dir, held, stages="tile, extract")
    _refused(subprocess.run([wsi, "run", str(cfg), "--scheduler", "sequential", "--no-progress"],
                            capture_output=True, text=True))  # fmt: skip
    written = {p.name for p in held.rglob("*.yaml")}
    assert not written & {"tile_config.yaml", "extract_config.yaml", "run_config.yaml"}, written


def test_a_live_writers_partial_survives_run_and_tile_a_dead_ones_goes(cohort_dir: Path, tmp_path: Path) -> None:
    from wsi_mil.tiling.cohort import tile_cohort

    out = tmp_path / "out"
    slide = cohort_dir / "slides" / "tum_00.tif"
    writer, name = _start(WRITE, out / "models" / "other" / "fold_0.safetensors")
    partial = Path(name)
    try:
        assert partial.is_file() and partial_owner(partial) == (writer.pid, host_tag())
        cfg = write_config(cohort_dir, out, stages="tile")
        cfg.write_text(cfg.read_text().replace(str(cohort_dir / "slides"), str(slide)))
        assert run_cohort(load_cohort_config(cfg), scheduler="sequential", progress=False).ok
        assert partial.is_file(), "wsi-mil run removed a live process's partial"
        tile_cohort([slide], out, progress=False, overwrite=True)
        assert partial.is_file(), "tile removed a live process's partial"
    finally:
        _stop(writer)  # SIGKILL: no chance to clean up after itself
    assert partial.is_file() and is_orphan(partial)
    tile_cohort([slide], out, progress=False)
    assert not partial.exists()


def test_a_killed_extracts_partial_is_removed_by_the_next_extract(reference: Path, tmp_path: Path) -> None:
    import shutil

    from wsi_mil.features.cohort import extract_cohort

    out = tmp_path / "out"
    shutil.copytree(reference / "patches", out / "patches")
    writer, name = _start(WRITE, out / "features" / "texture" / "h5_files" / "tum_00.h5")
    _stop(writer)
    assert Path(name).is_file()
    s = extract_cohort(out, "texture", slide_ids=["tum_00"], overrides={"workers": 0}, progress=False)
    assert s.done == ["tum_00"] and not Path(name).exists()
    assert not list(out.rglob("*.partial"))


def test_partials_of_other_hosts_and_of_older_versions_wait_a_day(tmp_path: Path) -> None:
    old, fresh = time.time() - FOREIGN_PARTIAL_AGE_S - 60, time.time()
    files = {
        "foreign_old": (tmp_path / ".a~123@some-other-node~x1.h5.partial", old),
        "foreign_new": (tmp_path / "sub" / ".b~123@some-other-node~x2.h5.partial", fresh),
        "unnamed_old": (tmp_path / ".c.k3j4.h5.partial", old),
        "unnamed_new": (tmp_path / ".d.k3j5.h5.partial", fresh),
        "mine": (tmp_path / f".e~{os.getpid()}@{host_tag()}~x3.h5.partial", fresh),
        # this pid, but written before this process started: a dead run's with the same pid
        "my_pid_before_me": (tmp_path / f".g~{os.getpid()}@{host_tag()}~x5.h5.partial", old),
        # pid 1 lives, but started after this partial was last written: a reused pid.
        "reused_pid": (tmp_path / f".f~1@{host_tag()}~x4.h5.partial", 1_000.0),
    }
    for path, mtime in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (mtime, mtime))
    zarr = tmp_path / "h.zarr" / ".never~1@x~y.partial"  # inside a finished zarr store: not looked at
    zarr.parent.mkdir()
    zarr.write_text("x")
    os.utime(zarr, (old, old))
    assert remove_orphan_partials(tmp_path) == 4
    left = {k for k, (p, _) in files.items() if p.exists()}
    assert left == {"foreign_new", "unnamed_new", "mine"} and zarr.exists()
