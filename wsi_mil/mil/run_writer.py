"""Turn a :class:`~wsi_mil.mil.cv.CVResult` into the files of ``OUT/models/<run>/``.

The tables are built by pure functions (:func:`run_metrics`, :func:`prediction_table`,
:func:`split_rows`, :func:`history_rows`) and written together, atomically, by
:func:`write_cv_run` through :func:`wsi_mil.io.run_folder.write_run`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_mil.io.provenance import SLIDE_FINGERPRINT, digest
from wsi_mil.mil.config import TrainConfig
from wsi_mil.mil.cv import CVResult
from wsi_mil.mil.data import LabelTable
from wsi_mil.mil.metrics import CASE_AGGREGATION, case_metrics, case_table, classification_metrics, summarize
from wsi_mil.mil.protocol import SELECTION

_SUMMARY = ("accuracy", "balanced_accuracy", "auc", "f1")


def run_metrics(result: CVResult, labels: LabelTable) -> dict[str, Any]:
    """``metrics.json``: per-fold test metrics and their summary, out of fold, and per case.

    Parameters
    ----------
    result : CVResult
    labels : LabelTable
        The slides ``result`` was trained on, in the same order.

    Returns
    -------
    dict
    """
    per_fold, case_folds = [], []
    for f in result.folds:
        h = next(r for r in f.history if r["epoch"] == f.selected_epoch)
        y_test = labels.y[f.split["test"]]
        per_fold.append(
            {
                "fold": f.fold,
                "selected_epoch": f.selected_epoch,
                "val_error": h["val_error"],
                "val_loss": h["val_loss"],
                **classification_metrics(y_test, f.test_probs),
            }
        )
        test_cases = [labels.case_ids[i] for i in f.split["test"]]
        case_folds.append({"fold": f.fold, **case_metrics(test_cases, y_test, f.test_probs)})
    oof = result.oof_probs
    return {
        "classes": labels.classes,
        "selection": SELECTION,
        "folds": per_fold,
        "summary": summarize([{m: f[m] for m in _SUMMARY} for f in per_fold]),
        "out_of_fold": classification_metrics(labels.y, oof),
        "case": {
            "aggregation": CASE_AGGREGATION,
            "n_cases": len(set(labels.case_ids)),
            "folds": case_folds,
            "summary": summarize([{m: f[m] for m in _SUMMARY} for f in case_folds]),
            "out_of_fold": case_metrics(labels.case_ids, labels.y, oof),
        },
        "seconds": result.seconds,
    }


def prediction_table(result: CVResult, labels: LabelTable) -> Any:
    """``predictions.csv``: out of fold, ``case_id, slide_id, label, fold, prediction, prob_<class>...``."""
    import pandas as pd

    oof = result.oof_probs
    pred = pd.DataFrame(
        {
            "case_id": labels.case_ids,
            "slide_id": labels.slide_ids,
            "label": [labels.classes[i] for i in labels.y],
            "fold": result.oof_fold,
            "prediction": [labels.classes[i] for i in oof.argmax(1)],
        }
    )
    for c, name in enumerate(labels.classes):
        pred[f"prob_{name}"] = oof[:, c]
    return pred


def split_rows(result: CVResult, labels: LabelTable, bag_attrs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``splits.csv`` rows: ``case_id, slide_id, fold, split, slide_fingerprint``."""
    return [
        {
            "case_id": labels.case_ids[i],
            "slide_id": labels.slide_ids[i],
            "fold": f.fold,
            "split": s,
            SLIDE_FINGERPRINT: str(bag_attrs[i].get(SLIDE_FINGERPRINT, "")),
        }
        for f in result.folds
        for s in ("train", "val", "test")
        for i in f.split[s]
    ]


def history_rows(result: CVResult) -> list[dict[str, Any]]:
    """``history.csv`` rows: ``fold`` then each epoch's history."""
    return [{"fold": f.fold, **h} for f in result.folds for h in f.history]


def write_cv_run(
    run_dir: str | os.PathLike[str],
    result: CVResult,
    labels: LabelTable,
    cfg: TrainConfig,
    *,
    encoder: str,
    labels_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    bag_attrs: Sequence[Mapping[str, Any]],
    bag_settings: dict[str, Any] | None,
    provenance: Mapping[str, Any],
) -> Path:
    """Write the run folder of ``result`` atomically (it appears only complete).

    Parameters
    ----------
    run_dir : path-like
        ``OUT/models/<run>``; must not exist.
    result : CVResult
    labels : LabelTable
        The slides of ``result``, in its order.
    cfg : TrainConfig
        The resolved config (written to ``config.yaml``).
    encoder, labels_csv, out_dir
        Recorded in ``config.yaml`` and ``pipeline.yaml``.
    bag_attrs : sequence of mapping
        Each slide's bag attributes (fingerprints, provenance).
    bag_settings : dict or None
        The settings every bag records (:func:`wsi_mil.mil.train.same_settings`).
    provenance : mapping
        What made the run (:func:`wsi_mil.mil.train.run_inputs`); its digest goes to ``model.json``.

    Returns
    -------
    Path
        ``run_dir``.
    """
    from wsi_mil.io.run_folder import checkpoint_name, collect_settings, write_run

    model_json = {
        "model": cfg.model.name,
        "kwargs": result.model_kwargs,
        "in_dim": result.in_dim,
        "n_classes": result.n_classes,
        "classes": labels.classes,
        "encoder": encoder,
        "folds": len(result.folds),
        "checkpoints": [checkpoint_name(f.fold) for f in result.folds],
        "ensemble": "mean of the fold models' probabilities",
        "bag_settings": digest(bag_settings) if bag_settings is not None else "",
        "provenance": digest(dict(provenance)),
    }
    pipeline = collect_settings(Path(out_dir), encoder, dict(bag_attrs[0]))
    pipeline["bag_settings"] = bag_settings
    oof = result.oof_probs
    return write_run(
        run_dir,
        states=result.states,
        model_spec=model_json,
        config={**cfg.to_dict(), "encoder": encoder, "labels_csv": str(labels_csv)},
        pipeline=pipeline,
        metrics=run_metrics(result, labels),
        predictions=prediction_table(result, labels),
        case_predictions=case_table(labels.case_ids, labels.y, oof, labels.classes, result.oof_fold),
        splits=split_rows(result, labels, bag_attrs),
        history=history_rows(result),
    )
