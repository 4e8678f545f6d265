"""The encoder runner on CUDA against CPU fp32, patch by patch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.gpu.conftest import GPU, ihc_patches
from wsi_mil.features.registry import create_encoder
from wsi_mil.features.runtime import Runner, auto_precision, feature_agreement

pytestmark = GPU


@pytest.fixture(scope="module")
def cpu_reference() -> tuple[object, torch.Tensor, np.ndarray]:
    torch.manual_seed(0)
    enc = create_encoder("resnet50_trunc", weights="random")
    x = ihc_patches()
    return enc, x, Runner(copy.deepcopy(enc), "cpu")(x)  # (16, 1024) exact fp32


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_rows_match_cpu_fp32(cpu_reference: tuple, precision: str) -> None:
    enc, x, ref = cpu_reference
    runner = Runner(copy.deepcopy(enc), "cuda", precision)
    assert runner.precision == precision
    got = runner(x)
    assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
    agree = feature_agreement(ref, got)
    assert agree["max_rel_l2"] < 1e-2, agree
    assert agree["own_row_share"] == 1.0, agree  # each row closest to its own patch's CPU row


def test_fp32_on_cuda_is_exact_fp32(cpu_reference: tuple) -> None:
    enc, x, ref = cpu_reference
    runner = Runner(copy.deepcopy(enc), "cuda", "fp32")
    assert runner.describe()["tf32"] is False
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    agree = feature_agreement(ref, runner(x))
    assert agree["max_rel_l2"] < 1e-4 and agree["own_row_share"] == 1.0, agree  # TF32 would give ~1e-3


def test_auto_precision_asks_the_chosen_device() -> None:
    last = torch.cuda.device_count() - 1
    runner = Runner(create_encoder("texture"), f"cuda:{last}", "auto")
    assert runner.precision == auto_precision(torch.cuda.get_device_capability(last))
    assert runner.device == torch.device("cuda", last)


def test_pinned_batches_copy_without_blocking(cpu_reference: tuple) -> None:
    enc, x, ref = cpu_reference
    runner = Runner(copy.deepcopy(enc), "cuda", "fp32")
    got = runner(x.pin_memory())  # prepare() copies with non_blocking=True; the result must wait for it
    assert feature_agreement(ref, got)["own_row_share"] == 1.0
