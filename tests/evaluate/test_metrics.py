"""Localisation metrics on maps of known quality, and FROC on a configuration checked by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

from tests.evaluate.conftest import MPP, grid, write_heatmap
from wsi_mil.evaluate.annotations import Annotation
from wsi_mil.evaluate.export import write_geojson_annotation
from wsi_mil.evaluate.metrics import detect, froc_curve, froc_score, score_detections
from wsi_mil.evaluate.run import evaluate_run
from wsi_mil.evaluate.truth import lesion_map, patch_fractions, patch_labels

DIMS = (6144, 4096)
SIZE = 256
#: Annotation folder, patch truth per slide, the patch grid.
Cohort = tuple[Path, dict[str, np.ndarray], np.ndarray]


def _lesions(i: int) -> list:
    """Two or three rectangles, 2.5k–3.5k µm² … 0.8 mm a side, placed by slide index."""
    rng = np.random.default_rng(i)
    out = []
    for k in range(2 + i % 2):
        w, h = rng.integers(4, 9, 2) * 200
        x = 300 + k * 2000 + rng.integers(0, 300)
        y = 300 + rng.integers(0, DIMS[1] - h - 600)
        out.append(box(x, y, x + w, y + h))
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Annotations of 4 positive slides (2–3 lesions each) and 4 negative ones; their patch truth."""
    root = tmp_path_factory.mktemp("eval_metrics")
    ann = root / "ann"
    coords = grid(*DIMS, SIZE)
    truth = {}
    for i in range(8):
        sid = f"s{i}"
        if i < 4:
            from shapely.ops import unary_union

            geom = unary_union(_lesions(i))
            write_geojson_annotation(ann / f"{sid}.geojson", geom)
            truth[sid] = patch_labels(patch_fractions(Annotation(sid, geometry=geom), coords, SIZE))
        else:
            truth[sid] = np.zeros(len(coords), np.int8)
    return ann, truth, coords


def _run(root: Path, cohort: Cohort, score_of: Callable[[int, np.ndarray], np.ndarray]) -> dict:
    ann, truth, coords = cohort
    hm = root / "hm"
    for i, (sid, y) in enumerate(truth.items()):
        write_heatmap(hm, sid, coords, SIZE, score_of(i, y), DIMS)
    return evaluate_run(hm, ann).summary


def test_the_truth_itself_scores_perfectly(tmp_path: Path, cohort: Cohort) -> None:
    summary = _run(tmp_path, cohort, lambda i, y: (y == 1).astype(float))
    m = summary["prob_tumour"]
    assert m["patch_auc"] == m["patch_auc_pooled"] == m["average_precision"] == 1.0
    assert m["dice"] == 1.0 and m["froc"] == 1.0
    assert summary["prob_normal"]["patch_auc"] == 0.0
    # Attention is a distribution over each slide: within positive slides it is perfect too,
    # but a negative slide's (uniform) attention peaks at its maximum like any other slide's.
    att = summary["attention"]
    assert att["patch_auc"] == 1.0 and att["dice"] == 1.0
    assert att["patch_auc_pooled"] < 1.0


def test_an_inverted_map_scores_auc_zero(tmp_path: Path, cohort: Cohort) -> None:
    m = _run(tmp_path, cohort, lambda i, y: (y != 1).astype(float))["prob_tumour"]
    assert m["patch_auc"] == 0.0 and m["patch_auc_pooled"] == 0.0 and m["dice"] == 0.0


def test_a_random_map_scores_auc_near_one_half(tmp_path: Path, cohort: Cohort) -> None:
    rng = np.random.default_rng(0)
    m = _run(tmp_path, cohort, lambda i, y: rng.random(len(y)))["prob_tumour"]
    assert abs(m["patch_auc"] - 0.5) < 0.06 and abs(m["patch_auc_pooled"] - 0.5) < 0.04, m
    assert m["froc"] < 0.5, m


def test_a_slide_level_signal_inflates_only_the_pooled_auc(tmp_path: Path, cohort: Cohort) -> None:
    """Constant within each slide, higher on positive slides: no localisation at all."""
    _, truth, _ = cohort
    m = _run(tmp_path, cohort, lambda i, y: np.full(len(y), 0.8 if (y == 1).any() else 0.2))["prob_tumour"]
    n_pos = sum(int((y == 1).sum()) for y in truth.values())
    assert n_pos > 100
    assert m["patch_auc"] == 0.5
    assert m["patch_auc_pooled"] > 0.75, m


def test_froc_on_a_configuration_checked_by_hand() -> None:
    """Slide A: lesions L1, L2; slide B: lesion L3 and an isolated-tumour-cell cluster (ITC).

    Detections (score, where): A: 0.9 L1, 0.6 L1 (a second hit: nothing), 0.8 outside (FP),
    0.3 L2; B: 0.7 and 0.2 outside (FPs), 0.5 L3, 0.95 in the ITC (ignored).
    Operating points (FPs per slide, sensitivity) from threshold 0.9 down: (0, 1/3), (0.5, 1/3),
    (1, 1/3), (1, 2/3), (1, 1), (1.5, 1). Sensitivity at 1/4, 1/2, 1, 2, 4, 8 FPs:
    1/3, 1/3, 1, 1, 1, 1 → FROC = (2/3 + 4) / 6 = 7/9.
    """
    a = Annotation("A", geometry=box(0, 0, 1000, 1000).union(box(4000, 0, 5000, 1000)))
    b = Annotation("B", geometry=box(0, 0, 1000, 1000).union(box(5000, 3000, 5200, 3200)))  # ITC: 100 µm
    la, lb = lesion_map(a, MPP), lesion_map(b, MPP)
    assert len(la.lesions) == 2 and len(lb.lesions) == 1 and len(lb.itc) == 1
    det_a = score_detections(np.array([[500, 500], [900, 100], [2500, 2500], [4500, 500]]),
                             np.array([0.9, 0.6, 0.8, 0.3]), la)  # fmt: skip
    det_b = score_detections(np.array([[7000, 3500], [3000, 500], [500, 500], [5100, 3100]]),
                             np.array([0.7, 0.2, 0.5, 0.95]), lb)  # fmt: skip
    fps, sens = froc_curve([det_a, det_b])
    np.testing.assert_allclose(fps, [0, 0.5, 1, 1.5])
    np.testing.assert_allclose(sens, [1 / 3, 1 / 3, 1, 1])
    assert froc_score([det_a, det_b]) == pytest.approx(7 / 9)
    # A detection 30 µm outside a lesion lies in its grown outline (37.5 µm): a hit.
    assert la.lookup(np.array([[1060.0, 500.0], [1100.0, 500.0]])).tolist() == [1, 0]


def test_detections_are_local_maxima_at_patch_centres() -> None:
    coords = grid(2560, 256, 256)  # one row of 10 patches
    scores = np.array([0.1, 0.9, 0.2, 0.0, 0.0, 0.0, 0.3, 0.7, 0.4, 0.0])
    points, values = detect(coords, scores, 256, radius=2)
    np.testing.assert_allclose(values, [0.9, 0.7])
    np.testing.assert_allclose(points, [[384, 128], [1920, 128]])
