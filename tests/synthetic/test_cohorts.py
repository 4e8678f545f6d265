"""Harder synthetic cohorts: small tumour shares, lymphoid hard negatives, GeoJSON truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.synthetic import SyntheticSpec, load_truth, write_synthetic_slide
from wsi_mil.synthetic.cohorts import HardSpec, mask_feature_collection, write_hard_cohort
from wsi_mil.synthetic.slides import draw_truth

SIZE = {"width": 3072, "height": 2304}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard")
    write_hard_cohort(out, n_slides=2, seed=7, **SIZE, share_range=(0.005, 0.03), lymphoid_range=(2, 3))
    return out


@pytest.mark.parametrize("share", [0.005, 0.012, 0.03])
def test_tumour_share_measured_from_the_mask_is_the_asked_share(share: float) -> None:
    truth = draw_truth(HardSpec(**SIZE, tumour=True, tumour_share=share, lymphoid=3, seed=11))
    measured = truth.tumour.sum() / truth.tissue.sum()
    assert abs(measured - share) <= 1.0 / truth.tissue.sum() + 1e-12
    assert not (truth.tumour & ~truth.tissue).any()
    assert truth.lymphoid.any() and not (truth.lymphoid & truth.tumour).any()


def test_cohort_tumour_shares_lie_in_the_range_and_labels_match(cohort: Path) -> None:
    slides = json.loads((cohort / "cohort.json").read_text())["slides"]
    labels = (cohort / "labels.csv").read_text().splitlines()
    assert labels[0] == "case_id,slide_id,label" and len(labels) == 3
    for s in slides:
        truth = load_truth(cohort / "slides" / f"{s['slide_id']}.tif")
        share = truth.tumour.sum() / truth.tissue.sum()
        if s["label"] == "tumor":
            assert 0.005 - 1e-3 <= share <= 0.03 + 1e-3, (s["slide_id"], share)
            assert (cohort / "annotations" / f"{s['slide_id']}.geojson").is_file()
        else:
            assert share == 0
            assert not (cohort / "annotations" / f"{s['slide_id']}.geojson").exists()


def test_hard_negatives_are_present_outside_the_tumour_and_look_like_it(cohort: Path) -> None:
    import tiffslide

    for s in json.loads((cohort / "cohort.json").read_text())["slides"]:
        path = cohort / "slides" / f"{s['slide_id']}.tif"
        truth = load_truth(path)
        assert truth.lymphoid.sum() > 50, s["slide_id"]
        assert not (truth.lymphoid & truth.tumour).any()
        assert not (truth.lymphoid & ~truth.tissue).any()
        # At the thumbnail level an aggregate is as dark as tumour and darker than stroma.
        with tiffslide.TiffSlide(path) as sl:
            lvl = sl.level_count - 1
            ds = sl.level_downsamples[lvl]
            thumb = np.asarray(sl.read_region((0, 0), lvl, sl.level_dimensions[lvl]).convert("L"), np.float32)
        grid = thumb[:: max(int(truth.downsample / ds), 1), :: max(int(truth.downsample / ds), 1)]
        h, w = min(grid.shape[0], truth.tissue.shape[0]), min(grid.shape[1], truth.tissue.shape[1])
        g = grid[:h, :w]
        plain = truth.tissue[:h, :w] & ~truth.lymphoid[:h, :w] & ~truth.tumour[:h, :w]
        assert g[truth.lymphoid[:h, :w]].mean() < g[plain].mean() - 10


def test_geojson_polygons_cover_exactly_the_tumour_mask(cohort: Path) -> None:
    from shapely.geometry import shape

    for ann in sorted((cohort / "annotations").glob("*.geojson")):
        fc = json.loads(ann.read_text())
        truth = load_truth(cohort / "slides" / f"{ann.stem}.tif")
        area = sum(shape(f["geometry"]).area for f in fc["features"])
        assert area == truth.tumour.sum() * truth.downsample**2
        assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"Tumor"}


def test_mask_with_a_hole_keeps_the_hole() -> None:
    from shapely.geometry import shape

    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    m[4:6, 4:6] = False
    fc = mask_feature_collection(m, 16, "Tumor")
    (poly,) = [shape(f["geometry"]) for f in fc["features"]]
    assert len(poly.interiors) == 1 and poly.area == 32 * 256
    assert mask_feature_collection(np.zeros((3, 3), bool), 16, "Tumor")["features"] == []


def test_same_seed_same_cohort(cohort: Path, tmp_path: Path) -> None:
    write_hard_cohort(tmp_path, n_slides=1, seed=7, **SIZE, share_range=(0.005, 0.03), lymphoid_range=(2, 3))
    sid = "hard_000"
    assert (tmp_path / "slides" / f"{sid}.tif").read_bytes() == (cohort / "slides" / f"{sid}.tif").read_bytes()
    a = json.loads((tmp_path / "cohort.json").read_text())["slides"]
    b = json.loads((cohort / "cohort.json").read_text())["slides"][:1]
    assert a == b
    other = draw_truth(HardSpec(**SIZE, tumour=True, seed=8))
    assert not np.array_equal(other.lymphoid, draw_truth(HardSpec(**SIZE, tumour=True, seed=9)).lymphoid)


def test_hard_spec_without_extras_draws_the_plain_slide(tmp_path: Path) -> None:
    """The subclass changes nothing of the base generator when its extras are off."""
    small = {"width": 1024, "height": 768}
    write_synthetic_slide(tmp_path / "a.tif", SyntheticSpec(**small, seed=4))
    write_synthetic_slide(tmp_path / "b.tif", HardSpec(**small, seed=4, lymphoid=0))
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
