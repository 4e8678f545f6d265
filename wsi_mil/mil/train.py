"""Stage 3 training: ``train_run`` reads the inputs, cross-validates and writes the run.

The pieces, each its own module so that one can be changed alone:

* :mod:`wsi_mil.mil.cv` — splits grouped by case (:func:`make_splits`), one model per fold
  (:func:`train_fold`), :func:`cross_validate` returning a :class:`CVResult`;
* :mod:`wsi_mil.mil.fit` — one fold's epoch loop (:func:`fit_fold`);
* :mod:`wsi_mil.mil.protocol` — the loss sum and the epoch-selection rule;
* :mod:`wsi_mil.mil.run_writer` — the files of ``OUT/models/<run>/`` (listed in
  :mod:`wsi_mil.io.run_folder`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from wsi_mil.errors import BagError, ConfigError
from wsi_mil.harness.lock import locks_output
from wsi_mil.io.h5 import read_bag
from wsi_mil.io.layout import Layout
from wsi_mil.io.provenance import PROVENANCE, changes, recorded, settings_only
from wsi_mil.mil.config import TrainConfig
from wsi_mil.mil.cv import cross_validate, make_splits, model_kwargs, resolve_device
from wsi_mil.mil.data import LabelTable, bag_paths, read_labels
from wsi_mil.mil.metrics import case_table
from wsi_mil.mil.run_writer import write_cv_run

__all__ = ["case_table", "make_splits", "model_kwargs", "resolve_device", "resolve_encoder", "run_inputs",
           "same_settings", "train_run"]


def same_settings(paths: Sequence[Path], attrs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The tiling and extraction settings every bag records (None for bags that predate them).

    Raises
    ------
    ConfigError
        Two bags were made differently (other tiling, encoder, weights or precision).
    """
    first = settings_only(recorded(attrs[0]))
    for p, a in zip(paths[1:], attrs[1:], strict=True):
        other = settings_only(recorded(a))
        if other != first:
            both = first is not None and other is not None
            diff = changes(first, other) if both else ["provenance recorded in one only"]
            raise ConfigError(
                f"{p}: made differently from {paths[0]} ({'; '.join(diff[:3])}); one run trains on bags "
                "made the same way: re-extract them with `wsi-mil extract --overwrite`"
            )
    return first


def run_inputs(labels: LabelTable, bag_attrs: Sequence[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """What makes a run: each bag's provenance, the labels and cases, and the training settings.

    Speed-only settings (device, threads, workers) and the run's name are left out.
    """
    train = {k: v for k, v in cfg.to_dict().items() if k not in ("run_name", "device", "num_threads", "num_workers")}
    return {
        "bags": {s: str(a.get(PROVENANCE, "")) for s, a in zip(labels.slide_ids, bag_attrs, strict=True)},
        "labels": [
            [c, s, labels.classes[int(y)]]
            for c, s, y in zip(labels.case_ids, labels.slide_ids, labels.y, strict=True)
        ],
        "train": train,
    }


def resolve_encoder(out_dir: str | os.PathLike[str], encoder: str | None) -> str:
    """The feature folder to train on: ``encoder``, or the only one under ``OUT/features``."""
    layout = Layout(out_dir)
    root = layout.features_root
    found = layout.encoder_folders()
    if encoder:
        if encoder not in found:
            listed = ", ".join(found) or "none"
            raise ConfigError(f"{layout.bags_dir(encoder)}: no such feature folder; found: {listed}")
        return encoder
    if len(found) != 1:
        what = "no feature folders" if not found else "several encoders: " + ", ".join(found)
        raise ConfigError(f"{root}: {what}; pass --encoder (and run `wsi-mil extract` first)")
    return found[0]


def _run_name(cfg: TrainConfig, encoder: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    return f"{encoder}_{cfg.model.name}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@locks_output("wsi-mil train", "out_dir", create=False)
def train_run(
    out_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    encoder: str,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Cross-validate a MIL model on ``OUT/features/<encoder>/h5_files`` and save the run.

    Reads the labels and bags and checks them, makes the folds
    (:func:`~wsi_mil.mil.cv.make_splits`), trains them
    (:func:`~wsi_mil.mil.cv.cross_validate`) and writes the run folder
    (:func:`~wsi_mil.mil.run_writer.write_cv_run`).

    Parameters
    ----------
    out_dir : path-like
        The cohort folder OUT.
    labels_csv : path-like
        ``slide_id,label`` (or ``case_id,slide_id,label``).
    encoder : str
        Feature folder name under ``OUT/features``.
    config : TrainConfig, optional
        Defaults to ``TrainConfig()``.
    progress : bool
        Show a progress bar per fold.

    Returns
    -------
    Path
        ``OUT/models/<run>``, written atomically (it appears only when complete).

    Examples
    --------
    >>> run_dir = train_run("OUT", "labels.csv", "resnet50")  # doctest: +SKIP
    >>> ens = load_model(run_dir)  # doctest: +SKIP
    """
    cfg = config or TrainConfig()
    out_dir = Path(out_dir)
    layout = Layout(out_dir)
    labels = read_labels(labels_csv)
    paths = bag_paths(layout.bags_dir(encoder), labels.slide_ids)
    bags = [read_bag(p, load_features=False) for p in paths]  # attributes and coords only
    widths = Counter(int(b.features.shape[1]) for b in bags)
    in_dim = widths.most_common(1)[0][0]
    odd = next((p for p, b in zip(paths, bags, strict=True) if b.features.shape[1] != in_dim), None)
    if odd is not None:
        raise BagError(f"{odd}: {len(widths)} feature widths among the bags ({', '.join(map(str, sorted(widths)))}; "
                       f"most have {in_dim}): a bag of another encoder? re-extract it")
    attrs = [b.attrs for b in bags]
    bag_settings = same_settings(paths, attrs)
    folds = make_splits(labels.y, cfg, str(labels_csv), labels.case_ids)
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = layout.run_dir(_run_name(cfg, encoder))
    if run_dir.exists():
        raise ConfigError(f"{run_dir}: run folder already exists; choose another run_name")
    result = cross_validate(
        paths, labels.y, cfg, folds, in_dim=in_dim, n_classes=len(labels.classes), device=device, progress=progress
    )
    return write_cv_run(
        run_dir,
        result,
        labels,
        cfg,
        encoder=encoder,
        labels_csv=labels_csv,
        out_dir=out_dir,
        bag_attrs=attrs,
        bag_settings=bag_settings,
        provenance=run_inputs(labels, attrs, cfg),
    )
