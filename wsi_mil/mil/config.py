"""Typed training configuration, loaded from YAML (``configs/train/default.yaml``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
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


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(known)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, f"{where}.{key}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true/false, got {value!r}")
            kwargs[key] = value
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                kwargs[key] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from exc
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{key}: expected a list, got {value!r}")
            kwargs[key] = [int(v) for v in value]
        else:
            kwargs[key] = str(value)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping; unknown keys are errors."""
    cfg = _build(TrainConfig, data, where)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config") -> None:
    """Raise :class:`ConfigError` for values no run can use."""
    if cfg.cv.folds < 2:
        raise ConfigError(f"{where}: cv.folds must be >= 2, got {cfg.cv.folds}")
    if not 0.0 < cfg.cv.val_fraction < 0.5:
        raise ConfigError(
            f"{where}: cv.val_fraction must be in (0, 0.5), got {cfg.cv.val_fraction}"
        )
    if cfg.optim.epochs < 1 or cfg.optim.batch_size < 1:
        raise ConfigError(f"{where}: optim.epochs and optim.batch_size must be >= 1")
    if not 0.0 <= cfg.optim.ema_beta < 1.0:
        raise ConfigError(f"{where}: optim.ema_beta must be in [0, 1)")


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML config (``yaml.safe_load``) and apply dotted overrides.

    Parameters
    ----------
    path : path-like, optional
        A YAML file or a preset name from ``configs/train/`` (``"default"``); ``None`` uses
        the built-in defaults (the same values as configs/train/default.yaml).
    overrides : dict, optional
        ``{"optim.epochs": 5, "model.name": "attention"}``; flags win over the file.
    """
    import yaml

    data: dict[str, Any] = {}
    where = "config"
    if path is not None and not Path(path).is_file() and not Path(path).suffix:
        from wsi_mil.config import preset_path  # a preset name such as "default"

        preset = preset_path("train", str(path))
        if not preset.is_file():
            raise ConfigError(f"{path}: no such config file or train preset")
        path = preset
    if path is not None:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = data.get("train", data)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data, where)
