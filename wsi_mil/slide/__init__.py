"""Slide readers: one abstract :class:`Slide`, one module per backend, picked by name."""

from __future__ import annotations

import importlib
from pathlib import Path

from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.slide.base import Mpp, Slide, slide_id_from_path
from wsi_mil.slide.formats import (
    SLIDE_EXTENSIONS,
    as_slide_path,
    auto_backends,
    is_dicom,
    slides_in_folder,
    tiff_layout,
)

__all__ = [
    "AUTO", "SLIDE_EXTENSIONS", "Mpp", "Slide", "as_slide_path", "list_backends", "open_slide", "register_backend",
    "slide_id_from_path", "slides_in_folder",
]

#: The backend name that picks, per slide, the first reader that opens it.
AUTO = "auto"

# name -> "module:Class"; imported lazily so `import wsi_mil.slide` loads no native library.
_BACKENDS: dict[str, str] = {
    "openslide": "wsi_mil.slide.openslide_backend:OpenSlideSlide",
    "tiffslide": "wsi_mil.slide.tiffslide_backend:TiffSlideSlide",
}


def register_backend(name: str, target: str | type[Slide]) -> None:
    """Register a backend under ``name`` (a :class:`Slide` subclass or ``"module:Class"``)."""
    _BACKENDS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def list_backends() -> list[str]:
    """The registered readers; :func:`open_slide` also takes ``"auto"`` (the first that opens the file)."""
    return sorted(_BACKENDS)


def open_slide(
    path: str | Path, backend: str = "auto", mpp: float | None = None, mpp_source: str = "cli"
) -> Slide:
    """Open a slide with the named backend, or with the first that reads it (``"auto"``).

    Parameters
    ----------
    path : path-like
        Slide file, or a DICOM WSI: its folder or any one of its ``.dcm`` files.
    backend : str
        ``"auto"`` (default: the readers of :func:`~wsi_mil.slide.formats.auto_backends`
        in turn; the slide's :attr:`~Slide.backend_name` says which opened it) or one of
        :func:`list_backends`.
    mpp : float, optional
        Level-0 µm/px override (else the file's metadata, else an error on use).
    mpp_source : str
        Recorded origin of the override (``"cli"`` or ``"csv"``).

    Raises
    ------
    SlideError
        The path is missing, or no reader opens it (one line naming the file and each
        reader's reason).

    Examples
    --------
    >>> with open_slide("slide.ome.tif") as s:  # doctest: +SKIP
    ...     s.backend_name, s.dimensions
    ('tiffslide', (8192, 6144))
    """
    path = Path(path)
    sid = slide_id_from_path(path)
    if backend != AUTO and backend not in _BACKENDS:
        raise WsiMilError(f"unknown slide backend {backend!r}; choose one of {', '.join([AUTO, *list_backends()])}")
    if not path.exists():
        raise SlideError(sid, f"{path} does not exist")
    dicom = is_dicom(path)
    if path.is_dir() and not dicom and path.suffix.lower() not in (".zarr",):
        raise SlideError(sid, f"{path} is a folder, not a slide file (nor a DICOM WSI folder of .dcm files)")
    layout, problem = (None, None) if dicom else tiff_layout(path)
    if problem:  # every reader would open it and then decode garbage or fail mid-slide
        raise SlideError(sid, f"{path} is {problem}")
    if backend != AUTO:
        if dicom and backend == "tiffslide":
            raise SlideError(sid, f"{path} is DICOM, which tiffslide does not read; use --backend openslide or auto")
        return _backend_class(backend)(path, mpp=mpp, mpp_source=mpp_source)
    names = auto_backends(path, layout)
    errors: list[SlideError] = []
    for name in names:
        try:
            return _backend_class(name)(path, mpp=mpp, mpp_source=mpp_source)
        except SlideError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    reasons = "; ".join(f"{n}: {_one_line(e.reason)}" for n, e in zip(names, errors, strict=True))
    raise SlideError(sid, f"no slide reader opens {path} ({reasons})") from errors[-1]


def _backend_class(name: str) -> type[Slide]:
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
