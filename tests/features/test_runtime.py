"""The CUDA rules checked on CPU: auto precision by compute capability, usable CPUs, readers
started by spawn giving the same bag as fork, non-finite features refused, and the row
comparison the GPU tests rely on failing when rows are shuffled."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from wsi_mil.errors import ConfigError
from wsi_mil.features.extract import ExtractConfig, extract_slide
from wsi_mil.features.reader import PatchStream, ReadPlan, make_groups, reader_start_method
from wsi_mil.features.registry import Encoder, Preprocess, create_encoder, register_encoder
from wsi_mil.features.runtime import (
    NonFiniteFeaturesError,
    Runner,
    _cgroup_quota,
    auto_precision,
    feature_agreement,
    usable_cpus,
)
from wsi_mil.io import h5


@pytest.mark.parametrize(
    ("capability", "want"),
    [((6, 1), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
     ((8, 9), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16"), ((12, 0), "bf16")],
)  # fmt: skip
def test_auto_precision_follows_the_compute_capability(capability: tuple[int, int], want: str) -> None:
    # V100 (7.0) and T4 (7.5) report bf16 "supported" by emulation: auto gives them fp16.
    assert auto_precision(capability) == want


def test_cgroup_quota_caps_usable_cpus(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(v1) is None
    assert 1 <= usable_cpus() <= len(__import__("os").sched_getaffinity(0))


def test_reader_start_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSI_MIL_READER_START", raising=False)
    assert reader_start_method(cuda=True) == "forkserver"
    assert reader_start_method(cuda=False) == ("forkserver" if torch.cuda.is_initialized() else "fork")
    monkeypatch.setenv("WSI_MIL_READER_START", "spawn")
    assert reader_start_method(cuda=False) == "spawn"
    monkeypatch.setenv("WSI_MIL_READER_START", "threads")
    with pytest.raises(ConfigError, match="WSI_MIL_READER_START"):
        reader_start_method(cuda=False)


def _extract(out: Path, sid: str, runner: Runner, cfg: ExtractConfig, name: str) -> Path:
    bag = out / "features" / name / "h5_files" / f"{sid}.h5"
    extract_slide(out / "patches" / f"{sid}.h5", bag, runner, cfg)
    return bag


@pytest.mark.parametrize("method", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_readers_started_without_fork_give_the_same_bag(
    out: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # forkserver is what CUDA runs use; spawn (slow: each reader imports torch) pickles the most.
    runner = Runner(create_encoder("texture"), "cpu")
    cfg = ExtractConfig(encoder="texture", workers=2, batch_size=16, backend="tiffslide")
    monkeypatch.setenv("WSI_MIL_READER_START", "fork")
    forked = h5.read_bag(_extract(out, "tum", runner, cfg, "fork"))
    monkeypatch.setenv("WSI_MIL_READER_START", method)
    spawned = h5.read_bag(_extract(out, "tum", runner, cfg, method))
    np.testing.assert_array_equal(spawned.coords, forked.coords)
    np.testing.assert_array_equal(spawned.features, forked.features)
    assert forked.attrs["supertile"] == 4 and len(forked.features) > 16  # several groups, several batches


def test_stream_pickles_without_its_slide_handle(out: Path) -> None:
    pf = h5.read_patches(out / "patches" / "tum.h5")
    plan = ReadPlan(str(pf.attrs["slide_path"]), "tiffslide", None, 0, 1.0, 256, 64)
    stream = PatchStream(plan, pf.coords, make_groups(pf.coords, 256, 1), 8)
    stream.open()
    try:
        copy = pickle.loads(pickle.dumps(stream))
        assert copy._slide is None and copy.plan == plan
        np.testing.assert_array_equal(copy.coords, stream.coords)
        got, failed = copy.read_group(copy.groups[0])  # opens its own handle
        assert not failed and got[0][1].shape == (64, 64, 3)
    finally:
        stream.close()
        copy.close()


# --------------------------------------------------------------------------- NaN / Inf


class _Overflow(nn.Module):
    """Mean colour and brightness of each patch; +inf where the brightness exceeds ``limit``
    (what an fp16 ViT's activations do past 65,504)."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = float(limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = x.mean((2, 3))  # (b, 3)
        bright = colour.mean(1, keepdim=True)  # (b, 1)
        return torch.cat([colour, bright + torch.where(bright > self.limit, torch.inf, 0.0)], 1)


@register_encoder("test_overflow")
def _overflow(name: str, weights: Any = None, limit: float = float("inf"), **kw: Any) -> Encoder:
    return Encoder(name, _Overflow(limit), 4, Preprocess(64), f"test:overflow-{limit}")


def test_non_finite_features_are_refused(out: Path) -> None:
    cfg = ExtractConfig(encoder="test_overflow", workers=0, batch_size=8)
    good = _extract(out, "tum", Runner(create_encoder("test_overflow"), "cpu"), cfg, "test_overflow")
    before = good.read_bytes()
    bright = h5.read_bag(good).features[:, 3]  # (N,) each patch's brightness, in coords order
    limit = float(np.median(bright))
    runner = Runner(create_encoder("test_overflow", limit=limit), "cpu")
    with pytest.raises(NonFiniteFeaturesError, match=r"^tum: patch row \d+ at \(\d+, \d+\) gave non-finite") as err:
        _extract(out, "tum", runner, cfg, "test_overflow")
    msg = str(err.value)
    assert "\n" not in msg and "bf16 or fp32" in msg and "(inf)" in msg
    row = int(msg.split("patch row ")[1].split()[0])
    assert bright[row] > limit  # the row named is one that overflowed
    x, y = h5.read_patches(out / "patches" / "tum.h5").coords[row]
    assert f"at ({x}, {y})" in msg
    assert good.read_bytes() == before  # the complete bag already there is kept
    assert not list(good.parent.glob(".*partial"))


# --------------------------------------------------------------------------- row comparison


def _patches(n: int, size: int = 64) -> torch.Tensor:
    """``n`` patches of distinct content cut from scikit-image's IHC image (uint8, NHWC)."""
    from skimage.data import immunohistochemistry

    img = immunohistochemistry()  # (512, 512, 3) uint8
    cuts = [img[y : y + size, x : x + size] for y in range(0, 512, size) for x in range(0, 512, size)]
    return torch.from_numpy(np.stack(cuts[:n]).copy())


def test_feature_agreement_passes_same_rows_and_fails_shuffled() -> None:
    torch.manual_seed(0)
    enc = create_encoder("timm:resnet18", weights="random")  # convolutions + BatchNorm, small
    x = _patches(12)
    plain = Runner(enc, "cpu", fold_bn=False, channels_last=False)(x)
    folded = Runner(enc, "cpu")(x)  # the same weights, BatchNorm folded, channels-last (a copy)
    same = feature_agreement(plain, folded)
    assert same["max_rel_l2"] < 1e-2 and same["own_row_share"] == 1.0
    shuffled = feature_agreement(plain, folded[np.roll(np.arange(len(x)), 1)])
    assert shuffled["own_row_share"] == 0.0 and shuffled["max_rel_l2"] > 1e-2


def test_predict_refuses_gpu_precision_bags_on_cpu(tmp_path: Path) -> None:
    from wsi_mil.io.run_folder import ModelSettings
    from wsi_mil.predict.cohort import check_precision

    settings = ModelSettings(tmp_path / "models" / "r1", "uni", None, "hub:uni", tmp_path / "pipeline.yaml")
    assert check_precision("cpu", "fp32", settings) == "fp32"
    with pytest.raises(ConfigError, match=r"r1 was trained on bf16 bags, which this machine cannot make") as err:
        check_precision("cpu", "bf16", settings)
    assert "\n" not in str(err.value) and str(settings.path) in str(err.value)
