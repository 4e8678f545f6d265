"""Thumbnail with tissue contours and the patch grid drawn on it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from wsi_mil.io.atomic import atomic_path


def draw_thumbnail(
    rgb: np.ndarray,
    scale: float,
    polygons: list[tuple[np.ndarray, list[np.ndarray]]],
    coords: np.ndarray,
    size_level0: int,
) -> np.ndarray:
    """Draw contours (green, holes blue) and patch squares (dark grey) on a copy of ``rgb``.

    ``scale`` is level-0 pixels per thumbnail pixel.
    """
    import cv2

    img = np.ascontiguousarray(rgb.copy())
    s = max(1, int(round(size_level0 / scale)))
    pts = np.round(np.asarray(coords, np.float64) / scale).astype(np.int32)
    grid = img.copy()
    for x, y in pts.tolist():
        cv2.rectangle(grid, (x, y), (x + s - 1, y + s - 1), (60, 60, 60), 1)
    img = cv2.addWeighted(grid, 0.5, img, 0.5, 0)
    for outer, holes in polygons:
        cv2.polylines(img, [np.round(outer / scale - 0.5).astype(np.int32)], True, (0, 180, 0), 2)
        if holes:
            cv2.polylines(img, [np.round(h / scale - 0.5).astype(np.int32) for h in holes], True, (0, 0, 220), 2)
    return img


def write_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB array as PNG, atomically."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:  # pragma: no cover - cv2 only fails on bad arrays
        raise ValueError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def draw_rejected(
    rgb: np.ndarray, scale: float, coords: np.ndarray, reasons: np.ndarray, size_level0: int,
    colours: Mapping[int, Sequence[int]],
) -> np.ndarray:
    """Draw patches rejected by QC as crossed squares, in the colour of their reason.

    ``reasons`` holds one code per patch of ``coords`` (0 = kept, not drawn), ``colours``
    an RGB colour per code (:data:`wsi_mil.tiling.qc.CODE_COLOURS`); ``scale`` is level-0
    pixels per thumbnail pixel.
    """
    import cv2

    img = np.ascontiguousarray(rgb.copy())
    s = max(2, int(round(size_level0 / scale)))
    pts = np.round(np.asarray(coords, np.float64).reshape(-1, 2) / scale).astype(np.int32)
    for (x, y), code in zip(pts.tolist(), np.asarray(reasons).tolist(), strict=True):
        if code:
            c = tuple(int(v) for v in colours[int(code)])
            cv2.rectangle(img, (x, y), (x + s - 1, y + s - 1), c, 1)
            cv2.line(img, (x, y), (x + s - 1, y + s - 1), c, 1)
            cv2.line(img, (x + s - 1, y), (x, y + s - 1), c, 1)
    return img
