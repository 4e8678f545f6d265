"""The tiling and extraction settings a model was trained with, stored beside it.

``wsi-mil train`` writes ``models/<run>/pipeline.yaml`` from what the training bags
themselves record (their provenance: tile settings, encoder, weights, precision), not
from the cohort's current config files, which may have changed since; the runtime-only
extraction fields (batch size, workers, device, ...) come from
``OUT/features/<encoder>/extract_config.yaml``. ``wsi-mil predict`` tiles and extracts
new slides with exactly those settings and refuses a bag whose settings differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError

PIPELINE_FILE = "pipeline.yaml"

# Extraction fields that change speed, not features: a predicting machine may differ.
# Precision is not among them: bf16 and fp32 bags differ.
RUNTIME_FIELDS = ("batch_size", "workers", "device", "backend", "compile", "pt")


# Tile settings that change what one patch's features are; the others (overlap, tissue
# threshold, segmentation) only change which patches a bag holds, e.g. the overlapping
# grid recommended for smoother heatmaps.
PATCH_TILE_FIELDS = ("patch_size", "target_mpp")


def patch_settings(bag_settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """What makes each patch's features: the patch size and mpp, encoder, weights, preprocessing, precision.

    Examples
    --------
    >>> patch_settings({"patches": {"tile": {"patch_size": 256, "overlap": 0.5}}, "extract": {"precision": "fp32"}})
    {'tile': {'patch_size': 256}, 'extract': {'precision': 'fp32'}}
    """
    if bag_settings is None:
        return None
    tile = ((bag_settings.get("patches") or {}).get("tile")) or {}
    return {
        "tile": {k: tile[k] for k in PATCH_TILE_FIELDS if k in tile},
        "extract": bag_settings.get("extract"),
    }


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
    from wsi_mil.features.extract import encoder_dirname
    from wsi_mil.io.provenance import recorded

    out = Path(out)
    made = recorded(bag_attrs) or {}
    tile_file = out / "tile_config.yaml"
    ext_file = out / "features" / encoder_dirname(encoder) / "extract_config.yaml"
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
