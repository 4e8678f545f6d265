"""tiffslide backend: pure-Python TIFF reading via tifffile, with a zarr view of each level."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.slide.base import Mpp, Slide, slide_id_from_path
from wsi_mil.slide.formats import quiet_tifffile


class TiffSlideSlide(Slide):
    """A slide read through tiffslide (fallback backend; no native library needed)."""

    backend_name = "tiffslide"

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_source: str = "cli") -> None:
        super().__init__(path, mpp, mpp_source)
        import tiffslide

        try:
            with quiet_tifffile():  # a damaged file is reported once, in the error below
                self._ts = tiffslide.TiffSlide(str(self.path))
                self._ts.level_dimensions  # noqa: B018 - force parsing now, not at first read
                self._ts.properties  # noqa: B018
        except Exception as exc:  # tifffile raises many types for bad files
            reason = " ".join(str(exc).split())
            raise SlideError(
                slide_id_from_path(self.path), f"{self.path} is not a slide tiffslide can read ({reason})"
            ) from exc

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._ts.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._ts.level_downsamples)

    @property
    def properties(self) -> dict[str, Any]:
        """Raw tiffslide properties."""
        return dict(self._ts.properties)

    def _metadata_mpp(self) -> Mpp | None:
        # OME-TIFF: the OME-XML's PhysicalSizeX/Y is the pixel size (the resolution tags,
        # if any, are a writer's courtesy; tiffslide does not read the XML).
        ome = _ome_mpp(self._ts.ts_tifffile, int(self._ts.properties.get("tiffslide.series-index") or 0))
        if ome is not None:
            return ome
        props = self._ts.properties
        x, y = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
        if x is None or float(x) <= 0:
            return None
        return Mpp(float(x), float(y or x), "metadata:tiffslide.mpp-x")

    def zarr_level(self, level: int) -> Any:
        """The zarr array (h, w, 3) of one pyramid level (cheap random access)."""
        group = self._ts.zarr_group
        # A group of levels "0", "1", ...; older tiffslide gave a bare array for one level.
        return group[str(level)] if hasattr(group, "keys") else group

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x0, y0 = int(location[0]), int(location[1])
        ds = self.level_downsamples[level]

        def read(cx0: int, cy0: int, cx1: int, cy1: int) -> np.ndarray:
            try:
                arr = self._ts.read_region((int(cx0 * ds), int(cy0 * ds)), level, (cx1 - cx0, cy1 - cy0), as_array=True)
            except Exception as exc:
                raise SlideError(self.slide_id, f"cannot read region {(x0, y0)} of {self.path} ({exc})") from exc
            return np.asarray(arr)[..., :3]

        return _clipped((int(x0 / ds), int(y0 / ds)), size, self.level_dimensions[level], read)

    def tile_height(self, level: int) -> int | None:
        value = self._ts.properties.get(f"tiffslide.level[{level}].tile-height")
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    def read_level_pixels(self, level: int, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        lx, ly = int(location[0]), int(location[1])

        def read(cx0: int, cy0: int, cx1: int, cy1: int) -> np.ndarray:
            try:
                return np.asarray(self.zarr_level(level)[cy0:cy1, cx0:cx1])[..., :3]
            except Exception as exc:
                raise SlideError(
                    self.slide_id, f"cannot read level {level} at {(lx, ly)} of {self.path} ({exc})"
                ) from exc

        return _clipped((lx, ly), size, self.level_dimensions[level], read)

    def close(self) -> None:
        ts = getattr(self, "_ts", None)
        if ts is not None:
            ts.close()
            self._ts = None


def _clipped(
    location: tuple[int, int],
    size: tuple[int, int],
    level_dim: tuple[int, int],
    read: Callable[[int, int, int, int], np.ndarray],
) -> np.ndarray:
    """A (h, w, 3) region at level coordinates ``location``: ``read(x0, y0, x1, y1)`` of the part
    inside the level, padded with white like OpenSlide's transparent background."""
    lx, ly = int(location[0]), int(location[1])
    w, h = int(size[0]), int(size[1])
    cx0, cy0 = max(lx, 0), max(ly, 0)
    cx1, cy1 = min(lx + w, level_dim[0]), min(ly + h, level_dim[1])
    out = np.full((h, w, 3), 255, np.uint8)
    if cx1 <= cx0 or cy1 <= cy0:
        return out
    arr = read(cx0, cy0, cx1, cy1)
    out[cy0 - ly : cy0 - ly + arr.shape[0], cx0 - lx : cx0 - lx + arr.shape[1]] = arr
    return out


#: µm per unit of OME's PhysicalSize units (the OME default is µm).
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _ome_mpp(tif: Any, series_index: int) -> Mpp | None:
    """Pixel size of the OME image read as the slide, from the file's OME-XML (None if absent).

    Examples
    --------
    >>> _ome_mpp(None, 0) is None
    True
    """
    xml = getattr(tif, "ome_metadata", None) if tif is not None and getattr(tif, "is_ome", False) else None
    if not xml:
        return None
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    images = [el for el in root if el.tag.rsplit("}", 1)[-1] == "Image"]
    if series_index >= len(images):
        return None
    pixels = next((el for el in images[series_index] if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    try:
        x = float(pixels.get("PhysicalSizeX", "")) * _OME_UNITS_UM[pixels.get("PhysicalSizeXUnit", "µm")]
        y = float(pixels.get("PhysicalSizeY", pixels.get("PhysicalSizeX", ""))) * _OME_UNITS_UM[
            pixels.get("PhysicalSizeYUnit", pixels.get("PhysicalSizeXUnit", "µm"))
        ]
    except (KeyError, ValueError):
        return None
    if not (x > 0 and y > 0):
        return None
    return Mpp(x, y, "metadata:ome.PhysicalSizeX")
