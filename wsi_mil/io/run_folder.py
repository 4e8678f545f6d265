"""The files of a trained run ``OUT/models/<run>/`` — written and read here only.

::

    config.yaml          resolved TrainConfig (+ encoder, labels path)
    pipeline.yaml        tiling and extraction settings of the bags (what predict reuses)
    model.json           how to rebuild the model: name, kwargs, in_dim, classes, folds
    fold_<k>.safetensors weights chosen on fold k's validation split
    splits.csv           case_id, slide_id, fold, split (train / val / test); a case never spans splits
    history.csv          per fold and epoch: train loss terms, validation loss and error
    metrics.json         per-fold test metrics and their mean/std, out-of-fold metrics, and
                         the same per case under "case"
    predictions.csv      out-of-fold: case_id, slide_id, label, fold, prediction, prob_<class>...
    case_predictions.csv out-of-fold per case (mean of its slides' probabilities)

``pipeline.yaml`` is built from what the training bags themselves record (their
provenance: tile settings, encoder, weights, precision), not from the cohort's current
config files, which may have changed since; the runtime-only extraction fields (batch
size, workers, device, ...) come from ``OUT/features/<encoder>/extract_config.yaml``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError
from wsi_mil.io.layout import Layout, encoder_dirname

CONFIG_FILE = "config.yaml"
PIPELINE_FILE = "pipeline.yaml"
MODEL_FILE = "model.json"
SPLITS_FILE = "splits.csv"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CASE_PREDICTIONS_FILE = "case_predictions.csv"


def checkpoint_name(fold: int) -> str:
    """File name of fold ``fold``'s weights (``fold_<k>.safetensors``)."""
    return f"fold_{fold}.safetensors"


@dataclass(frozen=True)
class ModelSettings:
    """What ``models/<run>/pipeline.yaml`` says about the training bags.

    Attributes
    ----------
    run_dir : Path
        ``OUT/models/<run>``.
    encoder : str
        Encoder name the bags were extracted with.
    weights : str or None
        The weights as given at extraction (None = the encoder's pretrained weights).
    weights_id : str
        The weights id stored in the training bags (a hash for local files).
    path : Path
        The YAML file; its ``tile`` and ``extract`` sections load as stage configs.
    bag_settings : dict or None
        The settings every training bag records (None: bags that predate provenance).
    """

    run_dir: Path
    encoder: str
    weights: str | None
    weights_id: str
    path: Path
    bag_settings: dict[str, Any] | None = None

    @property
    def run(self) -> str:
        """The run name (folder name under ``models/``)."""
        return self.run_dir.name


def collect_settings(out: str | Path, encoder: str, bag_attrs: dict[str, Any]) -> dict[str, Any]:
    """Sections of ``pipeline.yaml`` for a run trained on ``OUT/features/<encoder>``.

    Parameters
    ----------
    out : path-like
        The training cohort folder.
    encoder : str
        Feature folder the run trained on.
    bag_attrs : dict
        Attributes of one training bag: the fallback when a config file is missing, and
        the source of the weights id.
    """
    from wsi_mil.config import read_yaml
    from wsi_mil.io.provenance import recorded

    layout = Layout(out)
    made = recorded(bag_attrs) or {}
    tile_file = layout.tile_config
    ext_file = layout.extract_config(encoder)
    tile = (made.get("patches") or {}).get("tile")  # how the bags were really tiled
    if tile is None and tile_file.is_file():  # bags from before provenance: the cohort's config
        tile = read_yaml(tile_file).get("tile")
    if tile is None:
        tile = {k: bag_attrs[k] for k in ("patch_size", "target_mpp", "overlap") if k in bag_attrs}
    ext = read_yaml(ext_file).get("extract") if ext_file.is_file() else None
    if ext is None:
        ext = {"encoder": str(bag_attrs.get("encoder", encoder))}
    if "precision" in (made.get("extract") or {}):  # the precision the bags were made in, resolved
        ext = {**ext, "precision": made["extract"]["precision"]}
    return {
        "tile": tile,
        "extract": ext,
        "weights_id": str(bag_attrs.get("encoder_weights", "")),
        "encoder_folder": encoder_dirname(encoder),
    }


def load_settings(run_dir: str | Path) -> ModelSettings:
    """Read ``models/<run>/pipeline.yaml``.

    Raises
    ------
    ConfigError
        The run has no pipeline file (trained before it was recorded) or it is damaged.
    """
    from wsi_mil.config import read_yaml

    run_dir = Path(run_dir)
    path = run_dir / PIPELINE_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: missing; this run does not record how its bags were made "
            "(retrain it with this version of wsi-mil)"
        )
    data = read_yaml(path)
    ext = data.get("extract") or {}
    if not isinstance(data.get("tile"), dict) or "encoder" not in ext:
        raise ConfigError(f"{path}: needs 'tile' and 'extract' sections with the encoder")
    return ModelSettings(
        run_dir, str(ext["encoder"]), ext.get("weights"), str(data.get("weights_id", "")), path,
        data.get("bag_settings"),
    )


def is_trained(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (it is written atomically, ``model.json`` included)."""
    return (Path(run_dir) / MODEL_FILE).is_file()


def read_model_spec(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json``: how to rebuild the model (name, kwargs, in_dim, classes, checkpoints, provenance).

    Raises
    ------
    ConfigError
        Not a trained wsi-mil run.
    """
    path = Path(run_dir) / MODEL_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a trained wsi-mil run ({exc})") from exc


def read_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``metrics.json`` of a run."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def read_trained(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Slide id → content fingerprint ("" if none recorded) of every slide in ``splits.csv``.

    Empty when the run has no ``splits.csv``.
    """
    import csv

    from wsi_mil.io.provenance import SLIDE_FINGERPRINT

    splits = Path(run_dir) / SPLITS_FILE
    if not splits.is_file():
        return {}
    with splits.open(newline="", encoding="utf-8") as fh:
        return {r["slide_id"]: r.get(SLIDE_FINGERPRINT) or "" for r in csv.DictReader(fh)}


def write_run(
    run_dir: str | os.PathLike[str],
    *,
    states: Sequence[Mapping[str, Any]],
    model_spec: Mapping[str, Any],
    config: Mapping[str, Any],
    pipeline: Mapping[str, Any],
    metrics: Mapping[str, Any],
    predictions: Any,
    case_predictions: Any,
    splits: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
) -> Path:
    """Write a whole run folder atomically: it appears only complete.

    ``states`` are the fold models' state dicts (saved as safetensors); ``predictions``
    and ``case_predictions`` are DataFrames; ``splits`` and ``history`` are rows.
    """
    import pandas as pd
    import yaml
    from safetensors.torch import save_file

    from wsi_mil.io.atomic import atomic_path

    run_dir = Path(run_dir)
    with atomic_path(run_dir) as tmp:
        tmp.unlink()
        tmp.mkdir()
        for k, st in enumerate(states):
            save_file(dict(st), str(tmp / checkpoint_name(k)), metadata={"fold": str(k)})
        (tmp / MODEL_FILE).write_text(json.dumps(model_spec, indent=2))
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(dict(config), sort_keys=False))
        (tmp / PIPELINE_FILE).write_text(yaml.safe_dump(dict(pipeline), sort_keys=False))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        predictions.to_csv(tmp / PREDICTIONS_FILE, index=False)
        case_predictions.to_csv(tmp / CASE_PREDICTIONS_FILE, index=False)
        pd.DataFrame(list(splits)).to_csv(tmp / SPLITS_FILE, index=False)
        pd.DataFrame(list(history)).to_csv(tmp / HISTORY_FILE, index=False)
    return run_dir
