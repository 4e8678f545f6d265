"""Slide readers: one abstract :class:`Slide`, one module per backend, picked by name."""

from __future__ import annotations

import importlib
from pathlib import Path

from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.slide.base import Mpp, Slide, slide_id_from_path

__all__ = ["Mpp", "Slide", "list_backends", "open_slide", "register_backend", "slide_id_from_path"]

# name -> "module:Class"; imported lazily so `import wsi_mil.slide` loads no native library.
_BACKENDS: dict[str, str] = {
    "openslide": "wsi_mil.slide.openslide_backend:OpenSlideSlide",
    "tiffslide": "wsi_mil.slide.tiffslide_backend:TiffSlideSlide",
}

#: Extensions treated as slides when a folder is given.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
    ".bif", ".dcm", ".czi",
)


def register_backend(name: str, target: str | type[Slide]) -> None:
    """Register a backend under ``name`` (a :class:`Slide` subclass or ``"module:Class"``)."""
    _BACKENDS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def list_backends() -> list[str]:
    """Names accepted by :func:`open_slide`."""
    return sorted(_BACKENDS)


def open_slide(
    path: str | Path, backend: str = "openslide", mpp: float | None = None, mpp_source: str = "cli"
) -> Slide:
    """Open a slide with the named backend.

    Parameters
    ----------
    path : path-like
        Slide file.
    backend : str
        One of :func:`list_backends` (``"openslide"`` default, ``"tiffslide"`` fallback).
    mpp : float, optional
        Level-0 µm/px override (else the file's metadata, else an error on use).
    mpp_source : str
        Recorded origin of the override (``"cli"`` or ``"csv"``).

    Examples
    --------
    >>> with open_slide("slide.tif", backend="tiffslide") as s:  # doctest: +SKIP
    ...     s.dimensions
    """
    path = Path(path)
    sid = slide_id_from_path(path)
    if backend not in _BACKENDS:
        raise WsiMilError(f"unknown slide backend {backend!r}; choose one of {', '.join(list_backends())}")
    if not path.exists():
        raise SlideError(sid, f"{path} does not exist")
    if path.is_dir() and path.suffix.lower() not in (".zarr",):
        raise SlideError(sid, f"{path} is a folder, not a slide file")
    module_name, cls_name = _BACKENDS[backend].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(path, mpp=mpp, mpp_source=mpp_source)
