"""Bag-level classification metrics written to ``metrics.json``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC and F1 of bag probabilities.

    Parameters
    ----------
    y : ndarray
        (S,) true class indices.
    probs : ndarray
        (S, K) class probabilities.

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy``, ``auc`` (binary: of class 1; multi-class:
        one-vs-rest macro; NaN when a class is absent) and ``f1`` (binary: of class 1;
        multi-class: macro), plus ``n``.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    K = probs.shape[1]
    pred = probs.argmax(1)
    out = {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
    }
    try:
        if K == 2:
            out["auc"] = float(roc_auc_score(y, probs[:, 1]))
        else:
            p = probs / probs.sum(1, keepdims=True)
            out["auc"] = float(roc_auc_score(y, p, multi_class="ovr", labels=list(range(K))))
    except ValueError:
        out["auc"] = math.nan
    avg = "binary" if K == 2 else "macro"
    out["f1"] = float(f1_score(y, pred, average=avg, labels=list(range(K)), zero_division=0))
    return out


def summarize(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and std over folds of every metric (NaNs ignored)."""
    keys = [k for k in per_fold[0] if k != "n"]
    summary = {}
    for k in keys:
        vals = np.array([f[k] for f in per_fold], dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        summary[k] = {
            "mean": float(ok.mean()) if len(ok) else math.nan,
            "std": float(ok.std()) if len(ok) else math.nan,
        }
    return summary


#: How a case's probability is made from its slides' (written into metrics.json).
CASE_AGGREGATION = "mean of the case's slide probabilities; a case whose slides disagree on the label is left out"


def aggregate_cases(
    case_ids: list[str], y: np.ndarray | None, probs: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per case (patient): the mean of its slides' probabilities and its label.

    Parameters
    ----------
    case_ids : list of str
        (S,) case of each slide.
    y : ndarray or None
        (S,) class index of each slide; None when unknown (new slides).
    probs : ndarray
        (S, K) slide probabilities.

    Returns
    -------
    cases : list of str
        Case ids in order of first appearance.
    y_case : ndarray
        (C,) the label shared by the case's slides, -1 when they disagree or are unknown.
    p_case : ndarray
        (C, K) mean of the case's slide probabilities.
    n_slides : ndarray
        (C,) slides per case.

    Examples
    --------
    >>> c, yc, pc, n = aggregate_cases(["a", "a", "b"], np.array([1, 1, 0]),
    ...                                np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]]))
    >>> c, yc.tolist(), pc.round(2).tolist(), n.tolist()
    (['a', 'b'], [1, 0], [[0.3, 0.7], [0.9, 0.1]], [2, 1])
    """
    probs = np.asarray(probs, dtype=np.float64)
    cases = list(dict.fromkeys(case_ids))
    index = {c: i for i, c in enumerate(cases)}
    rows = np.array([index[c] for c in case_ids])
    n_slides = np.bincount(rows, minlength=len(cases))
    p_case = np.zeros((len(cases), probs.shape[1]))
    np.add.at(p_case, rows, probs)
    p_case /= n_slides[:, None]
    y_case = np.full(len(cases), -1, np.int64)
    if y is not None:
        y = np.asarray(y)
        for i in range(len(cases)):
            labels = set(y[rows == i].tolist())
            if len(labels) == 1:
                y_case[i] = labels.pop()
    return cases, y_case, p_case, n_slides


def case_metrics(case_ids: list[str], y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Classification metrics over cases (mean slide probability); mixed-label cases left out."""
    _, y_case, p_case, _ = aggregate_cases(case_ids, y, probs)
    keep = y_case >= 0
    out: dict[str, Any] = classification_metrics(y_case[keep], p_case[keep]) if keep.any() else {
        "n": 0, "accuracy": float("nan"), "balanced_accuracy": float("nan"), "auc": float("nan"), "f1": float("nan")
    }
    out["n_mixed_label_cases"] = int((~keep).sum())
    return out


def case_table(
    case_ids: list[str],
    y: np.ndarray | None,
    probs: np.ndarray,
    classes: list[str],
    fold: np.ndarray | None = None,
) -> Any:
    """Per-case predictions: ``case_id, n_slides, [label], [fold], prediction, prob_<class>...``.

    The case's probabilities are the mean of its slides' (:data:`CASE_AGGREGATION`); its
    label is empty when its slides disagree, its fold the fold that tested it.
    """
    import pandas as pd

    cases, y_case, p_case, n = aggregate_cases(case_ids, y, probs)
    df = pd.DataFrame({"case_id": cases, "n_slides": n})
    if y is not None:
        df["label"] = [classes[i] if i >= 0 else "" for i in y_case]
    if fold is not None:
        tested_in = {c: int(f) for c, f in zip(case_ids, fold, strict=True)}  # a case's slides share one test fold
        df["fold"] = [tested_in[c] for c in cases]
    df["prediction"] = [classes[i] for i in p_case.argmax(1)]
    for c, name in enumerate(classes):
        df[f"prob_{name}"] = p_case[:, c]
    return df
