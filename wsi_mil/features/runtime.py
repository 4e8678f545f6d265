"""Run an encoder fast and exactly: device, precision, channels-last, conv–BN folding."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError
from wsi_mil.features.registry import Encoder

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str = "auto") -> Any:
    """``"auto"`` → CUDA when present, else CPU; anything else as given to torch."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for but CUDA is not available; use --device cpu"
        )
    return dev


def resolve_precision(precision: str, device: Any) -> str:
    """Mixed precision on GPU only (bf16 where supported, else fp16); exact fp32 on CPU."""
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(
                f"precision {precision} is for GPUs; on CPU extraction runs in exact fp32 "
                "(bf16 autocast measured 7× slower on CPU)"
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def fold_conv_bn(model: Any) -> Any:
    """Fold BatchNorm into the preceding convolutions (exact in eval mode, fewer passes).

    Uses ``torch.fx``; a model that cannot be traced is returned unchanged.
    """
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    except Exception as exc:  # untraceable control flow: keep the model as it is
        log.info("conv-bn folding skipped (%s)", exc)
        return model


class Runner:
    """Calls an encoder on uint8 (b, S, S, 3) batches; returns float32 (b, D) features.

    Parameters
    ----------
    encoder : Encoder
        From :func:`~wsi_mil.features.create_encoder`.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision : str
        ``"auto"`` (GPU: bf16 or fp16 autocast; CPU: fp32), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    fold_bn : bool
        Fold BatchNorm into convolutions.
    channels_last : bool
        Run the model in NHWC memory format (faster for convolutions on CPU and GPU).
    compile : bool
        ``torch.compile`` the model (slow to start; may pay on long GPU runs).
    """

    def __init__(
        self,
        encoder: Encoder,
        device: str = "auto",
        precision: str = "auto",
        fold_bn: bool = True,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        import torch

        self.encoder = encoder
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        model = encoder.model.eval()
        if fold_bn:
            model = fold_conv_bn(model)
        model = model.to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        self._shape: tuple[int, ...] | None = None
        if compile:
            model = torch.compile(model)
        self.model = model
        pre = encoder.preprocess
        # Normalise raw 0..255 values directly: (x/255 - mean)/std == (x - 255·mean)/(255·std).
        self._mean = torch.tensor([255.0 * m for m in pre.mean], device=self.device).view(
            1, 3, 1, 1
        )
        self._std = torch.tensor([255.0 * s for s in pre.std], device=self.device).view(1, 3, 1, 1)
        self._amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def prepare(self, images: Any) -> Any:
        """uint8 (b, S, S, 3) → normalised float32 (b, 3, S, S) on the device."""
        x = images.to(self.device, non_blocking=True).permute(
            0, 3, 1, 2
        )  # (b, 3, S, S), NHWC strides
        if not self.channels_last:
            x = x.contiguous()
        return (x.float() - self._mean) / self._std

    def __call__(self, images: Any) -> np.ndarray:
        """Features of one batch as float32 (b, D)."""
        import torch

        b = len(images)
        if self.compiled and self._shape is not None and b < self._shape[0]:
            # A compiled model recompiles for every new shape: pad the last batch instead.
            pad = images.new_zeros((self._shape[0] - b, *images.shape[1:]))
            images = torch.cat([images, pad])
        elif self.compiled and (self._shape is None or b > self._shape[0]):
            self._shape = tuple(images.shape)
        with torch.inference_mode():
            x = self.prepare(images)
            if self._amp is not None:
                with torch.autocast(self.device.type, dtype=self._amp):
                    y = self.model(x)
            else:
                y = self.model(x)
            return y[:b].float().cpu().numpy()  # (b, D)

    def describe(self) -> dict[str, Any]:
        """Runtime settings recorded in bag attributes."""
        return {
            "device": self.device.type,
            "precision": self.precision,
            "channels_last": self.channels_last,
        }
