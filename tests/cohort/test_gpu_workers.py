"""The embedded LocalCluster on a CPU machine: workers start reader processes, see no GPU,
and a stage sent to CUDA without a GPU worker is refused before anything runs."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests._procs import watching_children
from tests.cohort.conftest import write_config
from wsi_mil.cohort.config import load_cohort_config
from wsi_mil.cohort.executors import open_executor
from wsi_mil.cohort.tasks import extract_task
from wsi_mil.errors import ConfigError
from wsi_mil.io import h5

SID = "tum_00"


def _worker_view() -> tuple[bool, str | None]:
    return multiprocessing.current_process().daemon, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_embedded_workers_start_readers_and_see_no_gpu(cohort_dir: Path, tmp_path: Path) -> None:
    from wsi_mil.features.extract import is_extracted
    from wsi_mil.tiling.cohort import tile_cohort

    out = tmp_path / "out"
    assert not tile_cohort([cohort_dir / "slides" / f"{SID}.tif"], out, progress=False).failed

    cfg = load_cohort_config(
        write_config(cohort_dir, out, stages="extract", cluster="{n_workers: 1, gpu_workers: 0}")
    )
    ext = {"encoder": "texture", "batch_size": 8, "workers": 2}
    with open_executor(cfg, None, lambda _: None) as ex:
        from wsi_mil.cohort.tasks import task_device

        assert set(ex.client.run(_worker_view).values()) == {(False, "")}  # not daemonic, sees no GPU
        assert ex.client.submit(task_device, "auto", pure=False).result() == "cpu"  # a task there: auto → cpu
        job = ex.client.submit(watching_children, extract_task, None, str(out), SID, ext, False)
        outcome, children, worker_pid = job.result()
    assert outcome.state == "done", outcome.reason
    assert "daemonic" not in outcome.detail
    assert len(children) >= 2 and worker_pid not in children  # two reader processes ran
    n = len(h5.read_patches(out / "patches" / f"{SID}.h5").coords)
    assert outcome.n_patches == n and is_extracted(out / "features/texture/h5_files/tum_00.h5", None, n)


def test_cuda_stage_without_gpu_worker_is_refused_up_front(cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = load_cohort_config(
        write_config(
            cohort_dir, out, stages="tile, extract, train", cluster="{n_workers: 1, gpu_workers: 0}",
        )
    )
    cfg = replace(cfg, train=replace(cfg.train, device="cuda"))
    t0 = time.monotonic()
    with (
        pytest.raises(ConfigError, match=r"train\.device is cuda but no Dask worker declares a GPU") as err,
        open_executor(cfg, None, lambda _: None),
    ):
        pass
    assert time.monotonic() - t0 < 60
    assert "\n" not in str(err.value)
    assert not (out / "patches").exists()  # nothing ran
