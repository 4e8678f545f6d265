"""Stage 3: multiple-instance learning heads and their training.

Submodules import torch; this package namespace resolves names lazily so that
``import wsi_mil.mil`` stays light.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _EXPORTS)
