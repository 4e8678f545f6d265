"""A tiled synthetic slide with known per-patch scores, and its heatmaps rendered once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.heatmaps import HeatmapOptions, write_heatmaps
from wsi_mil.io import h5
from wsi_mil.synthetic import SyntheticTruth
from wsi_mil.tiling.run import TileConfig, tile_slide

CLASSES = ["normal", "tumour"]


@dataclass
class Rendered:
    out: Path
    slide: Path
    coords: np.ndarray
    size: int
    attention: np.ndarray
    probs: np.ndarray
    options: HeatmapOptions
    paths: dict[str, Path]


@pytest.fixture(scope="module")
def tiled(
    tmp_path_factory: pytest.TempPathFactory, tumour_slide: tuple[Path, SyntheticTruth]
) -> tuple[Path, Path, h5.PatchFile]:
    """``tumour_slide`` tiled into a fresh OUT (patches, masks, thumbnails)."""
    path, _ = tumour_slide
    out = tmp_path_factory.mktemp("hm_out")
    tile_slide(path, out, TileConfig(backend="tiffslide"))
    return out, path, h5.read_patches(out / "patches" / f"{path.stem}.h5")


@pytest.fixture(scope="module")
def rendered(tiled: tuple[Path, Path, h5.PatchFile]) -> Rendered:
    """Every output with exact colours: raw scores, opaque PNG, clipped to patches."""
    out, slide, patches = tiled
    coords, size = patches.coords, patches.patch_size_level0
    rng = np.random.default_rng(0)
    attention = rng.random(len(coords)) + 0.01
    attention /= attention.sum()
    tumour = rng.choice(np.arange(17) / 16, len(coords))  # exact in float32: exact colours
    probs = np.stack([1.0 - tumour, tumour], 1)
    options = HeatmapOptions(
        score="tumour",
        normalise="raw",
        alpha=1.0,
        clip="patches",
        zarr=True,
        gallery_k=4,
        gallery_px=32,
        backend="tiffslide",
    )
    paths = write_heatmaps(
        out, "run1", slide.stem, slide, coords, size, attention, probs, CLASSES, options
    )
    return Rendered(out, slide, coords, size, attention, probs, options, paths)
