"""Bag-level classification metrics written to ``metrics.json``."""

from __future__ import annotations

import math

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
