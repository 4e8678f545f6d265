"""Flat renderings: the overlay on the slide thumbnail, and the top/bottom patch gallery."""

from __future__ import annotations

import math

import numpy as np

from wsi_mil.heatmaps.pyramid import Overlay
from wsi_mil.slide import Slide
from wsi_mil.slide.base import thumbnail_size

__all__ = ["gallery_indices", "read_thumbnail", "render_gallery", "render_overlay", "thumbnail_size"]

#: Height of the colour bar under the PNG overlay.
LEGEND_PX = 28
#: Rows of the PNG rendered at a time.
BAND = 256
GAP = 4


def read_thumbnail(slide: Slide, max_side: int) -> np.ndarray:
    """The slide at ``thumbnail_size`` as (h, w, 3) uint8, from the best level read in bands."""
    return slide.read_thumbnail(max_side)


def render_overlay(
    thumb: np.ndarray, overlay: Overlay, width: int, height: int, label: str = ""
) -> np.ndarray:
    """Blend the overlay (its LUT's alpha) onto a thumbnail; a colour bar is added below.

    The thumbnail's scale is ``width / thumb_width`` level-0 pixels per pixel in x (and
    ``height / thumb_height`` in y), so the heatmap's pixel (i, j) lies over level-0
    ``((j + 0.5) · sx, (i + 0.5) · sy)``; the colour bar only adds rows at the bottom.
    """
    th, tw = thumb.shape[:2]
    sx, sy = width / tw, height / th
    out = np.empty((th + LEGEND_PX, tw, 3), np.uint8)
    for y in range(0, th, BAND):  # bands of rows keep the float temporaries small
        h = min(BAND, th - y)
        rgba = overlay.rgba(0.0, y * sy, sx, sy, tw, h).astype(np.float32)
        a = rgba[..., 3:4] / 255.0
        blend = thumb[y : y + h, :, :3].astype(np.float32) * (1 - a) + rgba[..., :3] * a
        out[y : y + h] = np.round(blend).astype(np.uint8)
    out[th:] = _legend(overlay.lut, tw, label)
    return out


def _legend(lut: np.ndarray, width: int, label: str) -> np.ndarray:
    import cv2

    bar = np.full((LEGEND_PX, width, 3), 255, np.uint8)
    x0, x1 = min(30, width // 4), max(min(30, width // 4) + 1, width - min(30, width // 4))
    ramp = lut[np.round(np.linspace(0, 255, x1 - x0)).astype(int), :3]
    bar[4:14, x0:x1] = ramp[None]
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(bar, "0", (max(0, x0 - 12), 14), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(bar, "1", (min(width - 10, x1 + 4), 14), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    if label:
        cv2.putText(bar, label, (x0, 25), font, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def gallery_indices(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest (descending) and ``k`` lowest (ascending) scores."""
    order = np.argsort(np.asarray(scores, np.float64), kind="stable")
    k = min(k, len(order))
    return order[::-1][:k].copy(), order[:k].copy()


def render_gallery(
    slide: Slide,
    coords: np.ndarray,
    patch_size_level0: int,
    scores: np.ndarray,
    shown: np.ndarray,
    k: int,
    px: int,
    lut: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two rows of patches read from the slide: the top-k, then the bottom-k by score.

    Parameters
    ----------
    slide : Slide
        The open slide.
    coords : ndarray
        (N, 2) level-0 top-left corners.
    patch_size_level0 : int
        Patch side in level-0 pixels.
    scores : ndarray
        (N,) raw scores that rank the patches.
    shown : ndarray
        (N,) values in [0, 1] that colour each patch's frame and label.
    k : int
        Patches per row.
    px : int
        Side of each patch in the gallery.
    lut : ndarray
        (257, 4) colour table.

    Returns
    -------
    (ndarray, ndarray, ndarray)
        The (h, w, 3) image and the top and bottom indices into ``coords``.
    """
    import cv2

    top, bottom = gallery_indices(scores, k)
    cell = px + 2 * GAP
    label_h = 14
    img = np.full((2 * (cell + label_h), max(1, k) * cell, 3), 255, np.uint8)
    ds = patch_size_level0 / px
    level = slide.best_level_for_downsample(ds)
    size = max(1, math.ceil(patch_size_level0 / slide.level_downsamples[level]))
    for row, idx in enumerate((top, bottom)):
        y0 = row * (cell + label_h)
        for col, i in enumerate(idx.tolist()):
            x, y = (int(v) for v in coords[i])
            patch = slide.read_region((x, y), level, (size, size))
            patch = cv2.resize(patch, (px, px), interpolation=cv2.INTER_AREA)
            x0 = col * cell
            colour = tuple(int(c) for c in lut[round(float(np.clip(shown[i], 0, 1)) * 255), :3])
            img[y0 : y0 + cell, x0 : x0 + cell] = colour
            img[y0 + GAP : y0 + GAP + px, x0 + GAP : x0 + GAP + px] = patch
            cv2.putText(
                img,
                f"{scores[i]:.3g}",
                (x0 + GAP, y0 + cell + 11),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
    return img, top, bottom
