"""Built-in encoders: ``resnet50_trunc`` (CLAM), ``timm:<name>``, ``hf-hub:<org>/<name>``,
``texture``, and the named foundation-model presets (:mod:`.presets`, ``wsi-mil encoders``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsi_mil.features.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderError,
    Preprocess,
    hub_call,
    load_weights,
    register_encoder,
)

#: Seed of ``--weights random`` (the same random encoder on every run).
RANDOM_SEED = 0


def _hub_repo(arch: str) -> str | None:
    """The hub repository a timm name loads from (``hf-hub:org/name``, or timm's own ``timm/…``)."""
    if arch.startswith(("hf-hub:", "hf_hub:")):
        return arch.split(":", 1)[1]
    return None


def _build_pretrained(name: str, build: Callable[[bool], Any], repo: str | None = None) -> Any:
    """``build(pretrained=True)`` through huggingface_hub, one clear line when the weights are unreachable."""
    return hub_call(name, repo, lambda: build(True))


def _seeded(build: Callable[[], Any]) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _timm_preprocess(model: Any, native_mpp: float | None = None) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return Preprocess(
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        native_mpp=native_mpp,
    )


# -- resnet50_trunc ----------------------------------------------------------------------
def _resnet_trunc_module(resnet: Any) -> Any:
    from torch import nn

    class ResNetTrunc(nn.Module):
        """ResNet-50 through ``layer3`` + global average pooling → 1024-d (CLAM's encoder)."""

        def __init__(self, r: Any) -> None:
            super().__init__()
            self.conv1, self.bn1, self.act1, self.maxpool = r.conv1, r.bn1, r.act1, r.maxpool
            self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3

        def forward(self, x: Any) -> Any:
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            x = self.layer3(self.layer2(self.layer1(x)))  # (B, 1024, S/16, S/16)
            return x.mean(dim=(2, 3))  # (B, 1024)

    return ResNetTrunc(resnet)


@register_encoder("resnet50_trunc")
def resnet50_trunc(name: str, weights: str | None = None, **kw: Any) -> Encoder:
    """CLAM's default: timm ``resnet50.tv_in1k`` up to ``layer3``, average-pooled, 1024-d.

    A local weights file may be a full ResNet-50 state dict (timm or torchvision names;
    ``layer4``/``fc`` are ignored) or one of the truncated model.
    """
    import timm

    arch = "resnet50.tv_in1k"
    pre = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, native_mpp=None)
    if weights is None:
        model = _resnet_trunc_module(_build_pretrained(name, lambda p: timm.create_model(arch, pretrained=p, **kw)))
        return Encoder(name, model, 1024, pre, f"pretrained:timm/{arch}")
    model = _resnet_trunc_module(_seeded(lambda: timm.create_model(arch, pretrained=False, **kw)))
    if weights == "random":
        return Encoder(name, model, 1024, pre, f"random:seed{RANDOM_SEED}")
    wid = load_weights(model, weights, name, ignore=("layer4.", "fc."))
    return Encoder(name, model, 1024, pre, wid)


# -- any timm model, and hub models through timm ----------------------------------------
def _timm_encoder(name: str, arch: str, weights: str | None, **kw: Any) -> Encoder:
    import timm

    kw.setdefault("num_classes", 0)  # pooled features, no classifier
    native_mpp = kw.pop("native_mpp", None)
    if weights is None:
        model = _build_pretrained(name, lambda p: timm.create_model(arch, pretrained=p, **kw), _hub_repo(arch))
        wid = f"pretrained:{arch}"
    else:
        repo = _hub_repo(arch)
        try:
            if repo:  # hf-hub names need the hub (or its cache) even for their config
                model = _seeded(lambda: hub_call(name, repo, lambda: timm.create_model(arch, pretrained=False, **kw)))
            else:
                model = _seeded(lambda: timm.create_model(arch, pretrained=False, **kw))
        except RuntimeError as exc:  # timm: unknown model name
            raise EncoderError(f"{name}: timm has no model {arch!r} ({exc})") from exc
        wid = f"random:seed{RANDOM_SEED}" if weights == "random" else load_weights(model, weights, name)
    dim = int(getattr(model, "num_features", 0) or getattr(model, "embed_dim", 0))
    return Encoder(name, model, dim, _timm_preprocess(model, native_mpp), wid)


@register_encoder("timm:", prefix=True, pattern="timm:<model>")
def timm_encoder(name: str, weights: str | None = None, **kw: Any) -> Encoder:
    """Any ``timm.create_model`` name, pooled, no classifier (``timm:vit_small_patch16_224``)."""
    import timm

    arch = name.removeprefix("timm:")
    if not timm.is_model(arch.split(".")[0]):
        raise EncoderError(f"{name}: timm knows no model {arch!r} (see timm.list_models())")
    return _timm_encoder(name, arch, weights, **kw)


@register_encoder("hf-hub:", prefix=True, pattern="hf-hub:<org>/<model>")
def hf_hub_encoder(name: str, weights: str | None = None, **kw: Any) -> Encoder:
    """A Hugging Face hub model through timm (``hf-hub:MahmoodLab/UNI``; needs network or cache).

    Gated models need ``huggingface-cli login`` first; some need extra keyword arguments
    (e.g. UNI: ``init_values=1e-5, dynamic_img_size=True``).
    """
    if weights is not None and weights != "random" and not Path(weights).exists():
        raise EncoderError(f"{name}: weights file {weights} does not exist")
    return _timm_encoder(name, name, weights, **kw)


@register_encoder("texture")
def texture(name: str, weights: str | None = None, **kw: Any) -> Encoder:
    """Built-in H&E texture statistics (no weights, no download); see :mod:`.texture`."""
    from wsi_mil.features.texture import TextureStats

    if weights not in (None, "random"):
        raise EncoderError(f"{name}: has no trainable weights; drop --weights")
    model = TextureStats(**kw)
    pre = Preprocess(input_size=model.input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), native_mpp=0.5)
    return Encoder(name, model, model.dim, pre, "builtin:texture-v1")


from wsi_mil.features import presets_build  # noqa: E402, F401 - registers the named presets
