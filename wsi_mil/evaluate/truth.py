"""Ground truth from annotations: per-patch labels and the CAMELYON16 lesions.

Patch truth: a patch is positive (1) when at least :data:`POSITIVE_SHARE` of its area lies
inside the annotation, negative (0) when none of it does, and ignored (-1) in between.
Lesions follow the CAMELYON16 evaluation: the annotation is grown by 37.5 µm (half of
75 µm, about five tumour cells), holes are filled, connected regions (8-connected) are the
lesions, and a lesion whose major axis is under 275 µm (an isolated tumour cell cluster,
under 200 µm before growing) is neither to be found nor a false positive when found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_mil.evaluate.annotations import Annotation

#: Share of a patch inside the annotation that makes it positive.
POSITIVE_SHARE = 0.5
#: CAMELYON16: annotations grown by this many µm before lesions are labelled.
LESION_GROW_UM = 75.0 / 2
#: CAMELYON16: a grown lesion with a major axis under this (µm) is an isolated tumour cell cluster.
ITC_MAJOR_AXIS_UM = 275.0
#: Side of a lesion-map pixel (µm), about CAMELYON16's level 5 (0.243 µm × 32).
LESION_MAP_UM = 8.0
#: Largest lesion map (pixels); coarser pixels beyond it.
LESION_MAP_MAX = 16_000_000


def patch_labels(fractions: np.ndarray, positive_share: float = POSITIVE_SHARE) -> np.ndarray:
    """Per patch: 1 positive (share ≥ ``positive_share``), 0 negative (share 0), -1 ignored.

    Examples
    --------
    >>> patch_labels(np.array([0.0, 0.2, 0.5, 1.0])).tolist()
    [0, -1, 1, 1]
    """
    f = np.asarray(fractions, np.float64)
    return np.where(f >= positive_share, 1, np.where(f <= 0.0, 0, -1)).astype(np.int8)


def patch_fractions(annotation: Annotation, coords: np.ndarray, size: int) -> np.ndarray:
    """Share of each patch's area inside the annotation.

    Vector annotations: exact areas of intersection (shapely). Masks: the mask's pixels
    weighted by how much of each lies under the patch (the integral image, bilinear).

    Parameters
    ----------
    annotation : Annotation
        The slide's annotation.
    coords : ndarray
        (N, 2) level-0 top-left (x, y).
    size : int
        Patch side in level-0 pixels.

    Returns
    -------
    ndarray
        (N,) float64 in [0, 1].
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros(len(coords))
    if annotation.is_empty or not len(coords):
        return out
    if annotation.mask is not None:
        return _mask_fractions(annotation.mask, annotation.downsample, coords, size)
    import shapely

    geom = annotation.geometry
    shapely.prepare(geom)
    x, y = coords[:, 0], coords[:, 1]
    boxes = shapely.box(x, y, x + size, y + size)
    hit = shapely.intersects(geom, boxes)
    inside = hit & shapely.contains(geom, boxes)
    out[inside] = 1.0
    edge = hit & ~inside
    if edge.any():
        out[edge] = shapely.area(shapely.intersection(boxes[edge], geom)) / float(size * size)
    return np.clip(out, 0.0, 1.0)


def _mask_fractions(mask: np.ndarray, downsample: float, coords: np.ndarray, size: int) -> np.ndarray:
    """Area shares from a mask: its integral image is bilinear within each pixel, so exact."""
    import cv2
    from scipy.ndimage import map_coordinates

    h, w = mask.shape
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)  # (h + 1, w + 1)
    x0 = np.clip(coords[:, 0] / downsample, 0, w)
    y0 = np.clip(coords[:, 1] / downsample, 0, h)
    x1 = np.clip((coords[:, 0] + size) / downsample, 0, w)
    y1 = np.clip((coords[:, 1] + size) / downsample, 0, h)

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return map_coordinates(integral, [yy, xx], order=1, mode="nearest")

    area = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    return np.clip(area / (size / downsample) ** 2, 0.0, 1.0)


@dataclass
class LesionMap:
    """Lesions of one slide on a raster window, with the isolated-tumour-cell ones marked.

    Attributes
    ----------
    labels : ndarray
        (h, w) int32: 0 background, k the k-th lesion.
    unit : float
        Level-0 pixels per raster pixel.
    itc : frozenset of int
        Labels of lesions too small to count (major axis < 275 µm after growing).
    origin : (float, float)
        Level-0 (x, y) of the raster's top-left corner (the window around the annotation).
    """

    labels: np.ndarray
    unit: float
    itc: frozenset[int]
    origin: tuple[float, float] = (0.0, 0.0)

    @property
    def lesions(self) -> list[int]:
        """Labels of the lesions to be found (the ones that are not isolated tumour cells)."""
        return [k for k in range(1, int(self.labels.max(initial=0)) + 1) if k not in self.itc]

    def lookup(self, points: np.ndarray) -> np.ndarray:
        """Lesion label under each level-0 (x, y) point (0 outside every lesion)."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        out = np.zeros(len(pts), np.int32)
        if not pts.size or not self.labels.size:
            return out
        ix = np.floor((pts[:, 0] - self.origin[0]) / self.unit).astype(np.intp)
        iy = np.floor((pts[:, 1] - self.origin[1]) / self.unit).astype(np.intp)
        h, w = self.labels.shape
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)  # off the map: in no lesion
        out[inside] = self.labels[iy[inside], ix[inside]]
        return out


def _rasterise(annotation: Annotation, mpp: float) -> tuple[np.ndarray, float, tuple[float, float]]:
    """The positive area on a raster window around it (grown lesions fit inside), of about
    :data:`LESION_MAP_UM` per pixel: (h, w) bool, level-0 pixels per pixel, level-0 origin."""
    margin_um = LESION_GROW_UM + 2 * LESION_MAP_UM
    if annotation.mask is not None:
        d = annotation.downsample
        rows, cols = np.nonzero(annotation.mask)
        m = math.ceil(margin_um / (d * mpp))
        r0, c0 = max(0, rows.min() - m), max(0, cols.min() - m)
        window = np.zeros((rows.max() + m + 1 - r0, cols.max() + m + 1 - c0), bool)
        window[rows - r0, cols - c0] = True
        return window, d, (c0 * d, r0 * d)
    from wsi_mil.heatmaps.clip import rasterise_polygons

    minx, miny, maxx, maxy = annotation.geometry.bounds
    margin = margin_um / mpp
    x0, y0 = math.floor(minx - margin), math.floor(miny - margin)
    w, h = math.ceil(maxx + margin) - x0, math.ceil(maxy + margin) - y0
    unit = max(1.0, LESION_MAP_UM / mpp, math.sqrt(w * h / LESION_MAP_MAX))
    polys = list(getattr(annotation.geometry, "geoms", [annotation.geometry]))
    # Larger polygons first: one lying in another's hole is drawn after the hole is cut.
    rings = [
        [np.asarray(r.coords) - (x0, y0) for r in (p.exterior, *p.interiors)]
        for p in sorted(polys, key=lambda p: -p.area)
        if not p.is_empty
    ]
    raster = rasterise_polygons(rings, w, h, max_side=max(1, math.ceil(max(w, h) / unit)))
    return raster.mask, raster.unit, (float(x0), float(y0))


def lesion_map(annotation: Annotation, mpp: float) -> LesionMap:
    """The CAMELYON16 lesions of an annotation (see the module docstring).

    Parameters
    ----------
    annotation : Annotation
        The slide's annotation (empty: no lesion).
    mpp : float
        µm per level-0 pixel.
    """
    import cv2
    from scipy import ndimage
    from skimage import measure

    if annotation.is_empty:
        return LesionMap(np.zeros((0, 0), np.int32), 1.0, frozenset())
    mask, unit, origin = _rasterise(annotation, mpp)
    um_per_px = unit * mpp
    # Exact Euclidean distance of each pixel to the nearest positive one (OpenCV's is fast).
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    grown = dist * um_per_px < LESION_GROW_UM
    labels = measure.label(ndimage.binary_fill_holes(grown), connectivity=2).astype(np.int32)
    itc = frozenset(
        int(r.label) for r in measure.regionprops(labels) if r.axis_major_length * um_per_px < ITC_MAJOR_AXIS_UM
    )
    return LesionMap(labels, float(unit), itc, origin)
