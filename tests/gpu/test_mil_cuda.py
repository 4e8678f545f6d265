"""Training and prediction of the loss-attention head on CUDA agree with CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tests.gpu.conftest import GPU
from tests.mil.conftest import ENC, make_cohort
from wsi_mil.io.h5 import read_bag
from wsi_mil.mil import load_model, load_train_config, train_run
from wsi_mil.mil.inference import predict_bag

pytestmark = GPU


def _train(root: Path, device: str) -> Path:
    csv = make_cohort(root)
    cfg = load_train_config(
        Path(__file__).parents[2] / "configs/train/default.yaml",
        {"optim.epochs": 6, "optim.lr": 3e-3, "cv.folds": 3, "model.hidden": [32], "run_name": "r1", "device": device},
    )
    return train_run(root, csv, ENC, cfg, progress=False)


def test_train_on_cuda_agrees_with_cpu(tmp_path: Path) -> None:
    cpu, gpu = _train(tmp_path / "cpu", "cpu"), _train(tmp_path / "cuda", "cuda")
    a, b = pd.read_csv(cpu / "predictions.csv"), pd.read_csv(gpu / "predictions.csv")
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert list(a.slide_id) == list(b.slide_id) and probs
    np.testing.assert_allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=2e-3)


def test_predict_on_cuda_agrees_with_cpu(tmp_path: Path) -> None:
    run = _train(tmp_path, "cpu")
    cpu, gpu = load_model(run, device="cpu"), load_model(run, device="cuda")
    assert next(gpu.parameters()).device.type == "cuda"
    for bag in sorted((tmp_path / "features" / ENC / "h5_files").glob("*.h5"))[:6]:
        feats = read_bag(bag).features
        p, q = predict_bag(cpu, feats), predict_bag(gpu, feats)
        torch.testing.assert_close(q.bag_probs.cpu(), p.bag_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(q.attention.cpu(), p.attention, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q.instance_probs.cpu(), p.instance_probs, rtol=1e-4, atol=1e-5)
