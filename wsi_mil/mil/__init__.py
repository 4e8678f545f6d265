"""Stage 3: multiple-instance learning heads and their training.

Submodules import torch; this package namespace resolves names lazily so that
``import wsi_mil.mil`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LossAttentionMIL": "wsi_mil.mil.loss_attention",
    "AttentionTargets": "wsi_mil.mil.loss_attention",
    "consistency_weight": "wsi_mil.mil.loss_attention",
    "AttentionMIL": "wsi_mil.mil.baselines",
    "GatedAttentionMIL": "wsi_mil.mil.baselines",
    "create_model": "wsi_mil.mil.registry",
    "list_models": "wsi_mil.mil.registry",
    "TrainConfig": "wsi_mil.mil.config",
    "load_train_config": "wsi_mil.mil.config",
    "train_run": "wsi_mil.mil.train",
    "load_model": "wsi_mil.mil.inference",
    "predict_bags": "wsi_mil.mil.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsi_mil.mil' has no attribute {name!r}")
