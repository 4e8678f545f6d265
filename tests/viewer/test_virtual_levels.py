"""A flat slide gets virtual Deep Zoom levels, read in bands: zoomed-out tiles need no whole level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.viewer.tiles import VIRTUAL_MAX_SIDE, SlideTiles


@pytest.fixture(scope="module")
def flat_and_pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dz")
    spec = SyntheticSpec(width=5000, height=3000, n_tissue=2, tissue_scale=0.2, plain_background=True, seed=8)
    flat, pyr = d / "flat_v.tif", d / "pyr_v.tif"
    write_synthetic_slide(flat, SyntheticSpec(**{**spec.__dict__, "levels": (1,)}))
    write_synthetic_slide(pyr, spec)
    return flat, pyr


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_flat_slide_has_virtual_levels_and_same_deep_zoom_geometry(
    backend: str, flat_and_pyramid: tuple[Path, Path]
) -> None:
    import io

    from PIL import Image

    flat, pyr = flat_and_pyramid
    tiles = SlideTiles(backend)
    with tiles.borrow("flat_v", flat) as gf_open:
        source = gf_open._osr  # the _DeepZoomSource the generator reads
        assert source.level_count > 1 and max(source.level_dimensions[-1]) <= VIRTUAL_MAX_SIDE
    gf, gp = tiles.geometry("flat_v", flat), tiles.geometry("pyr_v", pyr)
    assert gf.level_count == gp.level_count and gf.level_tiles == gp.level_tiles
    # Every level's middle tile, zoomed out to full resolution, has the size DZI promises,
    # and the whole-slide tile shows the same slide as the pyramid's (level 0 pixels agree,
    # coarser levels of the synthetic pyramid are drawn, not downsampled: loose bound).
    for level in range(gf.level_count):
        cols, rows = gf.level_tiles[level]
        a = np.asarray(Image.open(io.BytesIO(tiles.tile("flat_v", flat, level, cols // 2, rows // 2))))
        b = np.asarray(Image.open(io.BytesIO(tiles.tile("pyr_v", pyr, level, cols // 2, rows // 2))))
        assert a.shape == b.shape
        assert np.abs(a.astype(float) - b.astype(float)).mean() < 12
