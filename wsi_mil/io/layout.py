"""Where everything lives under a cohort output folder ``OUT`` — the one place that builds those paths.

::

    OUT/
      patches/<id>.h5                          coords (stage 1)
      masks/<id>.geojson                       tissue polygons
      masks/qc/<id>.geojson                    patches rejected by QC (blur, fold, debris)
      thumbnails/<id>.png                      thumbnail with contours and grid
      tile_config.yaml                         resolved tile settings
      features/<enc>/h5_files/<id>.h5          feature bags (stage 2)
      features/<enc>/pt_files/<id>.pt          CLAM's tensors (optional)
      features/<enc>/extract_config.yaml       resolved extraction settings
      models/<run>/                            a trained run (see :mod:`wsi_mil.io.run_folder`)
      heatmaps/<run>/<id>.{h5,png,tiff,geojson,zarr}, galleries/<id>.png, index.csv
      predictions.csv, case_predictions.csv    ``wsi-mil predict``
      train_labels.csv, run_config.yaml        ``wsi-mil run``
      status.csv, .status/                     per slide and stage (the readable table, the store)
      .wsi-mil.lock                            one writer per folder
      demo.json, demo_metrics.json, labels.csv, slides/    ``wsi-mil demo``

``<enc>`` is :func:`encoder_dirname` of the encoder name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PATCHES = "patches"
MASKS = "masks"
QC = "qc"
THUMBNAILS = "thumbnails"
FEATURES = "features"
BAGS = "h5_files"
PT_FILES = "pt_files"
MODELS = "models"
HEATMAPS = "heatmaps"
GALLERIES = "galleries"
SLIDES = "slides"
TILE_CONFIG = "tile_config.yaml"
EXTRACT_CONFIG = "extract_config.yaml"
RUN_CONFIG = "run_config.yaml"
TRAIN_LABELS = "train_labels.csv"
PREDICTIONS = "predictions.csv"
CASE_PREDICTIONS = "case_predictions.csv"
HEATMAP_INDEX = "index.csv"
STATUS_CSV = "status.csv"
STATUS_STORE = ".status"
LOCK = ".wsi-mil.lock"
DEMO_PARAMS = "demo.json"
DEMO_METRICS = "demo_metrics.json"
DEMO_LABELS = "labels.csv"

#: Keys of :meth:`Layout.heatmap_paths`.
HEATMAP_OUTPUTS = ("h5", "png", "tiff", "geojson", "gallery", "zarr")


def encoder_dirname(name: str) -> str:
    """Folder name of an encoder (``hf-hub:MahmoodLab/UNI`` → ``hf-hub_MahmoodLab_UNI``).

    A folder name maps to itself, so callers may pass either.

    Examples
    --------
    >>> encoder_dirname("hf-hub:MahmoodLab/UNI")
    'hf-hub_MahmoodLab_UNI'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "encoder"


@dataclass(frozen=True)
class Layout:
    """The paths of one output folder; ``Layout("OUT").bag("uni", "s1")`` and so on.

    Examples
    --------
    >>> Layout("out").bag("hf-hub:MahmoodLab/UNI", "s1").as_posix()
    'out/features/hf-hub_MahmoodLab_UNI/h5_files/s1.h5'
    >>> Layout("out").heatmap_paths("run1", "s1")["png"].as_posix()
    'out/heatmaps/run1/s1.png'
    """

    out: Path

    def __init__(self, out: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "out", Path(out))

    # -- stage 1 -------------------------------------------------------------------
    @property
    def patches_dir(self) -> Path:
        return self.out / PATCHES

    def patches(self, slide_id: str) -> Path:
        """``OUT/patches/<id>.h5``."""
        return self.patches_dir / f"{slide_id}.h5"

    def mask(self, slide_id: str) -> Path:
        """``OUT/masks/<id>.geojson``."""
        return self.out / MASKS / f"{slide_id}.geojson"

    def qc_mask(self, slide_id: str) -> Path:
        """``OUT/masks/qc/<id>.geojson``: patches rejected by QC (a folder, so no id collides)."""
        return self.out / MASKS / QC / f"{slide_id}.geojson"

    def thumbnail(self, slide_id: str) -> Path:
        """``OUT/thumbnails/<id>.png``."""
        return self.out / THUMBNAILS / f"{slide_id}.png"

    @property
    def tile_config(self) -> Path:
        return self.out / TILE_CONFIG

    # -- stage 2 -------------------------------------------------------------------
    @property
    def features_root(self) -> Path:
        return self.out / FEATURES

    def features_dir(self, encoder: str) -> Path:
        """``OUT/features/<enc>``."""
        return self.features_root / encoder_dirname(encoder)

    def bags_dir(self, encoder: str) -> Path:
        """``OUT/features/<enc>/h5_files``."""
        return self.features_dir(encoder) / BAGS

    def bag(self, encoder: str, slide_id: str) -> Path:
        """``OUT/features/<enc>/h5_files/<id>.h5``."""
        return self.bags_dir(encoder) / f"{slide_id}.h5"

    def pt(self, encoder: str, slide_id: str) -> Path:
        """``OUT/features/<enc>/pt_files/<id>.pt`` (CLAM's torch tensors)."""
        return self.features_dir(encoder) / PT_FILES / f"{slide_id}.pt"

    def extract_config(self, encoder: str) -> Path:
        """``OUT/features/<enc>/extract_config.yaml``."""
        return self.features_dir(encoder) / EXTRACT_CONFIG

    def encoder_folders(self) -> list[str]:
        """Names of the feature folders holding an ``h5_files`` folder, sorted."""
        root = self.features_root
        return sorted(p.parent.name for p in root.glob(f"*/{BAGS}")) if root.is_dir() else []

    # -- stages 3 and 4 ------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.out / MODELS

    def run_dir(self, run: str) -> Path:
        """``OUT/models/<run>``."""
        return self.models_dir / run

    @property
    def heatmaps_root(self) -> Path:
        return self.out / HEATMAPS

    def heatmap_dir(self, run: str) -> Path:
        """``OUT/heatmaps/<run>``."""
        return self.heatmaps_root / run

    def heatmap_paths(self, run: str, slide_id: str) -> dict[str, Path]:
        """Where each heatmap output of a slide goes (the gallery sits in ``galleries/``)."""
        d = self.heatmap_dir(run)
        return {
            "h5": d / f"{slide_id}.h5",
            "png": d / f"{slide_id}.png",
            "tiff": d / f"{slide_id}.tiff",
            "geojson": d / f"{slide_id}.geojson",
            "gallery": d / GALLERIES / f"{slide_id}.png",
            "zarr": d / f"{slide_id}.zarr",
        }

    def heatmap_index(self, run: str) -> Path:
        """``OUT/heatmaps/<run>/index.csv``: one row per rendered slide."""
        return self.heatmap_dir(run) / HEATMAP_INDEX

    @property
    def predictions(self) -> Path:
        return self.out / PREDICTIONS

    @property
    def case_predictions(self) -> Path:
        return self.out / CASE_PREDICTIONS

    # -- cohort bookkeeping --------------------------------------------------------
    @property
    def train_labels(self) -> Path:
        return self.out / TRAIN_LABELS

    @property
    def run_config(self) -> Path:
        return self.out / RUN_CONFIG

    @property
    def status_csv(self) -> Path:
        return self.out / STATUS_CSV

    @property
    def status_store(self) -> Path:
        return self.out / STATUS_STORE

    @property
    def lock(self) -> Path:
        return self.out / LOCK

    @property
    def slides_dir(self) -> Path:
        return self.out / SLIDES

    @property
    def demo_params(self) -> Path:
        return self.out / DEMO_PARAMS

    @property
    def demo_metrics(self) -> Path:
        return self.out / DEMO_METRICS

    @property
    def demo_labels(self) -> Path:
        return self.out / DEMO_LABELS
