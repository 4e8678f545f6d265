"""Score heatmaps against the ground truth of synthetic slides (localisation AUC)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wsi_mil.synthetic.slides import SyntheticTruth


@dataclass(frozen=True)
class Localisation:
    """How well per-patch scores rank tumour patches above normal ones.

    The headline is :attr:`prob_auc_within`: tumour against normal patches *of the same
    tumour slide*, so a slide-level signal (every patch of a tumour slide scoring higher
    than every patch of a normal one) cannot raise it. :attr:`prob_auc` pools the patches of
    all slides, where most normal patches come from normal slides; it rewards that signal
    too and is reported beside it. ``wsi-mil evaluate`` names the two ``patch_auc`` and
    ``patch_auc_pooled`` (same definitions).

    Attributes
    ----------
    prob_auc : float
        AUC of the per-patch tumour probability, pooled over all given slides.
    attention_auc : float
        AUC of attention within each tumour slide (tumour vs normal patches of the same
        slide; attention is a per-slide distribution), averaged over tumour slides.
    n_tumour, n_normal : int
        Patches counted as tumour (≥ ``pos`` of the patch is tumour) and normal (none).
    prob_auc_within : float
        AUC of the per-patch tumour probability within each tumour slide, averaged over the
        tumour slides (those with both tumour and normal patches).
    n_tumour_slides : int
        Slides that count towards the within-slide AUCs.
    n_normal_in_tumour_slides : int
        Normal patches of those slides.
    """

    prob_auc: float
    attention_auc: float
    n_tumour: int
    n_normal: int
    prob_auc_within: float = float("nan")
    n_tumour_slides: int = 0
    n_normal_in_tumour_slides: int = 0


def patch_labels(truth: SyntheticTruth, coords: np.ndarray, size: int, pos: float = 0.5) -> np.ndarray:
    """Per patch: 1 tumour (share ≥ ``pos``), 0 normal (no tumour), -1 ambiguous (ignored)."""
    share = np.array([truth.fraction_in(int(x), int(y), size, "tumour") for x, y in coords])
    return np.where(share >= pos, 1, np.where(share == 0, 0, -1))


def localisation(heatmaps: Sequence[str | Path], slides: Sequence[str | Path], tumour_class: str) -> Localisation:
    """Localisation AUCs of heatmap files ``heatmaps/<run>/<id>.h5`` on synthetic slides.

    Within each tumour slide (the headline, :attr:`Localisation.prob_auc_within`) and
    pooled over all slides (:attr:`Localisation.prob_auc`).

    Parameters
    ----------
    heatmaps : sequence of path-like
        Heatmap HDF5 files, one per slide.
    slides : sequence of path-like
        The synthetic slides, in the same order (their ``.truth.npz`` is read).
    tumour_class : str
        The class whose instance probability is the tumour score.
    """
    from sklearn.metrics import roc_auc_score

    from wsi_mil.io.h5 import read_heatmap_data
    from wsi_mil.synthetic.slides import load_truth

    probs, labels, att_aucs, prob_aucs, n_normal_within = [], [], [], [], 0
    for hm, slide in zip(heatmaps, slides, strict=True):
        data = read_heatmap_data(hm)
        y = patch_labels(load_truth(slide), data.coords, int(data.attrs["patch_size_level0"]))
        k = list(data.class_names).index(tumour_class)
        keep = y >= 0
        probs.append(data.instance_probs[keep, k])
        labels.append(y[keep])
        if (y == 1).any() and (y == 0).any():  # a tumour slide: tumour vs normal patches of its own
            att_aucs.append(roc_auc_score(y[keep], data.attention[keep]))
            prob_aucs.append(roc_auc_score(y[keep], data.instance_probs[keep, k]))
            n_normal_within += int((y == 0).sum())
    p, y = np.concatenate(probs), np.concatenate(labels)
    prob_auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    att_auc = float(np.mean(att_aucs)) if att_aucs else float("nan")
    within = float(np.mean(prob_aucs)) if prob_aucs else float("nan")
    return Localisation(prob_auc, att_auc, int(y.sum()), int((y == 0).sum()), within, len(prob_aucs), n_normal_within)
