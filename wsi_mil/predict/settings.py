"""The tiling and extraction settings a model was trained with, stored beside it.

``wsi-mil train`` copies ``OUT/tile_config.yaml`` and
``OUT/features/<encoder>/extract_config.yaml`` into ``models/<run>/pipeline.yaml``;
``wsi-mil predict`` tiles and extracts new slides with exactly those settings, so a new
slide's bag is built the way the training bags were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

PIPELINE_FILE = "pipeline.yaml"

# Extraction fields that change speed, not features: a predicting machine may differ.
RUNTIME_FIELDS = ("batch_size", "workers", "device", "precision", "backend", "compile", "pt")


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
    """

    run_dir: Path
    encoder: str
    weights: str | None
    weights_id: str
    path: Path

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
    from wsi_mil.features.extract import encoder_dirname

    out = Path(out)
    tile_file = out / "tile_config.yaml"
    ext_file = out / "features" / encoder_dirname(encoder) / "extract_config.yaml"
    tile = read_yaml(tile_file).get("tile") if tile_file.is_file() else None
    if tile is None:  # tiled by an older version or elsewhere: what the bag records
        tile = {k: bag_attrs[k] for k in ("patch_size", "target_mpp", "overlap") if k in bag_attrs}
    ext = read_yaml(ext_file).get("extract") if ext_file.is_file() else None
    if ext is None:
        ext = {"encoder": str(bag_attrs.get("encoder", encoder))}
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
    return ModelSettings(run_dir, str(ext["encoder"]), ext.get("weights"), str(data.get("weights_id", "")), path)
