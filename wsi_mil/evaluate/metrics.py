"""Localisation metrics: patch AUC (within slides and pooled), average precision, FROC, dice.

Pure functions of arrays. FROC follows the CAMELYON16 evaluation: each detection is a point
with a score; the first detection inside a lesion (the highest-scoring one) makes it found,
later ones inside it count for nothing, a detection outside every lesion is a false
positive, and one inside an isolated-tumour-cell lesion is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_mil.evaluate.truth import LesionMap

#: Average false positives per slide at which FROC sensitivities are averaged (CAMELYON16).
FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Detections are local maxima of the patch-score map at least this many patches apart.
DETECTION_RADIUS = 2


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``y``; NaN when one class is absent.

    Examples
    --------
    >>> roc_auc(np.array([0, 0, 1]), np.array([0.1, 0.4, 0.9]))
    1.0
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return math.nan
    return float(roc_auc_score(y, scores))


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the precision–recall steps); NaN without positives."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y)
    if not (y == 1).any():
        return math.nan
    return float(average_precision_score(y, scores))


def dice(y: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Dice of ``scores >= threshold`` against ``y == 1`` (NaN when both are empty).

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.7, 0.1]), 0.5)
    0.5
    """
    pred = np.asarray(scores) >= threshold
    truth = np.asarray(y) == 1
    denom = int(pred.sum() + truth.sum())
    return 2.0 * int((pred & truth).sum()) / denom if denom else math.nan


def detect(
    coords: np.ndarray, scores: np.ndarray, size: int, radius: int = DETECTION_RADIUS
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion detections of a patch-score map: local maxima, each a point with a score.

    The scores are placed on the patch lattice; every local maximum (``skimage.feature.
    peak_local_max``, a square window of ``2·radius + 1`` patches, plateaus thinned to
    ``radius`` apart) with a score above 0 becomes a detection at its patch's centre.

    Parameters
    ----------
    coords : ndarray
        (N, 2) level-0 top-left (x, y).
    scores : ndarray
        (N,) scores in [0, 1].
    size : int
        Patch side in level-0 pixels.
    radius : int
        Least distance between two detections, in patches.

    Returns
    -------
    (ndarray, ndarray)
        (M, 2) level-0 points and (M,) their scores, highest first.
    """
    from skimage.feature import peak_local_max

    from wsi_mil.heatmaps.raster import grid_unit

    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if not len(coords):
        return np.zeros((0, 2)), np.zeros(0)
    origin = coords.min(0)
    rel = coords - origin
    extent = rel.max(0) + size
    unit = grid_unit(rel, size, int(extent[0]), int(extent[1]))
    ij = rel // unit  # (N, 2) lattice (column, row)
    grid = np.full((int(ij[:, 1].max()) + 1, int(ij[:, 0].max()) + 1), -1.0)
    np.maximum.at(grid, (ij[:, 1], ij[:, 0]), scores)
    peaks = peak_local_max(grid, min_distance=max(1, round(radius * size / unit)), threshold_abs=0.0,
                           exclude_border=False)  # (M, 2) row, column  # fmt: skip
    if not len(peaks):
        return np.zeros((0, 2)), np.zeros(0)
    values = grid[peaks[:, 0], peaks[:, 1]]
    points = origin + peaks[:, ::-1] * unit + size / 2.0
    order = np.argsort(-values, kind="stable")
    return points[order].astype(np.float64), values[order]


@dataclass
class SlideDetections:
    """Detections of one slide scored against its lesions.

    Attributes
    ----------
    lesion_scores : ndarray
        (L,) per lesion to be found: the highest score of a detection inside it, NaN if none.
    fp_scores : ndarray
        Scores of the detections outside every lesion.
    """

    lesion_scores: np.ndarray
    fp_scores: np.ndarray

    def found(self, threshold: float) -> int:
        """Lesions found by a detection scoring at least ``threshold``."""
        return int((np.nan_to_num(self.lesion_scores, nan=-np.inf) >= threshold).sum())

    def false_positives(self, threshold: float) -> int:
        """False-positive detections scoring at least ``threshold``."""
        return int((self.fp_scores >= threshold).sum())


def score_detections(points: np.ndarray, scores: np.ndarray, lesions: LesionMap) -> SlideDetections:
    """Match detections to lesions, the CAMELYON16 way (see the module docstring)."""
    label = lesions.lookup(points)
    scores = np.asarray(scores, np.float64)
    wanted = lesions.lesions
    best = np.full(len(wanted), np.nan)
    for i, k in enumerate(wanted):
        hit = scores[label == k]
        if hit.size:
            best[i] = hit.max()
    fp = scores[label == 0]
    return SlideDetections(best, fp)


def froc_curve(slides: Sequence[SlideDetections]) -> tuple[np.ndarray, np.ndarray]:
    """The FROC curve: average false positives per slide and lesion sensitivity per threshold.

    Every distinct detection score is a threshold (a detection counts when its score is at
    least the threshold), plus one above every score (no detection: 0, 0). Points of equal
    false-positive rate keep the highest sensitivity.

    Returns
    -------
    (ndarray, ndarray)
        False positives per slide (increasing) and the sensitivities; empty when no slide has
        a lesion to find.
    """
    lesion = np.concatenate([s.lesion_scores for s in slides]) if slides else np.zeros(0)
    fp = np.concatenate([s.fp_scores for s in slides]) if slides else np.zeros(0)
    if not lesion.size:
        return np.zeros(0), np.zeros(0)
    found = np.sort(lesion[~np.isnan(lesion)])
    fp = np.sort(fp)
    thresholds = np.unique(np.concatenate([found, fp]))[::-1]  # high to low
    n_found = found.size - np.searchsorted(found, thresholds, side="left")
    n_fp = fp.size - np.searchsorted(fp, thresholds, side="left")
    fps = np.concatenate([[0.0], n_fp / len(slides)])
    sens = np.concatenate([[0.0], n_found / lesion.size])
    keep = np.r_[fps[1:] != fps[:-1], True]  # last point of each run of equal rates
    return fps[keep], sens[keep]


def froc_score(slides: Sequence[SlideDetections], rates: Sequence[float] = FROC_RATES) -> float:
    """Mean sensitivity at the given average false positives per slide (CAMELYON16: 1/4 … 8).

    Sensitivity between two operating points is interpolated linearly (as the CAMELYON16
    script does with ``np.interp``); beyond the last point it stays at the last one.

    Examples
    --------
    >>> hit = SlideDetections(np.array([0.9]), np.array([]))
    >>> froc_score([hit, SlideDetections(np.zeros(0), np.array([0.5]))])
    1.0
    """
    fps, sens = froc_curve(slides)
    if not fps.size:
        return math.nan
    return float(np.mean(np.interp(np.asarray(rates, np.float64), fps, sens)))
