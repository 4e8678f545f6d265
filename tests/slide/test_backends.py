"""Both slide backends agree on the same file; mpp provenance; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import MissingMppError, SlideError, WsiMilError
from wsi_mil.slide import list_backends, open_slide


def test_backends_listed() -> None:
    assert {"openslide", "tiffslide"} <= set(list_backends())


def test_unknown_backend_names_the_valid_ones(tumour_slide: tuple[Path, object]) -> None:
    with pytest.raises(WsiMilError, match="openslide, tiffslide"):
        open_slide(tumour_slide[0], backend="nope")


@pytest.mark.parametrize("fixture", ["tumour_slide", "plain_slide"])
def test_same_metadata_and_pixels(fixture: str, request: pytest.FixtureRequest) -> None:
    path, truth = request.getfixturevalue(fixture)
    with open_slide(path, "openslide") as a, open_slide(path, "tiffslide") as b:
        assert a.level_dimensions == b.level_dimensions
        assert np.allclose(a.level_downsamples, b.level_downsamples)
        assert a.mpp.mean == pytest.approx(b.mpp.mean)
        assert a.mpp.mean == pytest.approx(truth.spec["mpp"])
        assert a.mpp.source.startswith("metadata:") and b.mpp.source.startswith("metadata:")
        for level in range(a.level_count):
            w, h = a.level_dimensions[level]
            ds = int(a.level_downsamples[level])
            # Level-0 locations on the level's pixel grid (as tiling produces them).
            loc = (int(w * 0.4) * ds, int(h * 0.4) * ds)
            ra = a.read_region(loc, level, (300, 200))
            rb = b.read_region(loc, level, (300, 200))
            assert ra.shape == rb.shape == (200, 300, 3) and ra.dtype == np.uint8
            # Same JPEG data, same libjpeg-turbo decoding: identical pixels.
            assert np.abs(ra.astype(int) - rb.astype(int)).max() <= 1


def test_reads_past_the_edge_are_white_in_both(tumour_slide: tuple[Path, object]) -> None:
    path, _ = tumour_slide
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as s:
            w, h = s.dimensions
            region = s.read_region((w - 10, h - 10), 0, (40, 40))
            assert (region[20:, 20:] == 255).all()


def test_missing_mpp_is_an_error_naming_the_slide(no_mpp_slide: Path) -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(no_mpp_slide, backend) as s, pytest.raises(MissingMppError, match="nompp_c"):
            _ = s.mpp


def test_mpp_override_is_recorded(no_mpp_slide: Path) -> None:
    with open_slide(no_mpp_slide, "openslide", mpp=0.5, mpp_source="csv") as s:
        assert s.mpp.mean == 0.5 and s.mpp.source == "csv"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_bad_files(tmp_path: Path, tumour_slide: tuple[Path, object], backend: str) -> None:
    missing = tmp_path / "missing.svs"
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(missing, backend)
    text = tmp_path / "notes.tif"
    text.write_text("this is not a slide")
    with pytest.raises(SlideError, match="notes"):
        open_slide(text, backend)
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(tumour_slide[0].read_bytes()[:4000])
    with pytest.raises(SlideError, match="trunc"), open_slide(trunc, backend) as s:
        s.read_level(s.level_count - 1)
