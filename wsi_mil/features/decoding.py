"""Where and at which sizes patches are decoded: reader processes or the GPU, one read for every size.

``decode: cpu`` decodes in the DataLoader's reader processes; ``gpu`` hands the slide's
JPEG tiles to the CUDA device (:mod:`wsi_mil.features.gpu_decode`); ``auto`` takes the GPU
where the device is CUDA and the slide's level allows it. When encoders with different
input sizes share one read, :class:`MultiSizeStream` resizes each patch, as read, to every
size in the reader process — with the reader's own filter, so each size is exactly what a
single-size read would give — and :func:`resize_on_device` does the same on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_mil.errors import ConfigError, SlideError

if TYPE_CHECKING:
    from wsi_mil.features.reader import PatchStream

#: ``ExtractConfig.decode`` values.
DECODES = ("cpu", "gpu", "auto")


def _gpu_decode_module() -> Any:
    try:
        from wsi_mil.features import gpu_decode
    except ImportError:
        return None
    return gpu_decode


def check_decode(decode: str, device: Any) -> None:
    """Refuse, before any slide runs, a ``decode`` that no slide could use on ``device``.

    Raises
    ------
    ConfigError
        ``decode`` is unknown, or ``gpu`` without a CUDA device or GPU decoding installed.
    """
    if decode not in DECODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode != "gpu":
        return
    if getattr(device, "type", str(device)) != "cuda":
        raise ConfigError("decode gpu needs a CUDA device; use decode cpu (or auto)")
    if _gpu_decode_module() is None:
        raise ConfigError("decode gpu not available in this install; use decode cpu (or auto)")


def resolve_decode(decode: str, device: Any, slide_id: str, slide_path: str, level: int) -> str:
    """Where this slide's patches are decoded: ``"cpu"`` (reader processes) or ``"gpu"``.

    ``auto`` is the GPU on a CUDA device when the slide's tiles can be decoded there.

    Raises
    ------
    ConfigError
        As :func:`check_decode`.
    SlideError
        ``gpu`` asked for and this slide's level cannot be decoded on the GPU.
    """
    check_decode(decode, device)
    if decode == "cpu":
        return "cpu"
    mod = _gpu_decode_module()
    cuda = getattr(device, "type", str(device)) == "cuda"
    ok = cuda and mod is not None and bool(mod.gpu_decode_supported(slide_path, level))
    if decode == "gpu" and not ok:
        raise SlideError(
            slide_id,
            f"decode gpu: level {level} of {slide_path} cannot be decoded on the GPU (not JPEG-tiled); "
            "use decode auto or cpu",
        )
    return "gpu" if ok else "cpu"


class MultiSizeStream:
    """A :class:`~wsi_mil.features.reader.PatchStream` read at one size, handed over at several.

    Iterating yields ``({size: images (b, size, size, 3) uint8}, rows, failed)``; each
    size is resized from the patch as read, in the process that read it (a DataLoader
    worker), with the reader's own filter — exactly as a single-size stream resizes.
    """

    def __init__(self, stream: PatchStream, sizes: Sequence[int]) -> None:
        self.stream = stream
        self.sizes = tuple(sizes)
        self.plan, self.groups = stream.plan, stream.groups

    def open(self) -> None:
        """Open this process's slide handle (``worker_init_fn``)."""
        self.stream.open()

    def __iter__(self) -> Iterator[tuple[dict[int, Any], Any, Any]]:
        import torch

        from wsi_mil.features.reader import _resize

        for images, rows, failed in self.stream:
            arr = images.numpy()  # (b, R, R, 3) as read
            out: dict[int, Any] = {}
            for s in self.sizes:
                if s == arr.shape[1]:
                    out[s] = images
                elif len(arr):
                    out[s] = torch.from_numpy(np.stack([_resize(a, s) for a in arr]))
                else:
                    out[s] = torch.empty((0, s, s, 3), dtype=torch.uint8)
            yield out, rows, failed


def resize_on_device(images: Any, size: int) -> Any:
    """uint8 (b, R, R, 3) on the GPU → (b, size, size, 3), antialiased bilinear."""
    import torch.nn.functional as F

    if images.shape[1] == size:
        return images
    x = images.permute(0, 3, 1, 2).float()  # (b, 3, R, R)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(images.dtype).permute(0, 2, 3, 1)  # (b, size, size, 3)
