"""The cohort config of ``wsi-mil run``: slides, labels, output, stages and each stage's settings.

``configs/cohort/default.yaml`` gives the defaults; a user's file names what differs.
Each stage section is either a preset name (``tile: biopsy``) or a mapping of settings,
optionally with ``preset:``, applied on top of that stage's preset. Relative paths are
relative to the config file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

#: Stages in the order they run. ``predict`` is ``heatmap`` plus a predictions CSV of the
#: slides the model did not train on.
STAGES = ("tile", "extract", "train", "heatmap", "predict")
PER_SLIDE = ("tile", "extract", "heatmap")


@dataclass(frozen=True)
class ClusterConfig:
    """The embedded Dask ``LocalCluster`` (ignored when a scheduler address is given).

    Parameters
    ----------
    n_workers : int
        Worker processes; 0 = one per CPU core.
    threads_per_worker : int
        Tasks run at once in one worker process.
    memory_limit : str
        Per worker (``"auto"``: the machine's memory split evenly, or e.g. ``"4GB"``).
    gpu_workers : int
        Extra workers declaring the resource ``GPU=1``, one per GPU
        (-1 = one per visible CUDA device, 0 = none).
    torch_threads : int
        Torch CPU threads per task; 0 = the host's cores divided by the task slots on it.
    dashboard : bool
        Serve the Dask dashboard (on a free port, printed at start).
    """

    n_workers: int = 0
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    gpu_workers: int = -1
    torch_threads: int = 0
    dashboard: bool = False


@dataclass(frozen=True)
class CohortConfig:
    """Everything ``wsi-mil run`` needs; typed stage configs, validated when loaded.

    Parameters
    ----------
    slides : tuple of Path
        Folders, CSVs (``path`` column, optional ``mpp``) or slide files.
    out : Path
        Cohort output folder.
    labels : Path or None
        ``slide_id,label`` CSV; needed by ``train``.
    stages : tuple of str
        Which of ``tile, extract, train, heatmap, predict`` to run (run in that order).
    scheduler : str or None
        Dask scheduler address (``tcp://host:8786``), a scheduler file (``*.json``),
        ``"sequential"`` (this process, no Dask) or None (embedded LocalCluster).
    mpp : float or None
        Level-0 µm/px for slides whose files do not say (a CSV ``mpp`` column wins).
    model : Path or None
        ``models/<run>`` to use for heatmap/predict when ``train`` is not run.
    tile, extract, train, heatmap : dataclass
        :class:`~wsi_mil.tiling.run.TileConfig`, :class:`~wsi_mil.features.extract.ExtractConfig`,
        :class:`~wsi_mil.mil.config.TrainConfig`, :class:`~wsi_mil.heatmaps.HeatmapOptions`.
    cluster : ClusterConfig
        The embedded cluster.
    source : str
        Where the config came from (for messages).
    """

    slides: tuple[Path, ...]
    out: Path
    labels: Path | None = None
    stages: tuple[str, ...] = ("tile", "extract", "train", "heatmap")
    scheduler: str | None = None
    mpp: float | None = None
    model: Path | None = None
    tile: Any = None
    extract: Any = None
    train: Any = None
    heatmap: Any = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: str = "config"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (the resolved ``OUT/run_config.yaml``)."""
        from wsi_mil.config import to_dict

        return {
            "slides": [str(p) for p in self.slides],
            "out": str(self.out),
            "labels": str(self.labels) if self.labels else None,
            "stages": list(self.stages),
            "scheduler": self.scheduler,
            "mpp": self.mpp,
            "model": str(self.model) if self.model else None,
            "cluster": to_dict(self.cluster),
            "tile": to_dict(self.tile),
            "extract": to_dict(self.extract),
            "train": self.train.to_dict(),
            "heatmap": to_dict(self.heatmap),
        }


_TOP = (
    "slides",
    "out",
    "labels",
    "stages",
    "scheduler",
    "mpp",
    "model",
    "cluster",
    "tile",
    "extract",
    "train",
    "heatmap",
)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _section(value: Any, where: str) -> tuple[str | None, dict[str, Any]]:
    """(preset, dotted overrides) of a stage section."""
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a preset name or a mapping of settings, got {value!r}")
    data = dict(value)
    preset = data.pop("preset", None)
    return preset, _flatten(data)


def _path(base: Path, value: Any) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p).resolve()


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_cohort_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> CohortConfig:
    r"""Read a cohort config on top of ``configs/cohort/default.yaml``; flags override both.

    Parameters
    ----------
    path : path-like, optional
        The user's YAML file (None: only the defaults and ``overrides``).
    overrides : mapping, optional
        Top-level values (``out``, ``scheduler``, ``stages``, ...); None = not given.

    Raises
    ------
    ConfigError
        Unknown keys, missing slides/out, unknown stages, invalid stage settings.

    Examples
    --------
    >>> import tempfile
    >>> yaml_file = Path(tempfile.mkdtemp()) / "cohort.yaml"
    >>> _ = yaml_file.write_text("slides: slides/\nout: out/\nstages: [tile, extract]\n")
    >>> cfg = load_cohort_config(yaml_file)
    >>> cfg.stages, cfg.out.name
    (('tile', 'extract'), 'out')
    """
    from wsi_mil.config import preset_path, read_yaml

    data = read_yaml(preset_path("cohort", "default"))
    base = Path.cwd()
    source = "defaults"
    if path is not None:
        user = read_yaml(path)
        unknown = sorted(set(user) - set(_TOP))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(_TOP)}")
        data = _merge(data, user)
        base, source = Path(path).resolve().parent, str(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "out" in given:  # a flag is relative to the working folder, not the config's
        given["out"] = Path(given["out"]).resolve()
    data.update(given)
    return from_dict(data, base, source)


def from_dict(data: Mapping[str, Any], base: Path, source: str = "config") -> CohortConfig:
    """Build a :class:`CohortConfig` from a mapping; relative paths resolve against ``base``."""
    from wsi_mil.config import from_mapping, load_config
    from wsi_mil.features.extract import ExtractConfig
    from wsi_mil.heatmaps.options import HeatmapOptions
    from wsi_mil.mil.config import load_train_config
    from wsi_mil.tiling.run import TileConfig

    slides = data.get("slides")
    if not slides:
        raise ConfigError(f"{source}: 'slides' is required (a folder, a CSV, or a list of them)")
    if not data.get("out"):
        raise ConfigError(f"{source}: 'out' (the cohort output folder) is required")
    stages = data.get("stages") or ()
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise ConfigError(f"{source}: unknown stage(s) {', '.join(bad)}; valid: {', '.join(STAGES)}")
    stages = tuple(s for s in STAGES if s in stages)
    if "train" in stages and not data.get("labels"):
        raise ConfigError(f"{source}: stage train needs 'labels' (a slide_id,label CSV)")
    if any(s in stages for s in ("heatmap", "predict")) and "train" not in stages and not data.get("model"):
        raise ConfigError(f"{source}: heatmap/predict without train need 'model' (a models/<run> folder)")
    mpp = data.get("mpp")
    if mpp is not None and (not isinstance(mpp, (int, float)) or mpp <= 0):
        raise ConfigError(f"{source}: mpp must be a positive number, got {mpp!r}")

    def typed(stage: str, cls: type) -> Any:
        preset, flat = _section(data.get(stage), f"{source}: {stage}")
        return load_config(cls, stage, preset, flat)

    t_preset, t_flat = _section(data.get("train"), f"{source}: train")
    return CohortConfig(
        slides=tuple(_path(base, s) for s in ([slides] if isinstance(slides, (str, Path)) else slides)),
        out=_path(base, data["out"]),
        labels=_path(base, data["labels"]) if data.get("labels") else None,
        stages=stages,
        scheduler=str(data["scheduler"]) if data.get("scheduler") else None,
        mpp=float(mpp) if mpp is not None else None,
        model=_path(base, data["model"]) if data.get("model") else None,
        tile=typed("tile", TileConfig),
        extract=typed("extract", ExtractConfig),
        train=load_train_config(t_preset or "default", t_flat),
        heatmap=typed("heatmap", HeatmapOptions),
        cluster=from_mapping(ClusterConfig, data.get("cluster") or {}, f"{source}: cluster"),
        source=source,
    )
