"""Typed configuration: YAML presets in ``configs/`` → frozen dataclasses; flags override.

Every stage has one dataclass; :func:`load_config` reads a preset name or a file,
:func:`merge` applies flag overrides, :func:`dump_config` writes the resolved values
beside the outputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wsi_mil.errors import ConfigError

T = TypeVar("T")

#: Presets live in the repository's ``configs/`` folder (one sub-folder per stage).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_path(stage: str, name: str) -> Path:
    """Path of preset ``name`` for ``stage`` (``configs/<stage>/<name>.yaml``)."""
    return CONFIG_DIR / stage / f"{name}.yaml"


def list_presets(stage: str) -> list[str]:
    """Names of the presets shipped for ``stage``."""
    return sorted(p.stem for p in (CONFIG_DIR / stage).glob("*.yaml"))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``yaml.safe_load`` a mapping; anything else is a :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def from_mapping(cls: type[T], data: Mapping[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types are errors."""
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"valid: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(hints.get(key)) and isinstance(value, Mapping):
            values[key] = from_mapping(hints[key], value, f"{source}: {key}")
            continue
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(cls: type[T], stage: str, config: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """Resolve a stage config: preset or file, then non-None ``overrides`` on top.

    Parameters
    ----------
    cls : type
        The stage's dataclass.
    stage : str
        Preset folder under ``configs/`` (``"tile"``, ``"extract"``, ...).
    config : str or path, optional
        A preset name (``"biopsy"``) or a YAML file; default: preset ``default``.
    overrides : mapping, optional
        Flag values; ``None`` means "not given".
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if config is None and preset_path(stage, "default").exists():
        config = "default"
    if config is not None:
        path = Path(config)
        if not path.suffix and not path.exists():
            path = preset_path(stage, str(config))
            if not path.exists():
                raise ConfigError(f"{config}: no such config file or {stage} preset "
                                  f"(presets: {', '.join(list_presets(stage)) or 'none'})")
        data = read_yaml(path)
        data = data.get(stage, data) if isinstance(data.get(stage), dict) else data
        source = str(path)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if "." in key:  # "segment.seg_mpp" overrides a nested setting
            outer, inner = key.split(".", 1)
            data.setdefault(outer, {})[inner] = value
        else:
            data[key] = value
    return from_mapping(cls, data, source)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass (tuples as lists), for YAML/JSON/HDF5 attributes."""

    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(dataclasses.asdict(obj))


def dump_config(path: str | os.PathLike[str], sections: Mapping[str, Any]) -> None:
    """Write resolved config sections as YAML, atomically (``OUT/<stage>_config.yaml``)."""
    import yaml

    from wsi_mil.io.atomic import write_text_atomic

    body = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()}
    write_text_atomic(path, yaml.safe_dump(body, sort_keys=False))
