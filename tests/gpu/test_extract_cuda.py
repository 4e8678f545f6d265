"""``extract_slide`` on CUDA with reader processes, in this process and inside a real Dask
LocalCluster worker declaring ``GPU=1``; features checked row by row against CPU fp32."""

from __future__ import annotations

import copy
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._procs import watching_children
from tests.gpu.conftest import GPU
from wsi_mil.features.extract import ExtractConfig, extract_slide
from wsi_mil.features.registry import create_encoder
from wsi_mil.features.runtime import Runner, feature_agreement
from wsi_mil.io import h5

pytestmark = GPU


def _bag(out: Path, runner: Runner, cfg: ExtractConfig, name: str) -> Path:
    bag = out / "features" / name / "h5_files" / "g.h5"
    extract_slide(out / "patches" / "g.h5", bag, runner, cfg)
    return bag


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_extract_slide_on_cuda_with_readers(tiled_gpu: Path, precision: str) -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet50_trunc", weights="random")
    cpu = h5.read_bag(_bag(tiled_gpu, Runner(copy.deepcopy(enc), "cpu"), ExtractConfig(workers=0), "cpu"))
    runner = Runner(copy.deepcopy(enc), "cuda", precision)
    cfg = ExtractConfig(workers=4, batch_size=32)
    bag, children, me = watching_children(_bag, tiled_gpu, runner, cfg, f"cuda-{precision}")
    assert len(children) >= 4 and me not in children  # four reader processes (forkserver) fed the GPU
    got = h5.read_bag(bag)
    assert got.attrs["device"] == "cuda" and got.attrs["precision"] == precision
    assert (got.coords == cpu.coords).all() and len(got.coords) > 32
    agree = feature_agreement(cpu.features, got.features)
    assert agree["max_rel_l2"] < 1e-2 and agree["own_row_share"] == 1.0, agree


def _worker_env() -> tuple[bool, str | None]:
    return multiprocessing.current_process().daemon, os.environ.get("CUDA_VISIBLE_DEVICES")


def _extract_task_watching(out: str, cfg: dict[str, Any]) -> tuple[Any, list[int], int, str]:
    from wsi_mil.cohort.tasks import extract_task, task_device

    outcome, children, me = watching_children(extract_task, None, out, "g", cfg, False)
    return outcome, children, me, task_device("auto")


def test_extract_inside_a_gpu_worker_of_the_embedded_cluster(tiled_gpu: Path, tmp_path: Path) -> None:
    from wsi_mil.cohort.config import load_cohort_config
    from wsi_mil.cohort.executors import gpu_env, open_executor

    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    (out / "patches" / "g.h5").write_bytes((tiled_gpu / "patches" / "g.h5").read_bytes())
    ref = h5.read_bag(
        _bag(out, Runner(create_encoder("texture"), "cpu"), ExtractConfig(encoder="texture", workers=0), "ref")
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        f"slides: {tiled_gpu.parent / 'slides'}\nout: {out}\nstages: [extract]\n"
        "extract: {encoder: texture, precision: fp32}\ncluster: {n_workers: 1, gpu_workers: 1}\n"
    )
    cfg = load_cohort_config(yaml)
    ext = {"encoder": "texture", "precision": "fp32", "workers": 2, "batch_size": 16, "device": "auto"}
    with open_executor(cfg, None, lambda _: None) as ex:
        info = ex.client.scheduler_info()["workers"]
        gpu = [a for a, w in info.items() if (w.get("resources") or {}).get("GPU")]
        assert len(gpu) == 1 and len(info) == 2
        env = ex.client.run(_worker_env)
        assert env[gpu[0]] == (False, gpu_env(0)["CUDA_VISIBLE_DEVICES"])
        assert all(v == (False, "") for a, v in env.items() if a != gpu[0])  # the CPU worker sees no GPU
        fut = ex.client.submit(_extract_task_watching, str(out), ext, resources={"GPU": 1}, pure=False)
        outcome, children, worker_pid, device = fut.result()
    assert device == "auto" and outcome.state == "done", outcome.reason
    assert len(children) >= 2 and worker_pid not in children
    got = h5.read_bag(out / "features" / "texture" / "h5_files" / "g.h5")
    assert got.attrs["device"] == "cuda" and got.attrs["precision"] == "fp32"
    agree = feature_agreement(ref.features, got.features)
    assert agree["max_rel_l2"] < 1e-3 and agree["own_row_share"] == 1.0, agree
