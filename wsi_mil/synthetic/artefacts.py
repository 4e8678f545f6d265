"""Blur and fold artefacts for synthetic slides, with their ground-truth masks.

* **Blur**: an out-of-focus region: the rendered tissue there is Gaussian-blurred with a
  physical sigma (:attr:`SyntheticSpec.blur_sigma_um`, default 2.5 µm = 5 px at 0.5 µm/px,
  far beyond the depth of field of a 20× objective).
* **Fold**: a band where the section lies on itself, two layers thick. Under Beer–Lambert
  the transmittance of a double layer is the square of a single one, so every stain's
  optical density doubles: darker and more saturated than the tissue around it.

Both are drawn from their own random generator, so the tissue, tumour and pen of a slide
are the same with and without artefacts, and a spec without artefacts draws nothing here
(its slide stays byte-identical).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wsi_mil.synthetic.slides import SyntheticSpec

#: Renders the RGB tile (h, w, 3) of a level (downsample, x0, y0, w, h, rng).
RenderFn = Callable[[float, int, int, int, int, np.random.Generator], np.ndarray]


@dataclass
class ArtefactFields:
    """Artefact masks on the truth grid: ``blur`` and ``fold`` bool (h, w), both within tissue."""

    blur: np.ndarray
    fold: np.ndarray
    downsample: int
    sigma_um: float
    mpp: float

    def __post_init__(self) -> None:
        # Float copies interpolated per pixel: soft edges about one truth cell wide.
        self._blur_f = self.blur.astype(np.float32)
        self._fold_f = self.fold.astype(np.float32)


def artefact_masks(spec: SyntheticSpec, tissue_f: np.ndarray) -> ArtefactFields | None:
    """Blur regions and fold bands inside the tissue field, or None if the spec asks for none.

    Parameters
    ----------
    spec : SyntheticSpec
        ``blur`` regions and ``folds`` bands, ``artefact_scale`` their size.
    tissue_f : ndarray
        The tissue field on the truth grid (tissue where > 0).

    Examples
    --------
    >>> from wsi_mil.synthetic.slides import SyntheticSpec
    >>> art = artefact_masks(SyntheticSpec(blur=1), np.ones((60, 80), np.float32))
    >>> bool(art.blur.any()), bool(art.fold.any())
    (True, False)
    """
    import cv2

    if spec.blur <= 0 and spec.folds <= 0:
        return None
    rng = np.random.default_rng((spec.seed, 7919))  # not the tissue's generator
    tissue = tissue_f > 0
    inside = np.argwhere(tissue_f > 0.15)
    if not len(inside):
        inside = np.argwhere(tissue)
    shape = tissue.shape
    side = min(shape)
    blur = np.zeros(shape, np.uint8)
    fold = np.zeros(shape, np.uint8)
    if len(inside):
        for _ in range(spec.blur):
            cy, cx = inside[rng.integers(len(inside))]
            rx = max(2, int(spec.artefact_scale * side * rng.uniform(0.8, 1.2)))
            ry = max(2, int(rx * rng.uniform(0.6, 1.0)))
            cv2.ellipse(blur, (int(cx), int(cy)), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        for _ in range(spec.folds):
            cy, cx = inside[rng.integers(len(inside))]
            th = rng.uniform(0, np.pi)
            half = 2.0 * spec.artefact_scale * side
            dx, dy = math.cos(th) * half, math.sin(th) * half
            thick = max(2, int(round(0.5 * spec.artefact_scale * side)))
            cv2.line(fold, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1, thick)
    return ArtefactFields(blur=(blur > 0) & tissue, fold=(fold > 0) & tissue, downsample=spec.truth_downsample,
                          sigma_um=spec.blur_sigma_um, mpp=spec.mpp or 0.5)


def _sample(field: np.ndarray, d: int, ds: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """``field`` (truth grid) interpolated at the pixel centres of a tile of level ``ds``."""
    import cv2

    gx = ((np.arange(w, dtype=np.float32) + x0 + 0.5) * ds / d - 0.5)[None, :].repeat(h, 0)
    gy = ((np.arange(h, dtype=np.float32) + y0 + 0.5) * ds / d - 0.5)[:, None].repeat(w, 1)
    return cv2.remap(field, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _touches(mask: np.ndarray, d: int, ds: float, x0: int, y0: int, w: int, h: int) -> bool:
    gx0, gy0 = max(int(x0 * ds / d) - 1, 0), max(int(y0 * ds / d) - 1, 0)
    gx1, gy1 = math.ceil((x0 + w) * ds / d) + 1, math.ceil((y0 + h) * ds / d) + 1
    return bool(mask[gy0:gy1, gx0:gx1].any())


def apply_artefacts(
    art: ArtefactFields,
    rgb: np.ndarray,
    ds: float,
    x0: int,
    y0: int,
    render: RenderFn,
    seed: tuple[int, ...],
) -> np.ndarray:
    """Draw blur and folds onto a rendered tile (h, w, 3) of the level with downsample ``ds``.

    ``render`` draws a larger, clean tile around it (the blur needs a margin) with a
    generator seeded from ``seed``.
    """
    import cv2

    h, w = rgb.shape[:2]
    d = art.downsample
    out = rgb
    if _touches(art.blur, d, ds, x0, y0, w, h):
        sigma = art.sigma_um / (ds * art.mpp)  # blur sigma in pixels of this level
        if sigma >= 0.3:
            m = int(math.ceil(3 * sigma))
            wide = render(ds, x0 - m, y0 - m, w + 2 * m, h + 2 * m, np.random.default_rng((*seed, 1)))
            soft = cv2.GaussianBlur(wide.astype(np.float32), (0, 0), sigma)[m : m + h, m : m + w]
            a = _sample(art._blur_f, d, ds, x0, y0, w, h)[..., None]
            out = np.clip(out * (1 - a) + soft * a, 0, 255).astype(np.uint8)
    if _touches(art.fold, d, ds, x0, y0, w, h):
        a = _sample(art._fold_f, d, ds, x0, y0, w, h)[..., None]
        t = np.maximum(out.astype(np.float32), 1.0) / 255.0  # transmittance of one layer
        out = np.clip(255.0 * t ** (1.0 + a), 0, 255).astype(np.uint8)  # two layers: t²
    return out
