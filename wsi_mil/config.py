"""Typed configuration: YAML presets → dataclasses; flags override. The one loader of every stage.

Every stage has one dataclass (``TileConfig``, ``ExtractConfig``, ``TrainConfig``,
``HeatmapOptions``, the cohort's ``CohortConfig``); :func:`load_config` reads a preset
name or a file, applies flag overrides (dotted keys, ``None`` = not given) and builds the
dataclass with :func:`from_mapping`, which is where every key is checked and every value
typed. :func:`dump_config` writes the resolved values beside the outputs.

Presets ship inside the package (``wsi_mil/configs/<stage>/<name>.yaml``; the repository's
``configs/`` links there), so an installed wheel finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from wsi_mil.errors import ConfigError

T = TypeVar("T")

#: Presets: one sub-folder per stage, shipped as package data.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def preset_path(stage: str, name: str) -> Path:
    """Path of preset ``name`` for ``stage`` (``configs/<stage>/<name>.yaml``)."""
    return CONFIG_DIR / stage / f"{name}.yaml"


def list_presets(stage: str) -> list[str]:
    """Names of the presets shipped for ``stage``.

    Examples
    --------
    >>> "biopsy" in list_presets("tile")
    True
    """
    return sorted(p.stem for p in (CONFIG_DIR / stage).glob("*.yaml"))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``yaml.safe_load`` a mapping; anything else is a :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def resolve_source(stage: str, config: str | os.PathLike[str] | None) -> Path | None:
    """The YAML file of ``config``: a file, a preset name of ``stage``, or None → preset ``default``."""
    if config is None:
        default = preset_path(stage, "default")
        return default if default.is_file() else None
    path = Path(config)
    if path.is_file() or path.suffix:
        return path  # a missing file is reported by read_yaml
    preset = preset_path(stage, str(config))
    if not preset.is_file():
        raise ConfigError(f"{config}: no such config file or {stage} preset "
                          f"(presets: {', '.join(list_presets(stage)) or 'none'})")
    return preset


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` with ``overrides`` on top; the one spelling of a flag is a dotted key.

    A key ``"optim.epochs"`` sets ``data["optim"]["epochs"]``; a nested mapping is read as
    its dotted keys; ``None`` means "not given" and changes nothing.

    Examples
    --------
    >>> apply_overrides({"optim": {"lr": 0.1}}, {"optim.epochs": 5, "cv.folds": None})
    {'optim': {'lr': 0.1, 'epochs': 5}}
    """
    out = _copy(data)
    for dotted, value in flatten(overrides or {}).items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            child = node.get(p)
            if not isinstance(child, dict):
                if child is not None and not isinstance(child, Mapping):
                    where = ".".join(parents[: i + 1])
                    raise ConfigError(f"{dotted}: {where} is {child!r}, not a section of settings")
                child = node[p] = dict(child or {})
            node = child
        node[leaf] = value
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):  # an empty section overrides nothing
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(cls: type[T], stage: str, config: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None, *, source: str | None = None,
                prefix: str = "") -> T:
    """Resolve a stage config: preset or file, then non-None ``overrides`` on top.

    Parameters
    ----------
    cls : type
        The stage's dataclass.
    stage : str
        Preset folder under ``configs/`` (``"tile"``, ``"extract"``, ``"train"``, ...).
    config : str or path, optional
        A preset name (``"biopsy"``) or a YAML file; default: preset ``default`` if the
        stage has one, else the dataclass defaults. A file may hold the settings at its
        top level or under a ``<stage>:`` section.
    overrides : mapping, optional
        Flag values by dotted key (``{"segment.seg_mpp": 4}``); ``None`` means "not given".
    source, prefix : str, optional
        How errors name the origin (default: the file, or ``flag <key>=<value>`` when an
        override is the cause) and the keys (``"tile"`` names ``tile.patch_size``), for a
        section of a larger file; with ``source`` the overrides count as that origin's.

    Raises
    ------
    ConfigError
        One line naming the file and key: unknown key, wrong type, value out of range.

    Examples
    --------
    >>> from wsi_mil.tiling.run import TileConfig
    >>> load_config(TileConfig, "tile", "biopsy", {"segment.seg_mpp": 2}).segment.seg_mpp
    2.0
    """
    path = resolve_source(stage, config)
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if isinstance(data.get(stage), dict):
            data = data[stage]
    where = source or (str(path) if path is not None else "defaults")
    try:
        merged = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    try:
        return from_mapping(cls, merged, where, prefix)
    except ConfigError as exc:
        # A value given as a flag is named as the flag, not as the file it overrides (a
        # caller naming ``source`` passes its own file's settings as overrides).
        given = {} if source else {k: v for k, v in flatten(overrides or {}).items() if v is not None}
        blamed = {k: v for k, v in given.items() if re.search(rf"\b{re.escape(k.rsplit('.', 1)[-1])}\b", str(exc))}
        if not blamed:
            raise
        flags = ", ".join(f"{k}={v!r}" for k, v in blamed.items())
        raise ConfigError(str(exc).replace(where, f"flag{'s' if len(blamed) > 1 else ''} {flags}", 1)) from exc


# --------------------------------------------------------------------------- typing


def from_mapping(cls: type[T], data: Any, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping: the one place settings are typed.

    Unknown keys are refused naming the valid ones; each value is checked against the
    field's type hint (``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``,
    ``tuple``, ``list``, nested dataclasses) and converted (YAML's ``1e-4`` string to a
    float, a list to a tuple); then the dataclass's own checks run — its
    ``__post_init__`` and, if it has one, its ``validate()`` method. Every error is one
    :class:`ConfigError` line, ``"<source>: <dotted key> ..."``.

    Examples
    --------
    >>> from wsi_mil.mil.config import TrainConfig
    >>> from_mapping(TrainConfig, {"optim": {"lr": "1e-3"}}).optim.lr
    0.001
    >>> from_mapping(TrainConfig, {"optim": {"lr": -1}}, "my.yaml")
    Traceback (most recent call last):
    ...
    wsi_mil.errors.ConfigError: my.yaml: optim.lr must be positive, got -1.0
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or cls.__name__} must be a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("setting", True)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(_key(prefix, k) for k in unknown)} "
                          f"for {cls.__name__}; valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(hints[key], value, source, _key(prefix, key)) for key, value in data.items()}
    missing = [f for f in fields.values() if f.name not in values and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        f = missing[0]
        hint = f" ({f.metadata['help']})" if "help" in f.metadata else ""
        raise ConfigError(f"{source}: '{_key(prefix, f.name)}' is required{hint}")
    try:
        obj = cls(**values)
        if callable(getattr(obj, "validate", None)):
            obj.validate()  # type: ignore[attr-defined]
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {f'{prefix}: ' if prefix else ''}{exc}") from exc
    return obj


def _key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """``value`` as type ``hint``, or a ConfigError naming ``source`` and ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, source, key)
        for option in options:  # the first that fits
            try:
                return _coerce(option, value, source, key)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key} must be {' or '.join(_name(o) for o in options)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_mapping(hint, value if value is not None else {}, source, key)
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and origin is tuple and args[-1:] == (Ellipsis,):
            value = [value]  # one item given where several may be
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must be a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # no setting means anything by NaN or infinity
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(f"{source}: {key} must be a path, got {value!r}")
        return Path(os.path.expanduser(str(value)))
    return value


def _name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


# --------------------------------------------------------------------------- writing


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
