"""``wsi-mil run`` over many slides on a real Dask cluster while worker processes are SIGKILLed:
one run accounts for every slide exactly once in status.csv and writes what a clean run writes.

The fast test kills one worker of 30 slides; the slow one (issue 13) kills a worker every
minute over 1,000 slides, a fresh worker joining after each kill.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.cohort.conftest import BIN, start_cluster
from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.features.extract import bag_path
from wsi_mil.io import h5
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

STAGES = ("tile", "extract")


def make_cohort(root: Path, n: int) -> Path:
    """``n`` slides of 768 × 768 (about 3 patches each) in ``root/slides``; returns ``root``."""
    (root / "slides").mkdir(parents=True)
    for i in range(n):
        spec = SyntheticSpec(width=768, height=768, tumour=i % 2 == 0, n_tissue=1, tissue_scale=0.7, seed=1000 + i)
        write_synthetic_slide(root / "slides" / f"s{i:04d}.tif", spec)
    return root


def cohort_config(root: Path, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(
        f"slides: {root / 'slides'}\nout: {out}\nstages: [tile, extract]\n"
        "extract: {encoder: texture, batch_size: 8, workers: 0}\n"
    )
    return path


def status_csv(out: Path) -> list[dict[str, str]]:
    with (out / "status.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_with_kills(root: Path, tmp: Path, n: int, every: float | None, timeout: float) -> tuple[Path, int]:
    """Run the cohort through ``wsi-mil run`` on 2 workers, SIGKILLing a busy worker once a
    quarter of the slides are extracted (``every=None``) or every ``every`` seconds; a new
    worker joins after each kill. Returns OUT and the number of kills."""
    from distributed import Client

    cluster = start_cluster(tmp / "dask", n_workers=2)
    out = tmp / "out"
    cmd = [str(BIN / "wsi-mil"), "run", str(cohort_config(root, out)), "--scheduler", cluster.address, "--no-progress"]
    procs = {f"w{i}": p for i, p in enumerate(cluster.workers)}
    kills = 0
    try:
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        next_kill = time.monotonic() + every if every else None
        with Client(cluster.address, timeout="30s") as client:
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
                if every is None:
                    if kills or len(list((out / ".status" / "extract").glob("*.json"))) < n // 4:
                        continue
                elif time.monotonic() < (next_kill or 0):
                    continue
                info = client.scheduler_info()["workers"]
                busy = [str(info.get(a, {}).get("name")) for a, keys in client.processing().items() if keys]
                victim = next((name for name in busy if name in procs and procs[name].poll() is None), None)
                if victim is None:
                    continue
                os.kill(procs[victim].pid, signal.SIGKILL)  # mid-task, no chance to clean up
                kills += 1
                procs[f"r{kills}"] = cluster.add_worker(f"r{kills}", wait=False)
                next_kill = time.monotonic() + every if every else None
        if run.poll() is None:
            run.kill()
        output, _ = run.communicate(timeout=60)
        assert run.returncode == 0, output
    finally:
        cluster.stop()
    return out, kills


def assert_same(out: Path, ref: Path, n: int) -> None:
    rows = status_csv(out)
    ids = {f"s{i:04d}" for i in range(n)}
    assert Counter((r["slide_id"], r["stage"]) for r in rows) == {(s, st): 1 for s in ids for st in STAGES}
    assert {r["state"] for r in rows} <= {"done", "empty"}
    key = {(r["slide_id"], r["stage"]): (r["state"], r["n_patches"]) for r in rows}
    assert key == {(r["slide_id"], r["stage"]): (r["state"], r["n_patches"]) for r in status_csv(ref)}
    for sid in sorted(ids):
        a, b = h5.read_patches(out / "patches" / f"{sid}.h5"), h5.read_patches(ref / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        if key[(sid, "extract")][0] == "done":
            x, y = h5.read_bag(bag_path(out, "texture", sid)), h5.read_bag(bag_path(ref, "texture", sid))
            np.testing.assert_array_equal(x.coords, y.coords)
            np.testing.assert_allclose(x.features, y.features, rtol=1e-6, atol=1e-6)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def clean_run(root: Path, out: Path) -> Path:
    summary = run_cohort(load_cohort_config(cohort_config(root, out)), scheduler="sequential", progress=False)
    assert summary.ok, summary.failures
    return out


def test_one_worker_killed_over_30_slides(tmp_path: Path) -> None:
    n = 30
    root = make_cohort(tmp_path / "cohort", n)
    ref = clean_run(root, tmp_path / "ref")
    out, kills = run_with_kills(root, tmp_path / "killed", n, None, timeout=240)
    assert kills == 1
    assert_same(out, ref, n)


@pytest.mark.slow
def test_a_worker_killed_every_minute_over_1000_slides(tmp_path: Path) -> None:
    n = 1000
    root = make_cohort(tmp_path / "cohort", n)
    ref = clean_run(root, tmp_path / "ref")
    out, kills = run_with_kills(root, tmp_path / "killed", n, 60.0, timeout=3600)
    assert kills >= 1
    assert_same(out, ref, n)
