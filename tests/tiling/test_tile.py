"""Stage 1 on synthetic slides with ground truth: quality, CLAM semantics, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_mil.io.h5 import read_patches
from wsi_mil.slide import open_slide
from wsi_mil.synthetic import SyntheticTruth
from wsi_mil.tiling.run import TileConfig, tile_slide

CLAM_ATTRS = ("patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name")
OUR_ATTRS = ("patch_size_level0", "mpp", "target_mpp", "overlap")


def _truth_fractions(truth: SyntheticTruth, coords: np.ndarray, size: int) -> np.ndarray:
    return np.array([truth.fraction_in(int(x), int(y), size) for x, y in coords])


def _coverage(truth: SyntheticTruth, coords: np.ndarray, size: int) -> float:
    d = truth.downsample
    covered = np.zeros_like(truth.tissue)
    for x, y in coords:
        covered[y // d : (y + size) // d, x // d : (x + size) // d] = True
    return float((covered & truth.tissue).sum() / truth.tissue.sum())


@pytest.mark.parametrize(
    ("fixture", "cfg", "min_coverage"),
    [
        ("tumour_slide", TileConfig(), 0.95),
        # A stricter threshold drops more edge patches: coverage falls, purity must hold.
        ("tumour_slide", TileConfig(min_tissue=0.5), 0.85),
        ("plain_slide", TileConfig(patch_size=128), 0.95),  # 0.25 µm/px: 256 level-0 px patches
    ],
)
def test_patches_against_ground_truth(fixture: str, cfg: TileConfig, min_coverage: float,
                                      request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path, truth = request.getfixturevalue(fixture)
    res = tile_slide(path, tmp_path, cfg)
    pf = read_patches(tmp_path / "patches" / f"{res.slide_id}.h5")
    size = pf.patch_size_level0
    assert len(pf.coords) == res.n_patches > 50
    frac = _truth_fractions(truth, pf.coords, size)
    assert (frac >= cfg.min_tissue).mean() >= 0.99
    assert _coverage(truth, pf.coords, size) >= min_coverage


def test_patch_file_layout_and_clam_reader_semantics(tumour_slide, tmp_path: Path) -> None:
    path, _ = tumour_slide
    tile_slide(path, tmp_path)
    pf = read_patches(tmp_path / "patches" / "tumour_a.h5")
    assert pf.coords.dtype == np.int64 and pf.coords.shape[1] == 2
    for key in CLAM_ATTRS + OUR_ATTRS:
        assert key in pf.attrs, key
    assert pf.attrs["name"] == "tumour_a" and pf.attrs["mpp_source"].startswith("metadata:")
    level, size = pf.attrs["patch_level"], pf.attrs["patch_size"]
    with open_slide(path) as s:
        for x, y in pf.coords[:: max(1, len(pf.coords) // 5)]:
            patch = s.read_region((int(x), int(y)), level, (size, size))
            # The same pixels, cut from a larger read around the patch.
            big = s.read_region((int(x) - 64, int(y) - 64), 0, (size + 128, size + 128))
            np.testing.assert_array_equal(patch, big[64 : 64 + size, 64 : 64 + size])


def test_40x_slide_reads_from_a_coarser_level_when_the_target_allows(plain_slide, tmp_path: Path) -> None:
    path, _ = plain_slide  # 0.25 µm/px, levels 1, 4, 16
    tile_slide(path, tmp_path, TileConfig(patch_size=256, target_mpp=1.0))
    a = read_patches(tmp_path / "patches" / "plain_b.h5").attrs
    assert (a["patch_size_level0"], a["patch_level"], a["patch_size"]) == (1024, 1, 256)
    assert a["downsample"] == [4.0, 4.0]


def test_both_backends_give_identical_coords(tumour_slide, tmp_path: Path) -> None:
    path, _ = tumour_slide
    coords = []
    for backend in ("openslide", "tiffslide"):
        tile_slide(path, tmp_path / backend, TileConfig(backend=backend))
        coords.append(read_patches(tmp_path / backend / "patches" / "tumour_a.h5").coords)
    np.testing.assert_array_equal(coords[0], coords[1])


def test_overlap_doubles_density(tumour_slide, tmp_path: Path) -> None:
    path, _ = tumour_slide
    n0 = tile_slide(path, tmp_path / "a", TileConfig()).n_patches
    n1 = tile_slide(path, tmp_path / "b", TileConfig(overlap=0.5)).n_patches
    assert 3.0 < n1 / n0 < 5.0


def test_mask_geojson_and_thumbnail(tumour_slide, tmp_path: Path) -> None:
    from shapely.geometry import shape

    path, truth = tumour_slide
    tile_slide(path, tmp_path)
    fc = json.loads((tmp_path / "masks" / "tumour_a.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    geoms = [shape(f["geometry"]) for f in fc["features"]]
    assert all(g.is_valid for g in geoms)
    assert fc["features"][0]["properties"]["objectType"] == "annotation"
    # Level-0 pixel coordinates: the polygons' area matches the ground truth tissue area.
    area = sum(g.area for g in geoms)
    assert area == pytest.approx(truth.tissue.sum() * truth.downsample**2, rel=0.06)
    thumb = cv2.imread(str(tmp_path / "thumbnails" / "tumour_a.png"))
    assert thumb is not None and max(thumb.shape[:2]) <= 2048
    assert (np.abs(thumb.astype(int) - [0, 180, 0]).sum(-1) < 30).any()  # contours are drawn
