"""Encoder registry: names, hub names offline, local and random weights, runtime settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.features.registry import (
    Encoder,
    EncoderError,
    Preprocess,
    create_encoder,
    list_encoders,
    register_encoder,
)
from wsi_mil.features.runtime import Runner, fold_conv_bn, resolve_precision


def _batch(n: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(EncoderError) as exc:
        create_encoder("uni_v3")
    msg = str(exc.value)
    assert "uni_v3" in msg and "resnet50_trunc" in msg and "texture" in msg and "hf-hub:" in msg
    assert isinstance(exc.value, WsiMilError) and "\n" not in msg


def test_list_encoders_and_custom_registration() -> None:
    assert {"resnet50_trunc", "texture", "timm:<model>", "hf-hub:<org>/<model>"} <= set(
        list_encoders()
    )

    @register_encoder("tiny_test_encoder")
    def tiny(name: str, weights: str | None = None, **kw: object) -> Encoder:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        return Encoder(name, model, 4, Preprocess(input_size=32), "builtin:test")

    assert "tiny_test_encoder" in list_encoders()
    enc = create_encoder("tiny_test_encoder")
    assert Runner(enc, "cpu")(_batch(3, 32)).shape == (3, 4)


@pytest.mark.parametrize(
    "name", ["hf-hub:MahmoodLab/UNI", "resnet50_trunc", "timm:resnet18.a1_in1k"]
)
def test_pretrained_offline_fails_with_one_clear_line(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    # huggingface_hub's own offline switch (HF_HUB_OFFLINE=1) and an empty cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EncoderError) as exc:
        create_encoder(name)
    msg = str(exc.value)
    assert name in msg and "--weights PATH" in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_random_weights_are_seeded() -> None:
    a = create_encoder("resnet50_trunc", weights="random")
    b = create_encoder("resnet50_trunc", weights="random")
    assert a.dim == 1024 and a.weights_id == "random:seed0"
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert a.model(x).shape == (2, 1024)


def test_local_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(123)
    src = create_encoder("timm:resnet18", weights="random")
    for p in src.model.parameters():  # make it differ from the seeded random init
        p.data.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    got = create_encoder("timm:resnet18", weights=path)
    assert got.weights_id.startswith("file:r18.safetensors:")
    x = _batch()
    assert torch.equal(
        torch.from_numpy(Runner(src, "cpu", fold_bn=False)(x)),
        torch.from_numpy(Runner(got, "cpu", fold_bn=False)(x)),
    )


def test_torch_weights_file_full_resnet_into_trunc(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(7)
    full = timm.create_model("resnet50", pretrained=False)
    sd = {f"module.{k}": v for k, v in full.state_dict().items()}  # DataParallel-style keys
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": sd}, path)
    enc = create_encoder("resnet50_trunc", weights=str(path))
    assert torch.equal(
        enc.model.state_dict()["layer3.0.conv1.weight"], full.state_dict()["layer3.0.conv1.weight"]
    )
    assert enc.weights_id.startswith("file:r50.pth:")


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("resnet50_trunc", weights=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        create_encoder("resnet50_trunc", weights=str(junk))
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    with pytest.raises(EncoderError, match="lacks"):
        create_encoder("resnet50_trunc", weights=str(partial))


def test_texture_encoder() -> None:
    enc = create_encoder("texture")
    assert enc.attrs()["preprocess_input_size"] == 224 and enc.weights_id == "builtin:texture-v1"
    feats = Runner(enc, "cpu")(_batch(4, 224))
    assert feats.shape == (4, enc.dim) and feats.dtype == "float32"
    with pytest.raises(EncoderError):
        create_encoder("texture", weights="some.safetensors")


def test_cpu_stays_exact_fp32() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="GPU"):
        resolve_precision("bf16", cpu)


def test_conv_bn_folding_keeps_the_features() -> None:
    enc = create_encoder("resnet50_trunc", weights="random")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = enc.model(x)
        folded = fold_conv_bn(enc.model)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fold_conv_bn(enc.model).modules())
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)
