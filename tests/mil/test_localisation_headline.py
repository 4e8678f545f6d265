"""The demo's headline localisation AUC is within tumour slides: a slide-level signal cannot raise it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsi_mil.io.h5 import HeatmapData, write_heatmap_data
from wsi_mil.synthetic.evaluate import localisation
from wsi_mil.synthetic.slides import SyntheticTruth, save_truth, truth_path

SIZE = 16  # patch size, level 0; the truth grid has one cell per 4 × 4 pixels


def _slide(tmp: Path, name: str, tumour_cols: int, prob: np.ndarray) -> tuple[Path, Path]:
    """A 4 × 4-patch slide whose first ``tumour_cols`` patch columns are tumour; heatmap scores ``prob``."""
    tumour = np.zeros((16, 16), bool)
    tumour[:, : tumour_cols * 4] = True
    slide = tmp / f"{name}.tif"  # only its truth file is read
    save_truth(SyntheticTruth(tissue=np.ones((16, 16), bool), tumour=tumour, pen=np.zeros((16, 16), bool),
                              downsample=4), truth_path(slide))
    coords = np.array([(x * SIZE, y * SIZE) for y in range(4) for x in range(4)])
    att = np.full(16, 1 / 16, np.float32)
    p = np.asarray(prob, np.float32)
    hm = tmp / f"{name}.h5"
    write_heatmap_data(hm, HeatmapData(coords, att, att, np.stack([1 - p, p], 1), ["normal", "tumour"],
                                       {"patch_size_level0": SIZE}))
    return hm, slide


def test_a_slide_level_signal_raises_the_pooled_auc_only(tmp_path: Path) -> None:
    cols = np.tile(np.arange(4), 4)  # patch column of each of the 16 patches
    # Tumour slide: every patch scores high (a slide-level signal), but its normal patches
    # score *higher* than its tumour ones — no localisation at all.
    tumour_slide = _slide(tmp_path, "t", 2, np.where(cols < 2, 0.7, 0.8))
    normal_slides = [_slide(tmp_path, f"n{i}", 0, np.full(16, 0.1)) for i in range(3)]
    hms, slides = zip(tumour_slide, *normal_slides, strict=True)
    loc = localisation(hms, slides, "tumour")
    assert loc.prob_auc_within == 0.0  # tumour ranked below normal inside the tumour slide
    assert loc.prob_auc > 0.8  # pooled: the normal slides' patches make it look good
    assert (loc.n_tumour, loc.n_normal, loc.n_tumour_slides, loc.n_normal_in_tumour_slides) == (8, 56, 1, 8)
    # A real localiser scores well on both.
    good = _slide(tmp_path, "g", 2, np.where(cols < 2, 0.9, 0.3))
    loc = localisation([good[0], *[h for h, _ in normal_slides]], [good[1], *[s for _, s in normal_slides]], "tumour")
    assert loc.prob_auc_within == 1.0 and loc.prob_auc == 1.0
