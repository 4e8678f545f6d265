"""Pure parts: score grid, overlap, smoothing, normalisation, levels, options, memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.config import load_config
from wsi_mil.errors import ConfigError
from wsi_mil.heatmaps import HeatmapOptions
from wsi_mil.heatmaps.pyramid import Overlay, overlay_levels, write_overlay_tiff
from wsi_mil.heatmaps.raster import build_grid, grid_unit
from wsi_mil.heatmaps.scores import colour_lut, normalise_scores, select_score


def test_overlapping_patches_are_averaged() -> None:
    # 50% overlap: patches at x = 0 and 128 share the level-0 columns 128..255.
    coords = np.array([[0, 0], [128, 0]])
    grid = build_grid(coords, np.array([0.0, 1.0]), 256, 1024, 256)
    assert grid.unit == 128
    values, covered = grid.sample(0, 0, 64, 64, 8, 4)
    np.testing.assert_allclose(values[0, :6], [0, 0, 0.5, 0.5, 1, 1])
    assert np.isnan(values[0, 6:]).all() and not covered[0, 6:].any()
    grid_max = build_grid(coords, np.array([0.0, 1.0]), 256, 1024, 256, combine="max")
    np.testing.assert_allclose(grid_max.sample(0, 0, 64, 64, 6, 1)[0][0], [0, 0, 1, 1, 1, 1])


def test_coarse_levels_average_instead_of_picking() -> None:
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    grid = build_grid(coords, np.array([0.0, 1.0, 1.0, 0.0]), 256, 512, 512)
    values, covered = grid.sample(0, 0, 512, 512, 1, 1)  # one pixel over four patches
    assert values[0, 0] == pytest.approx(0.5) and covered[0, 0]


def test_smoothing_is_normalised() -> None:
    xs, ys = np.meshgrid(np.arange(10), np.arange(10))
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
    grid = build_grid(coords, np.full(100, 0.7), 256, 4096, 4096, smooth_sigma_level0=600)
    values, covered = grid.sample(0, 0, 64, 64, 40, 40)
    np.testing.assert_allclose(values[covered], 0.7, atol=1e-5)  # edges not pulled to 0


def test_grid_unit_irregular_and_out_of_bounds() -> None:
    assert grid_unit(np.array([[0, 0], [256, 512]]), 256, 10_000, 10_000) == 256
    assert grid_unit(np.array([[3, 7]]), 256, 10_000, 10_000) == 16  # no common grid
    grid = build_grid(np.array([[-128, 0], [900, 0]]), np.array([0.2, 0.9]), 256, 1000, 256)
    values, _ = grid.sample(0, 0, 1, 256, 1000, 1)
    assert values[0, 0] == pytest.approx(0.2) and values[0, 999] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("minmax", [0.0, 0.25, 1.0]),
        ("rank", [0.0, 0.5, 1.0]),
        ("raw", [0.0, 0.5, 1.0]),
    ],
)
def test_normalise(method: str, expected: list[float]) -> None:
    v = np.array([0.0, 0.5, 2.0]) if method != "raw" else np.array([-1.0, 0.5, 3.0])
    np.testing.assert_allclose(normalise_scores(v, method), expected)


def test_percentile_normalisation_clips_outliers() -> None:
    v = np.r_[np.linspace(0, 1, 999), 1000.0]
    out = normalise_scores(v, "percentile", (0.0, 99.0))
    assert out.max() == 1.0 and out[500] == pytest.approx(0.505, abs=0.01)
    assert (normalise_scores(np.ones(5), "minmax") == 0.5).all()


def test_select_score() -> None:
    att, probs = np.array([0.2, 0.8]), np.array([[0.9, 0.1], [0.3, 0.7]])
    assert select_score("attention", att, probs, ["a", "b"])[0] == "attention"
    name, v = select_score("prob:b", att, probs, ["a", "b"])
    assert name == "prob_b" and v.tolist() == [0.1, 0.7]
    assert select_score("0", att, probs, ["a", "b"])[1].tolist() == [0.9, 0.3]
    with pytest.raises(ConfigError, match="neither"):
        select_score("tumour", att, probs, ["a", "b"])
    with pytest.raises(ConfigError, match="colormap"):
        colour_lut("no-such-map")


@pytest.mark.parametrize(
    ("w", "h", "ds"), [(80_000, 60_000, 16), (8191, 6143, 16), (1000, 37, 3.3)]
)
def test_levels_cover_the_slide_exactly(w: int, h: int, ds: float) -> None:
    levels = overlay_levels(w, h, ds, 256)
    assert max(levels[-1].width, levels[-1].height) <= 256
    for lv in levels:
        assert lv.width * lv.sx == pytest.approx(w, rel=1e-12)
        assert lv.height * lv.sy == pytest.approx(h, rel=1e-12)


def test_options_preset_matches_defaults_and_validates() -> None:
    assert load_config(HeatmapOptions, "heatmap") == HeatmapOptions()
    with pytest.raises(ConfigError, match="normalise"):
        HeatmapOptions(normalise="zscore")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(HeatmapOptions, "heatmap", overrides={"colourmap": "jet"})


def test_tiff_is_written_tile_by_tile_in_bounded_memory(tmp_path: Path) -> None:
    # A 64,000² slide, 62,500 patches of 256 px: the base level is 4,000² RGBA (64 MB).
    xs, ys = np.meshgrid(np.arange(250), np.arange(250))
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
    values = np.random.default_rng(0).random(len(coords))
    grid = build_grid(coords, values, 256, 64_000, 64_000)
    overlay = Overlay(grid, colour_lut("viridis"), "patches")
    levels = overlay_levels(64_000, 64_000, 16, 256)
    full = levels[0].width * levels[0].height * 4
    tracemalloc.start()
    try:
        write_overlay_tiff(tmp_path / "big.tiff", overlay, levels, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert full == 64_000_000
    assert peak < full / 8, f"peak {peak / 1e6:.1f} MB"


def test_slide_without_patches_still_gets_every_output(tmp_path: Path) -> None:
    from wsi_mil.heatmaps import write_heatmaps
    from wsi_mil.io.h5 import read_heatmap_data

    paths = write_heatmaps(
        tmp_path,
        "r",
        "empty",
        None,
        np.empty((0, 2)),
        256,
        np.empty(0),
        np.empty((0, 2)),
        ["a", "b"],
        HeatmapOptions(zarr=True),
        slide_dimensions=(5000, 3000),
        mpp=0.5,
    )
    assert set(paths) == {"h5", "png", "tiff", "zarr", "geojson"}
    assert read_heatmap_data(paths["h5"]).instance_probs.shape == (0, 2)
