"""What ``wsi-mil evaluate`` writes into EVAL, each file atomically.

::

    EVAL/
      summary.json            {score: {patch_auc, patch_auc_pooled, average_precision, froc, dice}}
      per_slide.csv           one row per slide: patch counts, lesions, per score AUC, dice, lesions found
      roc.png                 pooled patch ROC curve of every score
      froc.png                lesion-level FROC curve of every score
      evaluate_config.yaml    the resolved settings and the input folders

Undefined values (an AUC on a slide with one class) are NaN in the CSV and ``null`` in JSON.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_mil.io.atomic import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from wsi_mil.evaluate.run import Evaluation

SUMMARY = "summary.json"
PER_SLIDE = "per_slide.csv"
ROC_PNG = "roc.png"
FROC_PNG = "froc.png"
CONFIG = "evaluate_config.yaml"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def per_slide_table(ev: Evaluation) -> Any:
    """The rows of ``per_slide.csv`` as a DataFrame (lesion counts at the config's threshold)."""
    import pandas as pd

    from wsi_mil.evaluate.metrics import dice, roc_auc

    t = ev.config.threshold
    rows = []
    for s in ev.slides:
        keep = s.labels >= 0
        row: dict[str, Any] = {
            "slide_id": s.slide_id,
            "annotation": s.annotation,
            "trained_on": s.trained_on,
            "positive": s.positive,
            "n_patches": s.n_patches,
            "n_pos": int((s.labels == 1).sum()),
            "n_neg": int((s.labels == 0).sum()),
            "n_ignored": int((s.labels < 0).sum()),
            "n_lesions": s.n_lesions,
            "n_itc": s.n_itc,
        }
        for name in ev.score_names:
            det = s.detections[name]
            row[f"{name}_auc"] = roc_auc(s.labels[keep], s.scores[name][keep])
            row[f"{name}_dice"] = dice(s.labels[keep], s.scores[name][keep], t) if s.positive else math.nan
            row[f"{name}_lesions_found"] = det.found(t)
            row[f"{name}_false_positives"] = det.false_positives(t)
        rows.append(row)
    return pd.DataFrame(rows)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def roc_png(ev: Evaluation) -> bytes:
    """Pooled patch ROC curves, one per score, AUCs (within positive slides, pooled) in the legend."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name in ev.score_names:
        y = np.concatenate([s.labels[s.labels >= 0] for s in ev.slides])
        v = np.concatenate([s.scores[name][s.labels >= 0] for s in ev.slides])
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, v)
        m = ev.summary[name]
        ax.plot(fpr, tpr, label=f"{name}: AUC {m['patch_auc']:.3f} within, {m['patch_auc_pooled']:.3f} pooled")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="false-positive rate (patches)", ylabel="true-positive rate (patches)",
           title="Patch ROC, pooled over slides", xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def froc_png(ev: Evaluation) -> bytes:
    """Lesion-level FROC curves, one per score, with the CAMELYON16 rates marked."""
    from matplotlib.figure import Figure

    from wsi_mil.evaluate.metrics import FROC_RATES, froc_curve

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name in ev.score_names:
        fps, sens = froc_curve([s.detections[name] for s in ev.slides])
        if not fps.size:
            continue
        # Lines, as the score interpolates; 0 false positives at the left edge, the last
        # sensitivity held to the right edge (as np.interp holds it).
        x = np.r_[np.maximum(fps, FROC_RATES[0] / 2), max(FROC_RATES[-1], fps[-1])]
        ax.plot(x, np.r_[sens, sens[-1]], marker=".", label=f"{name}: FROC {ev.summary[name]['froc']:.3f}")
    for r in FROC_RATES:
        ax.axvline(r, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="average false positives per slide", ylabel="lesion sensitivity",
           title="Lesion FROC (CAMELYON16)", ylim=(0, 1.01))  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def write_report(out: str | os.PathLike[str], ev: Evaluation) -> dict[str, Path]:
    """Write every EVAL file atomically; returns their paths by name."""
    from wsi_mil.config import dump_config

    out = Path(out)
    paths = {k: out / n for k, n in (("summary", SUMMARY), ("per_slide", PER_SLIDE), ("roc", ROC_PNG),
                                      ("froc", FROC_PNG), ("config", CONFIG))}  # fmt: skip
    # Render everything before the first write, so a failure leaves EVAL as it was.
    summary = json.dumps(_json_safe(ev.summary), indent=2) + "\n"
    table = per_slide_table(ev).to_csv(index=False)
    roc, froc = roc_png(ev), froc_png(ev)
    write_text_atomic(paths["summary"], summary)
    write_text_atomic(paths["per_slide"], table)
    write_bytes_atomic(paths["roc"], roc)
    write_bytes_atomic(paths["froc"], froc)
    inputs = {"heatmaps": str(ev.heatmaps), "annotations": str(ev.annotations)}
    dump_config(paths["config"], {"evaluate": ev.config, "inputs": inputs})
    return paths
