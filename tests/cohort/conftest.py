"""A small synthetic cohort, and a real Dask cluster started as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

BIN = Path(sys.executable).parent
N_SLIDES = 8


def write_cohort(root: Path, n: int, seed: int) -> Path:
    """``root/slides`` with ``n`` slides of 2048 × 1536 (tumour / normal alternating, seeds
    ``seed``, ``seed + 1``, …) and ``root/labels.csv``; returns ``root``."""
    (root / "slides").mkdir()
    rows = ["slide_id,label"]
    for i in range(n):
        tumour = i % 2 == 0
        sid = f"{'tum' if tumour else 'nor'}_{i:02d}"
        write_synthetic_slide(
            root / "slides" / f"{sid}.tif",
            SyntheticSpec(width=2048, height=1536, tumour=tumour, n_tissue=2, seed=seed + i),
        )
        rows.append(f"{sid},{'tumour' if tumour else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``slides/`` with 8 slides of 2048 × 1536 (tumour / normal alternating) and ``labels.csv``."""
    return write_cohort(tmp_path_factory.mktemp("cohort"), N_SLIDES, seed=100)


@pytest.fixture(scope="session")
def reference(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiles and bags of the cohort made by the plain sequential commands (tile, extract)."""
    from wsi_mil.features.cohort import extract_cohort
    from wsi_mil.tiling.cohort import tile_cohort

    out = tmp_path_factory.mktemp("reference") / "out"
    assert not tile_cohort([cohort_dir / "slides"], out, progress=False).failed
    summary = extract_cohort(out, "texture", overrides={"batch_size": 8, "workers": 0}, progress=False)
    assert len(summary.done) == N_SLIDES
    return out


def write_config(root: Path, out: Path, stages: str = "tile, extract, train, heatmap", **extra: str) -> Path:
    """A cohort YAML in ``root`` (slides and labels of ``cohort_dir``, tiny training)."""
    lines = [
        f"slides: {root / 'slides'}",
        f"labels: {root / 'labels.csv'}",
        f"out: {out}",
        f"stages: [{stages}]",
        "extract: {encoder: texture, batch_size: 8}",
        "train: {run_name: r1, cv: {folds: 2, val_fraction: 0.4}, optim: {epochs: 3}}",
        "heatmap: {gallery_k: 0}",
        *(f"{k}: {v}" for k, v in extra.items()),
    ]
    path = out.parent / f"{out.name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Cluster:
    """A Dask scheduler and workers, each its own process, on 127.0.0.1."""

    scheduler_file: Path
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def add_worker(self, name: str, *, gpu: bool = False, wait: bool = True) -> subprocess.Popen:
        """Start one more ``dask worker --nthreads 1 --no-nanny`` process named ``name``."""
        folder = self.scheduler_file.parent
        env = {**os.environ, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error"}
        log = open(folder / "dask.log", "ab")  # noqa: SIM115 - kept open for the process's lifetime
        proc = subprocess.Popen(
            [
                str(BIN / "dask"),
                "worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                name,
                "--memory-limit",
                "0",
                *(["--resources", "GPU=1"] if gpu else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
        self.workers.append(proc)
        if wait:
            from distributed import Client

            with Client(self.address, timeout="30s") as client:
                deadline = time.monotonic() + 90
                while name not in {str(w.get("name")) for w in client.scheduler_info()["workers"].values()}:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"dask worker {name} did not start; see {folder / 'dask.log'}")
                    time.sleep(0.2)
        return proc

    def stop(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def start_cluster(folder: Path, n_workers: int = 2, gpu: tuple[int, ...] = ()) -> Cluster:
    """``dask scheduler`` + ``n_workers`` × ``dask worker --nthreads 1 --no-nanny`` processes.

    Workers whose index is in ``gpu`` declare the resource ``GPU=1`` (as a GPU node would).
    """
    folder.mkdir(parents=True, exist_ok=True)
    sfile = folder / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error"}
    log = open(folder / "dask.log", "ab")  # noqa: SIM115 - kept open for the processes' lifetime
    common = {"stdout": log, "stderr": subprocess.STDOUT, "env": env, "cwd": folder}
    sched = subprocess.Popen(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(sfile),
        ],
        **common,
    )
    cluster = Cluster(sfile, sched)
    deadline = time.monotonic() + 60
    while not sfile.exists():
        if time.monotonic() > deadline or sched.poll() is not None:
            cluster.stop()
            raise RuntimeError(f"dask scheduler did not start; see {folder / 'dask.log'}")
        time.sleep(0.2)
    for i in range(n_workers):
        cluster.add_worker(f"w{i}", gpu=i in gpu, wait=False)
    from distributed import Client

    with Client(cluster.address, timeout="30s") as client:
        client.wait_for_workers(n_workers, timeout=90)
    return cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "dask")
    try:
        yield c
    finally:
        c.stop()
