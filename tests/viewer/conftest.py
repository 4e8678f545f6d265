"""A real OUT for the viewer: a small synthetic slide, tiled, with made-up per-patch scores."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.heatmaps import HeatmapOptions, write_heatmaps
from wsi_mil.io import h5
from wsi_mil.synthetic import SyntheticSpec, SyntheticTruth, write_synthetic_slide
from wsi_mil.tiling.run import TileConfig, tile_slide

CLASSES = ["normal", "tumour"]
RUN = "run1"


@dataclass
class ViewerOut:
    out: Path
    slide_id: str
    slide: Path
    width: int
    height: int
    data: h5.HeatmapData


@pytest.fixture(scope="session")
def viewer_out(tmp_path_factory: pytest.TempPathFactory) -> ViewerOut:
    """OUT with one tiled slide, its heatmap (scores follow the tumour truth) and predictions.

    A second slide id appears only in ``predictions.csv`` (no file, no heatmap): the list
    shows it, everything else answers 404.
    """
    root = tmp_path_factory.mktemp("viewer")
    slide = root / "slides" / "case_1.tif"
    slide.parent.mkdir()
    width, height = 4096, 3072
    truth: SyntheticTruth = write_synthetic_slide(
        slide, SyntheticSpec(width=width, height=height, tumour=True, n_tissue=2, seed=21)
    )
    out = root / "out"
    tile_slide(slide, out, TileConfig(backend="tiffslide"))
    patches = h5.read_patches(out / "patches" / "case_1.h5")
    coords, size = patches.coords, patches.patch_size_level0
    assert len(coords) > 20
    rng = np.random.default_rng(1)
    tumour = np.array([truth.fraction_in(int(x), int(y), size, "tumour") for x, y in coords])
    p_tumour = np.clip(0.1 + 0.8 * tumour + rng.normal(0, 0.05, len(coords)), 0, 1)
    attention = np.exp(3 * p_tumour + rng.normal(0, 0.1, len(coords)))
    attention /= attention.sum()
    probs = np.stack([1 - p_tumour, p_tumour], 1)
    options = HeatmapOptions(gallery_k=0, backend="tiffslide", png_max=256)
    write_heatmaps(out, RUN, "case_1", slide, coords, size, attention, probs, CLASSES, options)
    with (out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "prediction", "prob_normal", "prob_tumour", "n_patches"])
        w.writerow(["case_1", "tumour", 0.2, 0.8, len(coords)])
        w.writerow(["ghost_2", "normal", 0.9, 0.1, 0])
    data = h5.read_heatmap_data(out / "heatmaps" / RUN / "case_1.h5")
    return ViewerOut(out, "case_1", slide, width, height, data)


def record_slide(out: Path, sid: str, slide: Path, fingerprint: str | None = None) -> None:
    """Point ``patches/<id>.h5`` at ``slide`` as a tiling of it would (its fingerprint, unless given)."""
    import h5py

    from wsi_mil.io.provenance import slide_fingerprint

    fp = fingerprint if fingerprint is not None else slide_fingerprint(slide)
    with h5py.File(out / "patches" / f"{sid}.h5", "r+") as f:
        for attrs in (f.attrs, f["coords"].attrs):
            attrs["slide_path"], attrs["slide_fingerprint"] = str(slide), fp
