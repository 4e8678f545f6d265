"""Per-patch scores: which one to show, how to normalise it, which colours it gets.

Pure functions of arrays; nothing here opens a file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_mil.errors import ConfigError


def normalise_scores(
    values: np.ndarray, method: str, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Map per-patch scores to [0, 1].

    Parameters
    ----------
    values : ndarray
        (N,) scores.
    method : str
        ``raw`` (clip to [0, 1]), ``minmax``, ``percentile`` (clip to the given
        percentiles, then min–max) or ``rank`` (rank / (N − 1), ties averaged).
    percentiles : tuple of float
        Percentiles for ``percentile``.

    Returns
    -------
    ndarray
        (N,) float32 in [0, 1]; a constant input maps to 0.5 (min–max has no range).

    Examples
    --------
    >>> normalise_scores(np.array([1.0, 2.0, 3.0]), "minmax").tolist()
    [0.0, 0.5, 1.0]
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return v.astype(np.float32)
    if method == "raw":
        return np.clip(v, 0.0, 1.0).astype(np.float32)
    if method == "rank":
        if v.size == 1:
            return np.full(1, 0.5, np.float32)
        from scipy.stats import rankdata

        return ((rankdata(v, method="average") - 1.0) / (v.size - 1)).astype(np.float32)
    if method == "percentile":
        lo, hi = np.percentile(v, percentiles)
        v = np.clip(v, lo, hi)
    elif method != "minmax":
        raise ConfigError(f"unknown normalisation {method!r}; use raw, minmax, percentile or rank")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return np.full(v.shape, 0.5, np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


def select_score(
    score: str, attention: np.ndarray, instance_probs: np.ndarray, class_names: Sequence[str]
) -> tuple[str, np.ndarray]:
    """Pick the score to render: attention, or one class's instance probability.

    Parameters
    ----------
    score : str
        ``"attention"``, a class name, ``"prob:<name>"`` or ``"prob:<index>"``.
    attention, instance_probs : ndarray
        (N,) and (N, K).
    class_names : sequence of str
        The K class names.

    Returns
    -------
    (str, ndarray)
        A measurement name (``attention`` or ``prob_<class>``) and the (N,) values.
    """
    if score == "attention":
        return "attention", np.asarray(attention, np.float64)
    names = [str(c) for c in class_names]
    key = score[5:] if score.startswith("prob:") else score
    if key in names:
        k = names.index(key)
    elif key.isdigit() and int(key) < len(names):
        k = int(key)
    else:
        raise ConfigError(
            f"heatmap score {score!r} is neither 'attention' nor a class ({', '.join(names)})"
        )
    return f"prob_{names[k]}", np.asarray(instance_probs, np.float64)[:, k]


def colour_lut(colormap: str, opacity: float = 1.0) -> np.ndarray:
    """(257, 4) uint8 RGBA table: rows 0–255 the colormap, row 256 transparent (no score).

    Parameters
    ----------
    colormap : str
        A matplotlib colormap name.
    opacity : float
        Alpha of the coloured rows, in [0, 1].
    """
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as exc:
        raise ConfigError(
            f"unknown colormap {colormap!r}; use a matplotlib name such as jet, "
            "viridis, magma, coolwarm"
        ) from exc
    lut = np.zeros((257, 4), np.uint8)
    lut[:256] = np.round(cmap(np.linspace(0.0, 1.0, 256)) * 255).astype(np.uint8)
    lut[:256, 3] = round(opacity * 255)
    return lut


def to_lut_index(values: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """Scores in [0, 1] (NaN = none) → uint16 LUT rows; NaN or not ``visible`` → row 256."""
    v = np.asarray(values, dtype=np.float32)
    idx = np.round(np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0) * 255).astype(np.uint16)
    hidden = np.isnan(v)
    if visible is not None:
        hidden |= ~visible
    idx[hidden] = 256
    return idx
