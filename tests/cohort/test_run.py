"""``wsi-mil run`` on a real Dask cluster (separate processes): same outputs as a sequential
run, and a worker killed mid-run loses or duplicates nothing once the command is re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tests.cohort.conftest import BIN, N_SLIDES, Cluster, start_cluster, write_config
from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.features.extract import bag_path, is_extracted
from wsi_mil.harness.status import read_status
from wsi_mil.io import h5


def states(out: Path, stages: tuple[str, ...] = ("tile", "extract")) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r["slide_id"], r["stage"]): (r["state"], r["n_patches"]) for r in read_status(out) if r["stage"] in stages}


def assert_same_outputs(out: Path, ref: Path) -> None:
    ids = sorted(p.stem for p in (ref / "patches").glob("*.h5"))
    assert sorted(p.stem for p in (out / "patches").glob("*.h5")) == ids
    for sid in ids:
        a, b = h5.read_patches(out / "patches" / f"{sid}.h5"), h5.read_patches(ref / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        x, y = h5.read_bag(bag_path(out, "texture", sid)), h5.read_bag(bag_path(ref, "texture", sid))
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_allclose(x.features, y.features, rtol=1e-6, atol=1e-6)
    assert states(out) == states(ref)


def assert_no_partials(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_dask_matches_sequential(cohort_dir: Path, reference: Path, cluster: Cluster, tmp_path: Path) -> None:
    cfg = load_cohort_config(write_config(cohort_dir, tmp_path / "out"))
    lines: list[str] = []
    summary = run_cohort(cfg, scheduler=cluster.address, echo=lines.append, progress=False)
    assert summary.ok, lines
    for stage in ("tile", "extract", "heatmap"):
        assert summary.stages[stage].counts["done"] == N_SLIDES
    assert summary.stages["train"].counts["done"] == 1
    assert_same_outputs(tmp_path / "out", reference)
    rows = read_status(tmp_path / "out")
    assert Counter((r["slide_id"], r["stage"]) for r in rows).most_common(1)[0][1] == 1
    assert {r["state"] for r in rows} == {"done"}
    index = (tmp_path / "out" / "heatmaps" / "r1" / "index.csv").read_text().splitlines()
    assert len(index) == N_SLIDES + 1 and all(",ok," in line for line in index[1:])
    assert_no_partials(tmp_path / "out")

    # Re-running the same command does nothing but report.
    again = run_cohort(cfg, scheduler=cluster.address, echo=lines.append, progress=False)
    assert again.ok
    for report in again.stages.values():
        assert report.counts["skipped"] == sum(report.counts.values())
    assert read_status(tmp_path / "out") == rows


def test_killed_worker_then_rerun(cohort_dir: Path, reference: Path, tmp_path: Path) -> None:
    from distributed import Client

    cluster = start_cluster(tmp_path / "dask")
    out = tmp_path / "out"
    cfg = write_config(cohort_dir, out, stages="tile, extract")
    cmd = [str(BIN / "wsi-mil"), "run", str(cfg), "--scheduler", cluster.address, "--no-progress"]
    try:
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs = {f"w{i}": p for i, p in enumerate(cluster.workers)}  # --name of each worker
        killed = None
        with Client(cluster.address, timeout="30s") as client:
            deadline = time.monotonic() + 90
            while killed is None and time.monotonic() < deadline and run.poll() is None:
                info = client.scheduler_info()["workers"]
                for addr, keys in client.processing().items():
                    name = str(info.get(addr, {}).get("name"))
                    if any(str(k).startswith("extract-") for k in keys) and name in procs:
                        killed = procs[name].pid
                        os.kill(killed, signal.SIGKILL)  # mid-task, no chance to clean up
                        break
                time.sleep(0.02)
        first, _ = run.communicate(timeout=180)
        assert killed is not None, f"no extract task seen running:\n{first}"
        # Re-run the same command on the surviving worker: it completes the cohort.
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, first + second.stdout + second.stderr
    finally:
        cluster.stop()
    rows = read_status(out)
    ids = {sid for sid, _ in states(reference)}
    assert Counter((r["slide_id"], r["stage"]) for r in rows) == {(s, st): 1 for s in ids for st in ("tile", "extract")}
    assert {r["state"] for r in rows} == {"done"}
    for sid in {r["slide_id"] for r in rows}:
        n = len(h5.read_patches(out / "patches" / f"{sid}.h5").coords)
        assert is_extracted(bag_path(out, "texture", sid), None, n)
    assert_same_outputs(out, reference)
    assert_no_partials(out)


def test_gpu_stage_goes_to_the_gpu_worker(cohort_dir: Path, reference: Path, tmp_path: Path) -> None:
    """Extraction (device auto) runs only on the worker declaring GPU=1; tiling anywhere."""
    cluster = start_cluster(tmp_path / "dask", gpu=(1,))
    out = tmp_path / "out"
    try:
        cfg = load_cohort_config(write_config(cohort_dir, out, stages="tile, extract"))
        assert cfg.extract.device == "auto"
        lines: list[str] = []
        assert run_cohort(cfg, scheduler=cluster.address, echo=lines.append, progress=False).ok, lines
    finally:
        cluster.stop()
    rows = read_status(out)
    assert {r["worker"] for r in rows if r["stage"] == "extract"} == {"w1"}
    assert {r["worker"] for r in rows if r["stage"] == "tile"} <= {"w0", "w1"}
    assert_same_outputs(out, reference)
