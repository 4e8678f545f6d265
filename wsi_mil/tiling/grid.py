"""Pure patch-grid geometry: no I/O, only numbers and arrays (tested with hypothesis)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchGeometry:
    """How one patch of ``target_size`` px at ``target_mpp`` maps onto a slide.

    Attributes
    ----------
    size_level0 : int
        Patch side in level-0 pixels.
    level : int
        Pyramid level to read from (the coarsest not coarser than the target).
    size_at_level : int
        Patch side in pixels of ``level`` — what ``read_region`` is asked for.
    level_downsample : float
        Downsample of ``level``.
    stride_level0 : int
        Grid step in level-0 pixels (``size_level0 * (1 - overlap)``).
    """

    target_size: int
    target_mpp: float
    slide_mpp: float
    size_level0: int
    level: int
    size_at_level: int
    level_downsample: float
    stride_level0: int


def best_level(level_downsamples: Sequence[float], downsample: float) -> int:
    """Coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= downsample * 1.01:
            best = i
    return best


def patch_geometry(
    slide_mpp: float,
    target_mpp: float,
    target_size: int,
    level_downsamples: Sequence[float],
    overlap: float = 0.0,
) -> PatchGeometry:
    """Patch geometry for a slide of ``slide_mpp`` µm/px.

    Parameters
    ----------
    slide_mpp : float
        Level-0 µm/px.
    target_mpp : float
        µm/px of the patches fed to the encoder (0.5 ≈ 20×).
    target_size : int
        Patch side in pixels at ``target_mpp``.
    level_downsamples : sequence of float
        The slide's pyramid.
    overlap : float
        Fraction of a patch shared with its neighbour, in [0, 1).

    Examples
    --------
    >>> g = patch_geometry(0.25, 0.5, 256, [1.0, 4.0, 16.0])
    >>> g.size_level0, g.level, g.size_at_level
    (512, 0, 512)
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if slide_mpp <= 0 or target_mpp <= 0 or target_size <= 0:
        raise ValueError("mpp and patch size must be positive")
    downsample = target_mpp / slide_mpp
    size_level0 = max(1, int(round(target_size * downsample)))
    level = best_level(level_downsamples, downsample)
    level_ds = float(level_downsamples[level])
    size_at_level = max(1, int(round(size_level0 / level_ds)))
    stride = max(1, int(round(size_level0 * (1.0 - overlap))))
    return PatchGeometry(target_size, target_mpp, slide_mpp, size_level0, level, size_at_level, level_ds, stride)


def grid_coords(width: int, height: int, size: int, stride: int,
                bbox: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Top-left corners of a regular grid anchored at (0, 0), patches fully inside the slide.

    Parameters
    ----------
    width, height : int
        Level-0 slide size.
    size, stride : int
        Patch side and step, level-0 pixels.
    bbox : (x0, y0, x1, y1), optional
        Only patches intersecting this box are returned (the grid stays anchored at 0).

    Returns
    -------
    ndarray
        (N, 2) int64 (x, y), row-major (y, then x).
    """
    if width < size or height < size:
        return np.empty((0, 2), np.int64)
    nx = (width - size) // stride + 1
    ny = (height - size) // stride + 1
    ix0, iy0, ix1, iy1 = 0, 0, nx, ny
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        ix0 = max(0, math.floor((x0 - size) / stride) + 1)
        iy0 = max(0, math.floor((y0 - size) / stride) + 1)
        ix1 = min(nx, math.ceil(x1 / stride))
        iy1 = min(ny, math.ceil(y1 / stride))
        if ix1 <= ix0 or iy1 <= iy0:
            return np.empty((0, 2), np.int64)
    xs = np.arange(ix0, ix1, dtype=np.int64) * stride
    ys = np.arange(iy0, iy1, dtype=np.int64) * stride
    gx, gy = np.meshgrid(xs, ys)  # (ny, nx) each
    return np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2)


def box_fractions(mask: np.ndarray, scale: float, coords: np.ndarray, size: int) -> np.ndarray:
    """Exact share of each level-0 square covered by a binary mask of ``scale`` px/px.

    The mask is piecewise constant over its pixels; the integral image is interpolated
    bilinearly at the square's (fractional) corners, which gives the exact covered area.

    Parameters
    ----------
    mask : ndarray
        (h, w) bool/0-1 mask; pixel (i, j) covers level-0 [j*scale, (j+1)*scale).
    scale : float
        Level-0 pixels per mask pixel.
    coords : ndarray
        (N, 2) level-0 (x, y) top-left corners.
    size : int
        Square side in level-0 pixels.

    Returns
    -------
    ndarray
        (N,) float64 in [0, 1].
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return np.empty(0)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # Integral of the mask over [0, x) × [0, y) in mask pixels, bilinear in x and y.
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        i00 = integral[y0, x0]
        i01 = integral[y0, x0 + 1]
        i10 = integral[y0 + 1, x0]
        i11 = integral[y0 + 1, x0 + 1]
        return i00 * (1 - fx) * (1 - fy) + i01 * fx * (1 - fy) + i10 * (1 - fx) * fy + i11 * fx * fy

    x0 = coords[:, 0] / scale
    y0 = coords[:, 1] / scale
    x1 = (coords[:, 0] + size) / scale
    y1 = (coords[:, 1] + size) / scale
    covered = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    area = (size / scale) ** 2
    return np.clip(covered / area, 0.0, 1.0)
