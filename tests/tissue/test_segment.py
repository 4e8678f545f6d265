"""Tissue segmentation against synthetic ground truth; pen ink is not tissue."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_mil.slide import open_slide
from wsi_mil.synthetic import SyntheticTruth
from wsi_mil.tissue import SegmentConfig, segment_tissue


def _segment(path: Path, cfg: SegmentConfig | None = None):
    with open_slide(path) as s:
        rgb, mpp = s.read_at_mpp((cfg or SegmentConfig()).seg_mpp)
        return segment_tissue(rgb, mpp, s.dimensions[0] / rgb.shape[1], cfg)


def _on_truth_grid(mask: np.ndarray, truth: SyntheticTruth) -> np.ndarray:
    h, w = truth.tissue.shape
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


@pytest.mark.parametrize("fixture", ["tumour_slide", "plain_slide"])
def test_mask_iou_against_ground_truth(fixture: str, request: pytest.FixtureRequest) -> None:
    path, truth = request.getfixturevalue(fixture)
    mask = _on_truth_grid(_segment(path).mask, truth)
    iou = (mask & truth.tissue).sum() / (mask | truth.tissue).sum()
    assert iou >= 0.95, f"IoU {iou:.4f}"


@pytest.mark.parametrize("fixture", ["tumour_slide", "plain_slide"])
def test_pen_ink_is_not_tissue(fixture: str, request: pytest.FixtureRequest) -> None:
    path, truth = request.getfixturevalue(fixture)
    assert truth.pen.sum() > 100  # the fixture really has ink
    mask = _on_truth_grid(_segment(path).mask, truth)
    assert (mask & truth.pen).sum() <= 0.01 * truth.pen.sum()


def test_pen_would_be_tissue_without_the_ink_filter(tumour_slide) -> None:
    path, truth = tumour_slide
    mask = _on_truth_grid(_segment(path, SegmentConfig(exclude_pen=False)).mask, truth)
    assert (mask & truth.pen).sum() > 0.3 * truth.pen.sum()


def test_blank_slide_has_no_tissue(blank_slide: Path) -> None:
    tm = _segment(blank_slide)
    assert not tm.mask.any() and tm.polygons == []


def _ring_image() -> np.ndarray:
    img = np.full((200, 300, 3), 240, np.uint8)
    cv2.circle(img, (150, 100), 80, (230, 140, 190), -1)  # pink disc ...
    cv2.circle(img, (150, 100), 30, (240, 240, 240), -1)  # ... with a glass hole
    cv2.circle(img, (20, 20), 3, (230, 140, 190), -1)  # a speck below the area filter
    return img


def test_holes_and_area_filters_in_physical_units() -> None:
    cfg = SegmentConfig(median_um=8, close_um=8, min_tissue_area_um2=2000 * 64, min_hole_area_um2=500 * 64)
    tm = segment_tissue(_ring_image(), mpp=8.0, scale=16.0, cfg=cfg)
    assert len(tm.polygons) == 1  # the speck is gone
    outer, holes = tm.polygons[0]
    assert len(holes) == 1
    # Level-0 coordinates: the disc centre (150, 100) px × 16.
    assert np.allclose(outer.mean(0), [2400, 1600], atol=40)
    # The same hole is filled when the hole filter is larger than it (π·30² px ≈ 2,827 px).
    filled = segment_tissue(_ring_image(), 8.0, 16.0, SegmentConfig(
        median_um=8, close_um=8, min_tissue_area_um2=2000 * 64, min_hole_area_um2=4000 * 64))
    assert filled.polygons[0][1] == [] and filled.mask[100, 150]
    assert not tm.mask[100, 150] and tm.mask[100, 200]


def test_same_physical_preset_serves_two_resolutions() -> None:
    img = _ring_image()
    a = segment_tissue(img, mpp=8.0, scale=16.0)
    big = cv2.resize(img, (600, 400), interpolation=cv2.INTER_NEAREST)
    b = segment_tissue(big, mpp=4.0, scale=8.0)
    assert a.area_um2 == pytest.approx(b.area_um2, rel=0.05)
