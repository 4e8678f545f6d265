"""Run an encoder fast and exactly: device, precision, channels-last, conv–BN folding.

Also the rules a CUDA run depends on (see docs/gpu.md): which precision ``auto`` picks on
the chosen GPU (:func:`auto_precision`), exact fp32 there (TF32 off, :func:`exact_fp32`),
how many CPUs this process may really use (:func:`usable_cpus`), and the refusal of
non-finite features before they are written (:func:`check_finite`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, SlideError
from wsi_mil.features.registry import Encoder

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: Compute capability from which a GPU has native bf16 (Ampere, sm_80); below it
#: ``torch.cuda.is_bf16_supported()`` may still say True, by emulation (V100, T4), slowly.
BF16_CAPABILITY = (8, 0)


class NonFiniteFeaturesError(SlideError):
    """An encoder gave NaN or Inf features for a patch (fp16 overflow, most often)."""


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the machine's cores, not the ones a SLURM job, a container
    or ``taskset`` grants; readers sized from it oversubscribe the allowed cores.

    Examples
    --------
    >>> 1 <= usable_cpus() <= (os.cpu_count() or 1)
    True
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def physical_gpu(index: int, visible: str | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` entry of this process's GPU ``index``.

    Under a scheduler that already restricts this process (SLURM's ``2,3``), index 0 is
    device ``2``: a child given only its own GPU keeps within the allocation.

    Examples
    --------
    >>> physical_gpu(1, "2,3"), physical_gpu(1, "")
    ('3', '1')
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[index] if index < len(ids) else str(index)


def _cgroup_quota(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    root = Path(root)
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        per = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / per if q > 0 and per > 0 else None
    except (OSError, ValueError):
        return None


def auto_precision(capability: tuple[int, int]) -> str:
    """``precision: auto`` on a GPU of this compute capability: native bf16, else fp16.

    Examples
    --------
    >>> auto_precision((9, 0)), auto_precision((7, 5))
    ('bf16', 'fp16')
    """
    return "bf16" if tuple(capability) >= BF16_CAPABILITY else "fp16"


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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} asked for but only {torch.cuda.device_count()} CUDA device(s) "
            "are visible (CUDA_VISIBLE_DEVICES)"
        )
    return dev


def resolve_precision(precision: str, device: Any) -> str:
    """The precision used on ``device``: exact fp32 on CPU; on a GPU as given, or for
    ``auto`` by that device's compute capability (:func:`auto_precision`)."""
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
    cap = tuple(torch.cuda.get_device_capability(device))
    if precision == "auto":
        return auto_precision(cap)
    if precision == "bf16" and cap < BF16_CAPABILITY:
        log.warning(
            "%s (compute capability %d.%d) has no native bf16: it is emulated and slow; "
            "fp16 or fp32 run faster there", device, *cap,
        )
    return precision


def exact_fp32() -> dict[str, bool]:
    """Turn TF32 off for matmuls and cuDNN convolutions, so fp32 on a GPU is IEEE fp32.

    Process-wide (torch keeps one flag per process). Returns the flags as set, for the
    bag's attributes.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return tf32_flags()


def tf32_flags() -> dict[str, bool]:
    """Whether TF32 is allowed now for CUDA matmuls and cuDNN convolutions."""
    import torch

    try:
        return {
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
        }
    except RuntimeError:  # flags set through torch's newer per-op API: read those
        return {
            "matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
            "cudnn": torch.backends.cudnn.conv.fp32_precision == "tf32",
        }


def check_finite(features: np.ndarray, sid: str, rows: np.ndarray, coords: np.ndarray | None = None) -> None:
    """Refuse NaN/Inf features before they are written.

    Parameters
    ----------
    features : ndarray
        (b, D) features of one batch.
    sid : str
        The slide id, for the message.
    rows : ndarray
        (b,) patch row of each feature row.
    coords : ndarray, optional
        (N, 2) the slide's patch coords, to name the patch's position too.

    Raises
    ------
    NonFiniteFeaturesError
        Naming the slide, the first bad patch row and a fix.

    Examples
    --------
    >>> check_finite(np.ones((2, 3), np.float32), "a", np.array([0, 1]))
    >>> check_finite(np.array([[1.0], [np.inf]]), "a", np.array([4, 7]))
    Traceback (most recent call last):
    ...
    wsi_mil.features.runtime.NonFiniteFeaturesError: a: patch row 7 gave non-finite features (inf); ...
    """
    bad = ~np.isfinite(features).all(axis=1)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    row = int(np.asarray(rows)[i])
    kind = "nan" if np.isnan(features[i]).any() else "inf"
    where = ""
    if coords is not None:
        x, y = (int(v) for v in np.asarray(coords)[row])
        where = f" at ({x}, {y})"
    raise NonFiniteFeaturesError(
        sid,
        f"patch row {row}{where} gave non-finite features ({kind}); {int(bad.sum())} of {len(bad)} rows "
        "in its batch: an fp16 overflow? extract with --precision bf16 or fp32",
    )


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
        self.tf32 = {"matmul": False, "cudnn": False}
        if self.device.type == "cuda":
            # fp32 means IEEE fp32: no TF32 matmuls or convolutions (torch allows cuDNN's).
            self.tf32 = exact_fp32() if self.precision == "fp32" else tf32_flags()
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
            "tf32": bool(self.tf32["matmul"] or self.tf32["cudnn"]),
        }


def feature_agreement(reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """How well ``features`` reproduce ``reference`` row by row (same patches, same order).

    Parameters
    ----------
    reference : ndarray
        (N, D) reference features, e.g. CPU fp32.
    features : ndarray
        (N, D) the features to check, e.g. GPU bf16, of the same N patches.

    Returns
    -------
    dict
        ``max_rel_l2``: the largest ‖f_i − r_i‖ / ‖r_i‖ over rows; ``own_row_share``: the
        share of rows closer (Euclidean) to their own reference row than to any other. A
        shuffle of the rows fails both; cosine similarity would not (random-weight CNN
        features of different patches have cosine ≈ 0.999).

    Examples
    --------
    >>> r = np.eye(3, dtype=np.float32) + 1.0
    >>> feature_agreement(r, r)
    {'max_rel_l2': 0.0, 'own_row_share': 1.0}
    >>> feature_agreement(r, r[[1, 2, 0]])["own_row_share"]
    0.0
    """
    ref = np.asarray(reference, np.float64)
    got = np.asarray(features, np.float64)
    if ref.shape != got.shape or ref.ndim != 2:
        raise ValueError(f"feature shapes differ or are not (N, D): {ref.shape} vs {got.shape}")
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)  # (N,)
    d2 = (got**2).sum(1)[:, None] + (ref**2).sum(1)[None, :] - 2.0 * got @ ref.T  # (N, N) squared distances
    own = np.diag(d2).copy()
    np.fill_diagonal(d2, np.inf)
    closer = own < d2.min(axis=1) if len(ref) > 1 else np.ones(len(ref), bool)
    return {"max_rel_l2": float(rel.max()) if len(rel) else 0.0, "own_row_share": float(closer.mean())}
