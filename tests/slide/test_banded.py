"""Low-resolution images read in bands equal the simple whole-level read (within 1 grey level)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import SlideError
from wsi_mil.slide import open_slide
from wsi_mil.slide.base import MAX_LEVEL_PIXELS, thumbnail_size
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat (single-level) 3,000 × 2,100 slide at 0.5 µm/px with odd-sized edge tiles."""
    path = tmp_path_factory.mktemp("flat") / "flat_f.tif"
    write_synthetic_slide(path, SyntheticSpec(width=3000, height=2100, levels=(1,), n_tissue=2, seed=21))
    return path


@pytest.fixture(scope="module")
def big_flat_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat slide with more pixels than ``read_level`` reads whole (mostly glass)."""
    path = tmp_path_factory.mktemp("bigflat") / "bigflat_g.tif"
    spec = SyntheticSpec(width=5000, height=4000, levels=(1,), n_tissue=2, tissue_scale=0.1,
                         plain_background=True, truth_downsample=32, seed=22)
    write_synthetic_slide(path, spec)
    return path


def _slide_path(name: str, request: pytest.FixtureRequest) -> Path:
    value = request.getfixturevalue(name)
    return value[0] if isinstance(value, tuple) else value


def _whole_level_at(slide, downsample: float, size: tuple[int, int]) -> np.ndarray:
    """What the reads did before bands: the best level whole, then one cv2 INTER_AREA resize."""
    import cv2

    level = slide.best_level_for_downsample(downsample)
    img = slide.read_region((0, 0), level, slide.level_dimensions[level])
    if (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("fixture", ["tumour_slide", "plain_slide", "flat_slide"])
@pytest.mark.parametrize("target_mpp", [2.0, 3.3, 8.0])
@pytest.mark.parametrize("band_pixels", [None, 50_000])
def test_read_at_mpp_in_bands_equals_whole_level_read(
    backend: str, fixture: str, target_mpp: float, band_pixels: int | None, request: pytest.FixtureRequest
) -> None:
    with open_slide(_slide_path(fixture, request), backend) as s:
        img, mpp = s.read_at_mpp(target_mpp, band_pixels=band_pixels)
        w0, h0 = s.dimensions
        ds = max(target_mpp / s.mpp.mean, 1.0)
        size = (math.ceil(w0 / ds), math.ceil(h0 / ds))
        ref = _whole_level_at(s, ds, size)
        assert mpp == pytest.approx(w0 / size[0] * s.mpp.mean)
    assert img.shape == ref.shape == (size[1], size[0], 3) and img.dtype == np.uint8
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("fixture", ["tumour_slide", "flat_slide"])
@pytest.mark.parametrize("max_side", [300, 1000])
def test_thumbnail_in_bands_equals_whole_level_read(
    backend: str, fixture: str, max_side: int, request: pytest.FixtureRequest
) -> None:
    with open_slide(_slide_path(fixture, request), backend) as s:
        size = thumbnail_size(*s.dimensions, max_side)
        thumb = s.read_thumbnail(max_side, band_pixels=20_000)
        ref = _whole_level_at(s, s.dimensions[0] / size[0], size)
    assert thumb.shape == (size[1], size[0], 3) and max(thumb.shape[:2]) == max_side
    assert np.abs(thumb.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_read_resized_region_equals_the_region_resized(backend: str, flat_slide: Path) -> None:
    import cv2

    with open_slide(flat_slide, backend) as s:
        loc, size0, size = (1000, 600), (1600, 1200), (200, 150)
        got = s.read_resized(loc, size0, size)
        ref = cv2.resize(s.read_region(loc, 0, size0), size, interpolation=cv2.INTER_AREA)
        # Past the edge: white, like read_region.
        edge = s.read_resized((2800, 1900), (400, 400), (50, 50))
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert (edge[30:, 30:] >= 250).all()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_flat_and_two_level_slides_are_written_as_asked(backend: str, flat_slide: Path, tmp_path: Path) -> None:
    two = tmp_path / "two_h.tif"
    write_synthetic_slide(two, SyntheticSpec(width=2048, height=1536, levels=(1, 4), plain_background=True, seed=2))
    with open_slide(flat_slide, backend) as a, open_slide(two, backend) as b:
        assert a.level_dimensions == ((3000, 2100),)
        assert b.level_dimensions == ((2048, 1536), (512, 384))


def test_plain_background_changes_only_glass(tmp_path: Path) -> None:
    spec = SyntheticSpec(width=2048, height=2048, levels=(1,), n_tissue=1, tissue_scale=0.2, seed=4)
    write_synthetic_slide(tmp_path / "a.tif", spec)
    write_synthetic_slide(tmp_path / "b.tif", SyntheticSpec(**{**spec.__dict__, "plain_background": True}))
    with open_slide(tmp_path / "a.tif", "tiffslide") as a, open_slide(tmp_path / "b.tif", "tiffslide") as b:
        ia, ib = a.read_level(0), b.read_level(0)
    same = np.all(ia == ib, axis=2)
    assert 0.02 < same.mean() < 0.9  # the tissue tiles are identical, the glass is plain
    assert np.abs(ib[~same].astype(int) - [243, 241, 244]).max() <= 6  # plain glass, through JPEG


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_read_level_refuses_a_large_level_and_bands_read_it(backend: str, big_flat_slide: Path) -> None:
    with open_slide(big_flat_slide, backend) as s:
        w, h = s.dimensions
        assert w * h > MAX_LEVEL_PIXELS
        with pytest.raises(SlideError, match="too large to read whole"):
            s.read_level(0)
        thumb = s.read_thumbnail(500)
    assert thumb.shape == (400, 500, 3)
    assert (thumb.min(axis=2) < 200).any()  # the tissue is there
