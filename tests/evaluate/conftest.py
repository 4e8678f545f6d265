"""Heatmap files of known scores on slides of known annotations, written as the pipeline writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.io import h5

CLASSES = ["normal", "tumour"]
MPP = 0.5


def grid(width: int, height: int, size: int) -> np.ndarray:
    """(N, 2) top-left corners of every patch of a ``size`` grid over the slide."""
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size))
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def write_heatmap(
    folder: Path,
    slide_id: str,
    coords: np.ndarray,
    size: int,
    tumour: np.ndarray,
    dims: tuple[int, int],
    attention: np.ndarray | None = None,
) -> Path:
    """``<folder>/<slide_id>.h5`` with prob_tumour = ``tumour`` and attention ∝ ``attention`` (default ``tumour``)."""
    tumour = np.asarray(tumour, np.float32)
    att = np.asarray(tumour if attention is None else attention, np.float64) + 1e-6
    data = h5.HeatmapData(
        coords=coords,
        attention=(att / att.sum()).astype(np.float32),
        attention_norm=np.zeros(len(coords), np.float32),
        instance_probs=np.stack([1 - tumour, tumour], 1),
        class_names=CLASSES,
        attrs={"slide_id": slide_id, "run": "r", "patch_size_level0": size, "mpp": MPP, "slide_dimensions": list(dims)},
    )
    path = folder / f"{slide_id}.h5"
    h5.write_heatmap_data(path, data)
    return path
