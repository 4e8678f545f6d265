"""OpenSlide backend: every format OpenSlide reads (SVS, generic TIFF, NDPI, MRXS, DICOM, …)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slide.base import Mpp, Slide, slide_id_from_path
from wsi_mil.slide.formats import dicom_instance, is_dicom


def _import_openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SlideError("-", "openslide-python is not importable; pip install openslide-python openslide-bin") from exc
    return openslide


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide.

    OpenSlide's error state is sticky: after a failed read the handle is unusable, so
    :meth:`reopen` gives a fresh one.
    """

    backend_name = "openslide"
    read_ahead = 1  # OpenSlide handles are thread-safe and decode outside the GIL

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_source: str = "cli") -> None:
        super().__init__(path, mpp, mpp_source)
        self._open()

    def _open(self) -> None:
        openslide = _import_openslide()
        # A DICOM WSI is opened through one of its instances; OpenSlide reads the series.
        target = dicom_instance(self.path) if is_dicom(self.path) else self.path
        what = f"{self.path} ({target.name})" if target != self.path else str(self.path)
        kind = "a DICOM WSI" if is_dicom(self.path) else "a slide"
        try:
            self._osr = openslide.OpenSlide(str(target))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(slide_id_from_path(self.path), f"{what} is not {kind} OpenSlide can read") from exc
        except openslide.OpenSlideError as exc:
            reason = " ".join(str(exc).split())
            raise SlideError(slide_id_from_path(self.path), f"{what} is corrupt or truncated ({reason})") from exc

    def reopen(self) -> None:
        """Close and reopen the handle (clears OpenSlide's sticky error state)."""
        self.close()
        self._open()

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """Raw OpenSlide properties."""
        return dict(self._osr.properties)

    def _metadata_mpp(self) -> Mpp | None:
        props = self._osr.properties
        try:
            x = float(props["openslide.mpp-x"])
            y = float(props.get("openslide.mpp-y", x))
        except (KeyError, ValueError):
            return None
        if x <= 0 or y <= 0:
            return None
        return Mpp(x, y, "metadata:openslide.mpp-x")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        openslide = _import_openslide()
        try:
            rgba = np.asarray(
                self._osr.read_region((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
            )
        except openslide.OpenSlideError as exc:
            raise SlideError(self.slide_id, f"cannot read region {tuple(location)} of {self.path} ({exc})") from exc
        # Outside the slide OpenSlide returns transparent black; show it as white glass.
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def tile_height(self, level: int) -> int | None:
        value = self._osr.properties.get(f"openslide.level[{level}].tile-height")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None
