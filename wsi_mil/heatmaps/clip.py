"""Tissue mask for clipping overlays: ``masks/<id>.geojson`` polygons rasterised once."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.errors import WsiMilError

#: Longest side of the rasterised tissue mask.
MASK_MAX = 4096


@dataclass
class TissueMask:
    """A binary tissue mask; ``unit`` level-0 pixels per mask pixel."""

    mask: np.ndarray  # (h, w) bool
    unit: float

    def sample(self, x0: float, y0: float, sx: float, sy: float, w: int, h: int) -> np.ndarray:
        """(h, w) bool: tissue at the raster's pixel centres (arguments as ``ScoreGrid.sample``)."""
        ix = np.floor((x0 + (np.arange(w) + 0.5) * sx) / self.unit).astype(np.intp)
        iy = np.floor((y0 + (np.arange(h) + 0.5) * sy) / self.unit).astype(np.intp)
        ix = np.clip(ix, 0, self.mask.shape[1] - 1)
        iy = np.clip(iy, 0, self.mask.shape[0] - 1)
        return self.mask.take(iy, 0).take(ix, 1)


def rasterise_polygons(
    polygons: list[list[np.ndarray]], width: int, height: int, max_side: int = MASK_MAX
) -> TissueMask:
    """Fill polygons (each ``[exterior, *holes]``, level-0 rings) into a :class:`TissueMask`.

    Examples
    --------
    >>> sq = np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float)
    >>> round(float(rasterise_polygons([[sq]], 200, 100).mask.mean()), 2)  # half the slide, edge pixels in
    0.51
    """
    import cv2

    unit = max(1.0, max(width, height) / max_side)
    shape = (max(1, math.ceil(height / unit)), max(1, math.ceil(width / unit)))
    mask = np.zeros(shape, np.uint8)
    for rings in polygons:
        if not rings:
            continue
        # Pixel centres inside the ring: shift by half a pixel, 4 bits of sub-pixel precision.
        pts = [
            np.round((np.asarray(r, np.float64) / unit - 0.5) * 16).astype(np.int32) for r in rings
        ]
        cv2.fillPoly(mask, [pts[0]], 1, lineType=cv2.LINE_8, shift=4)
        if len(pts) > 1:
            cv2.fillPoly(mask, pts[1:], 0, lineType=cv2.LINE_8, shift=4)
    return TissueMask(mask.astype(bool), unit)


def read_tissue_polygons(path: str | os.PathLike[str]) -> list[list[np.ndarray]]:
    """Polygons (``[exterior, *holes]``) of a GeoJSON FeatureCollection (``masks/<id>.geojson``)."""
    path = Path(path)
    try:
        collection = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WsiMilError(f"{path}: not a readable tissue GeoJSON ({' '.join(str(exc).split())})") from exc
    out: list[list[np.ndarray]] = []
    try:
        for feature in collection.get("features") or []:
            _collect(feature.get("geometry") or {}, out)
    except (AttributeError, TypeError, KeyError, ValueError, RecursionError) as exc:
        raise WsiMilError(f"{path}: not a GeoJSON FeatureCollection of polygons ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())}); export the mask again") from exc
    return out


def _collect(geom: dict, out: list[list[np.ndarray]]) -> None:
    """Polygons of a geometry; a GeometryCollection (shapely's ``make_valid``) is walked."""
    kind = geom.get("type")
    if kind == "Polygon":
        parts = [geom["coordinates"]]
    elif kind == "MultiPolygon":
        parts = geom["coordinates"]
    elif kind == "GeometryCollection":
        for sub in geom.get("geometries", []):
            _collect(sub, out)
        return
    else:  # lines and points enclose no tissue
        return
    for rings in parts:
        out.append([np.asarray(r, np.float64).reshape(-1, 2) for r in rings])
