"""The cohort config of ``wsi-mil run``: slides, labels, output, stages and each stage's settings.

``configs/cohort/default.yaml`` gives the defaults; a user's file names what differs.
Each stage section is either a preset name (``tile: biopsy``) or a mapping of settings,
optionally with ``preset:``, applied on top of that stage's preset. Relative paths are
relative to the config file's folder. Everything is typed and checked by the one loader
(:func:`wsi_mil.config.from_mapping`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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

    slides: tuple[Path, ...] = field(metadata={"help": "a folder, a CSV, or a list of them"})
    out: Path = field(metadata={"help": "the cohort output folder"})
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
    source: str = field(default="config", metadata={"setting": False})

    def validate(self) -> None:
        """Refuse a config no run can use (the loader calls it, before any work)."""
        if not self.slides:
            raise ConfigError("'slides' is required (a folder, a CSV, or a list of them)")
        bad = sorted(set(self.stages) - set(STAGES))
        if bad:
            raise ConfigError(f"unknown stage(s) {', '.join(bad)}; valid: {', '.join(STAGES)}")
        if "train" in self.stages and not self.labels:
            raise ConfigError("stage train needs 'labels' (a slide_id,label CSV)")
        if any(s in self.stages for s in ("heatmap", "predict")) and "train" not in self.stages and not self.model:
            raise ConfigError("heatmap/predict without train need 'model' (a models/<run> folder)")
        if self.mpp is not None and self.mpp <= 0:
            raise ConfigError(f"mpp must be a positive number, got {self.mpp!r}")

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


#: The stage sections: name → (module, dataclass), imported when a config is loaded.
SECTIONS = {
    "tile": ("wsi_mil.tiling.run", "TileConfig"),
    "extract": ("wsi_mil.features.extract", "ExtractConfig"),
    "train": ("wsi_mil.mil.config", "TrainConfig"),
    "heatmap": ("wsi_mil.heatmaps.options", "HeatmapOptions"),
}


def _path(base: Path, p: Path) -> Path:
    # ".." is taken lexically from the file's folder as named (configs/ may be a link).
    return p if p.is_absolute() else Path(os.path.normpath(base / p)).resolve()


def load_cohort_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> CohortConfig:
    r"""Read a cohort config on top of ``configs/cohort/default.yaml``; flags override both.

    Parameters
    ----------
    path : path-like, optional
        The user's YAML file (None: only the defaults and ``overrides``).
    overrides : mapping, optional
        Flag values by dotted key (``out``, ``stages``, ``tile.patch_size``, ...); None = not given.

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
    from wsi_mil.config import apply_overrides, preset_path, read_yaml

    data = read_yaml(preset_path("cohort", "default"))
    base, source = Path.cwd(), "defaults"
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "out" in given:  # a flag is relative to the working folder, not the config's
        given["out"] = Path(given["out"]).resolve()
    try:
        if path is not None:
            base, source = Path(path).absolute().parent, str(path)
            data = apply_overrides(data, read_yaml(path))
        for stage in SECTIONS:  # "tile: biopsy" is {"preset": "biopsy"}, so that "tile.x" flags apply
            if isinstance(data.get(stage), str):
                data[stage] = {"preset": data[stage]}
        data = apply_overrides(data, given)
    except ConfigError as exc:
        if str(exc).startswith(f"{source}: "):  # read_yaml names the file already
            raise
        raise ConfigError(f"{source}: {exc}") from exc
    return from_dict(data, base, source)


def from_dict(data: Mapping[str, Any], base: Path, source: str = "config") -> CohortConfig:
    """Build a :class:`CohortConfig` from a mapping; relative paths resolve against ``base``."""
    import importlib

    from wsi_mil.config import from_mapping, load_config

    values = {k: v for k, v in data.items() if v is not None}  # null: not given
    if isinstance(values.get("stages"), str):  # "tile, extract" (the --stages flag)
        values["stages"] = [s.strip() for s in values["stages"].split(",") if s.strip()]
    for stage, (module, name) in SECTIONS.items():
        section = values.get(stage)
        if isinstance(section, str):
            section = {"preset": section}
        if not isinstance(section, Mapping | None):
            raise ConfigError(f"{source}: {stage}: expected a preset name or a mapping of settings, got {section!r}")
        settings = dict(section or {})
        preset = settings.pop("preset", None)
        cls = getattr(importlib.import_module(module), name)
        values[stage] = load_config(cls, stage, preset, settings, source=source, prefix=stage)
    cfg = from_mapping(CohortConfig, values, source)
    return replace(
        cfg,
        slides=tuple(_path(base, s) for s in cfg.slides),
        out=_path(base, cfg.out),
        labels=_path(base, cfg.labels) if cfg.labels else None,
        model=_path(base, cfg.model) if cfg.model else None,
        stages=tuple(s for s in STAGES if s in cfg.stages),  # always in pipeline order
        source=source,
    )
