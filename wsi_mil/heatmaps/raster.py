"""Per-patch scores → a multiresolution score grid sampled at any output resolution.

The grid's cell is the largest square that tiles every patch exactly: ``gcd(patch size,
patch coordinates)`` in level-0 pixels — one patch per cell for a grid without overlap, 2
× 2 cells per patch at 50% overlap. Overlapping patches are combined per cell (mean or
max); Gaussian smoothing is normalised (``blur(value·weight) / blur(weight)``) so gaps do
not pull scores to zero. Each coarser mip level sums 2 × 2 cells, so a zoomed-out
rendering averages scores instead of picking one patch (no aliasing). Everything is a
pure function of arrays; the grid for 100,000 patches is a few MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsi_mil.errors import WsiMilError

#: Largest number of cells of the finest grid; coarser cells beyond it (coords rounded).
MAX_CELLS = 16_000_000
#: Finest cell, as a fraction of the patch side, for coordinates on no common grid.
MIN_CELLS_PER_PATCH = 16
#: Below this smoothed weight a cell has no value (far from every patch).
MIN_WEIGHT = 0.05


@dataclass
class ScoreGrid:
    """Scores on a mip pyramid of square cells over the slide's level-0 extent.

    Attributes
    ----------
    width, height : int
        The slide's level-0 size.
    unit : int
        Level-0 pixels per cell of mip 0.
    num, den : list of ndarray
        Per mip: sum of weight × score and sum of weight (float32, (h, w)).
    cov : list of ndarray
        Per mip: fraction of each cell covered by patches (before smoothing).
    """

    width: int
    height: int
    unit: int
    num: list[np.ndarray]
    den: list[np.ndarray]
    cov: list[np.ndarray]

    def sample(
        self,
        x0: float,
        y0: float,
        sx: float,
        sy: float,
        w: int,
        h: int,
        interpolation: str = "nearest",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a raster of ``w × h`` pixels, each ``sx × sy`` level-0 pixels.

        Parameters
        ----------
        x0, y0 : float
            Level-0 position of the raster's top-left corner.
        sx, sy : float
            Level-0 pixels per output pixel.
        w, h : int
            Output size.
        interpolation : str
            ``nearest`` or ``linear`` (between cell centres).

        Returns
        -------
        (ndarray, ndarray)
            (h, w) float32 scores (NaN = no score) and (h, w) bool patch coverage.
        """
        m = 0  # the coarsest mip whose cells are no larger than an output pixel
        while m + 1 < len(self.num) and self.unit * 2 ** (m + 1) <= min(sx, sy) * 1.001:
            m += 1
        cell = float(self.unit * 2**m)
        num, den, cov = self.num[m], self.den[m], self.cov[m]
        cx = (x0 + (np.arange(w, dtype=np.float64) + 0.5) * sx) / cell  # (w,) cell coords
        cy = (y0 + (np.arange(h, dtype=np.float64) + 0.5) * sy) / cell  # (h,)
        ix = np.clip(np.floor(cx).astype(np.intp), 0, num.shape[1] - 1)
        iy = np.clip(np.floor(cy).astype(np.intp), 0, num.shape[0] - 1)
        covered = cov.take(iy, 0).take(ix, 1) >= 0.5  # (h, w)
        if interpolation == "linear":
            import cv2

            mapx = np.broadcast_to((cx - 0.5).astype(np.float32)[None, :], (h, w))
            mapy = np.broadcast_to((cy - 0.5).astype(np.float32)[:, None], (h, w))
            mapx, mapy = np.ascontiguousarray(mapx), np.ascontiguousarray(mapy)
            n = cv2.remap(
                num, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            d = cv2.remap(
                den, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
        else:
            n = num.take(iy, 0).take(ix, 1)
            d = den.take(iy, 0).take(ix, 1)
        thr = MIN_WEIGHT * 4**m  # a mip-m cell sums the weights of 4**m finest cells
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(d > thr, n / np.maximum(d, 1e-12), np.nan).astype(np.float32)
        return values, covered


def grid_unit(coords: np.ndarray, patch_size_level0: int, width: int, height: int) -> int:
    """Cell side: gcd of the patch size and every coordinate, kept within memory bounds."""
    p = int(patch_size_level0)
    u = p
    if len(coords):
        u = math.gcd(p, int(np.gcd.reduce(np.asarray(coords, np.int64).reshape(-1))))
    u = max(u, max(1, p // MIN_CELLS_PER_PATCH))
    while math.ceil(width / u) * math.ceil(height / u) > MAX_CELLS:
        u *= 2
    return u


def build_grid(
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: int,
    width: int,
    height: int,
    *,
    combine: str = "mean",
    smooth_sigma_level0: float = 0.0,
) -> ScoreGrid:
    """Rasterise per-patch scores (patch squares, level-0) into a :class:`ScoreGrid`.

    Parameters
    ----------
    coords : ndarray
        (N, 2) level-0 top-left (x, y).
    values : ndarray
        (N,) scores, usually normalised to [0, 1].
    patch_size_level0 : int
        Patch side in level-0 pixels.
    width, height : int
        Slide level-0 size; patches beyond it are cut at the edge.
    combine : str
        ``mean`` or ``max`` of overlapping patches.
    smooth_sigma_level0 : float
        Gaussian σ in level-0 pixels (0 = none).

    Examples
    --------
    >>> g = build_grid(np.array([[0, 0], [256, 0]]), np.array([0.0, 1.0]), 256, 512, 256)
    >>> g.sample(0, 0, 256, 256, 2, 1)[0].tolist()
    [[0.0, 1.0]]
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)  # (N, 2)
    values = np.asarray(values, np.float64).reshape(-1)  # (N,)
    if len(coords) != len(values):
        raise WsiMilError(f"{len(coords)} patch coords but {len(values)} scores")
    u = grid_unit(coords, patch_size_level0, width, height)
    gh, gw = math.ceil(height / u), math.ceil(width / u)
    k = max(1, round(patch_size_level0 / u))  # cells per patch side
    cx = np.round(coords[:, 0] / u).astype(np.int64)
    cy = np.round(coords[:, 1] / u).astype(np.int64)
    size = gh * gw
    num = np.zeros(size, np.float64)
    den = np.zeros(size, np.float64)
    best = np.full(size, -np.inf) if combine == "max" else None
    for dy in range(k):
        for dx in range(k):
            x, y = cx + dx, cy + dy
            ok = (x >= 0) & (x < gw) & (y >= 0) & (y < gh)
            flat = (y[ok] * gw + x[ok]).astype(np.intp)
            den += np.bincount(flat, minlength=size)
            if best is not None:
                np.maximum.at(best, flat, values[ok])
            else:
                num += np.bincount(flat, weights=values[ok], minlength=size)
    cov = (den > 0).astype(np.float32).reshape(gh, gw)
    if best is not None:
        den = (den > 0).astype(np.float64)
        num = np.where(den > 0, best, 0.0)
    num32 = num.reshape(gh, gw).astype(np.float32)
    den32 = den.reshape(gh, gw).astype(np.float32)
    if smooth_sigma_level0 > 0:
        import cv2

        sigma = smooth_sigma_level0 / u
        num32 = cv2.GaussianBlur(num32, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
        den32 = cv2.GaussianBlur(den32, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    nums, dens, covs = [num32], [den32], [cov]
    while max(nums[-1].shape) > 1:
        nums.append(_sum2x2(nums[-1]))
        dens.append(_sum2x2(dens[-1]))
        covs.append(_sum2x2(covs[-1]) / 4.0)
    return ScoreGrid(int(width), int(height), u, nums, dens, covs)


def _sum2x2(a: np.ndarray) -> np.ndarray:
    """Sum of each 2 × 2 block (odd edges padded with zeros)."""
    h, w = a.shape
    a = np.pad(a, ((0, h % 2), (0, w % 2)))
    return a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).sum(axis=(1, 3), dtype=np.float32)
