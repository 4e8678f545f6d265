"""Typed training configuration, loaded from YAML (``configs/train/default.yaml``) by the one loader."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from wsi_mil.errors import ConfigError


@dataclass
class ModelConfig:
    """Which MIL model and its hyper-parameters (see :func:`wsi_mil.mil.create_model`)."""

    name: str = "loss_attention"
    trunk: str = "projection"
    hidden: list[int] = field(default_factory=lambda: [512])
    dropout: float = 0.25
    lam: float = 0.1
    attention_dim: int = 128


@dataclass
class OptimConfig:
    """Adam, the consistency cost and the epoch budget."""

    lr: float = 1e-4
    weight_decay: float = 5e-4
    epochs: int = 50
    batch_size: int = 1
    omega: float = 0.0
    rampup_epochs: int = 10
    ema_beta: float = 0.6
    patience: int = 0  # 0: no early stopping, select the best epoch over all epochs
    max_instances: int = 0  # 0: all; else a random subset per bag per training step


@dataclass
class CVConfig:
    """Stratified k-fold with a stratified validation split inside each training fold."""

    folds: int = 5
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class TrainConfig:
    """Everything ``train_run`` needs besides the paths.

    Examples
    --------
    >>> cfg = TrainConfig()
    >>> cfg.model.name
    'loss_attention'
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    standardize: bool = True
    run_name: str = ""
    device: str = "auto"
    num_threads: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for YAML/JSON)."""
        return asdict(self)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no run can use (the loader calls it)."""
        checks = (
            (self.cv.folds >= 2, f"cv.folds must be >= 2, got {self.cv.folds}"),
            (0.0 < self.cv.val_fraction < 0.5, f"cv.val_fraction must be in (0, 0.5), got {self.cv.val_fraction}"),
            (self.optim.lr > 0, f"optim.lr must be positive, got {self.optim.lr}"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.optim.weight_decay}"),
            (self.optim.epochs >= 1 and self.optim.batch_size >= 1, "optim.epochs and optim.batch_size must be >= 1"),
            (0.0 <= self.optim.ema_beta < 1.0, "optim.ema_beta must be in [0, 1)"),
            (self.optim.omega >= 0, f"optim.omega must be >= 0, got {self.optim.omega}"),
            (min(self.optim.rampup_epochs, self.optim.patience, self.optim.max_instances) >= 0,
             "optim.rampup_epochs, optim.patience and optim.max_instances must be >= 0"),
            (0.0 <= self.model.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.model.dropout}"),
            (self.model.lam >= 0, f"model.lam must be >= 0, got {self.model.lam}"),
            (self.model.attention_dim >= 1 and all(h >= 1 for h in self.model.hidden),
             "model.attention_dim and model.hidden sizes must be >= 1"),
            (self.num_threads >= 0 and self.num_workers >= 0, "num_threads and num_workers must be >= 0"),
        )  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping (:func:`wsi_mil.config.from_mapping`)."""
    from wsi_mil.config import from_mapping

    return from_mapping(TrainConfig, data, where)


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML config and apply dotted overrides (:func:`wsi_mil.config.load_config`).

    Parameters
    ----------
    path : path-like, optional
        A YAML file or a preset name from ``configs/train/`` (``"default"``, also used
        when None).
    overrides : dict, optional
        ``{"optim.epochs": 5, "model.name": "attention"}``; flags win over the file.

    Examples
    --------
    >>> load_train_config("default", {"optim.epochs": 5, "cv.folds": None}).optim.epochs
    5
    """
    from wsi_mil.config import load_config

    return load_config(TrainConfig, "train", path, overrides)
