"""Built-in encoders: ``resnet50_trunc`` (CLAM), ``timm:<name>``, ``hf-hub:<org>/<name>``,
``texture``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wsi_mil.features.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderError,
    Preprocess,
    hub_reachable,
    load_weights,
    register_encoder,
)

#: Seed of ``--weights random`` (the same random encoder on every run).
RANDOM_SEED = 0


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub use its local cache only (no 25 s of retries without network)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _offline_message(name: str, exc: BaseException) -> str:
    return (
        f"{name}: pretrained weights are not in the local cache and the model hub cannot be "
        f"reached ({type(exc).__name__}); download them on a machine with network (and a hub "
        "token for gated models) and pass --weights PATH (.safetensors or a state dict), "
        "or use --weights random for tests"
    )


def _build_pretrained(name: str, build: Callable[[bool], Any]) -> Any:
    """``build(pretrained=True)`` with a clear one-line error when the weights are unreachable."""
    online = hub_reachable()
    try:
        if online:
            return build(True)
        with _hub_offline():
            return build(True)
    except EncoderError:
        raise
    except Exception as exc:  # hub, HTTP and cache errors come in many types
        if not online:
            raise EncoderError(_offline_message(name, exc)) from exc
        raise EncoderError(
            f"{name}: cannot load pretrained weights ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a gated model needs "
            "`huggingface-cli login`, or pass --weights PATH"
        ) from exc


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
        model = _resnet_trunc_module(
            _build_pretrained(name, lambda p: timm.create_model(arch, pretrained=p, **kw))
        )
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
        model = _build_pretrained(name, lambda p: timm.create_model(arch, pretrained=p, **kw))
        wid = f"pretrained:{arch}"
    else:
        try:
            model = _seeded(lambda: timm.create_model(arch, pretrained=False, **kw))
        except RuntimeError as exc:  # timm: unknown model name
            raise EncoderError(f"{name}: timm has no model {arch!r} ({exc})") from exc
        except Exception as exc:  # hf-hub names need the hub even for their config
            if arch.startswith("hf-hub:"):
                raise EncoderError(_offline_message(name, exc)) from exc
            raise
        wid = (
            f"random:seed{RANDOM_SEED}"
            if weights == "random"
            else load_weights(model, weights, name)
        )
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
    pre = Preprocess(
        input_size=model.input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), native_mpp=0.5
    )
    return Encoder(name, model, model.dim, pre, "builtin:texture-v1")
