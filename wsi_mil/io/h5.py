"""HDF5 names and the one place that reads and writes patch files and feature bags.

Layouts follow CLAM (and so TRIDENT tooling can read them):

* ``patches/<id>.h5``: dataset ``coords`` int64 (N, 2), level-0 (x, y) top-left corners;
  with patch QC also ``qc_*`` datasets (scores of the kept patches, and the rejected ones).
* ``features/<enc>/h5_files/<id>.h5``: ``features`` float32 (N, D) and ``coords`` (N, 2)
  in the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import BagError
from wsi_mil.io.atomic import atomic_path

COORDS = "coords"
FEATURES = "features"

# Attribute names of ``patches/<id>.h5`` (CLAM's first, then ours).
ATTR_PATCH_SIZE = "patch_size"
ATTR_PATCH_LEVEL = "patch_level"
ATTR_DOWNSAMPLE = "downsample"
ATTR_DOWNSAMPLED_LEVEL_DIM = "downsampled_level_dim"
ATTR_LEVEL_DIM = "level_dim"
ATTR_NAME = "name"
ATTR_PATCH_SIZE_LEVEL0 = "patch_size_level0"
ATTR_MPP = "mpp"
ATTR_TARGET_MPP = "target_mpp"
ATTR_OVERLAP = "overlap"

# Patch QC datasets of ``patches/<id>.h5`` (:mod:`wsi_mil.tiling.qc`): scores of the kept
# patches in ``coords`` order, and the rejected patches with their reason and scores.
QC_FOCUS = "qc_focus"
QC_FOLD = "qc_fold"
QC_DEBRIS = "qc_debris"
QC_REJECTED_COORDS = "qc_rejected_coords"
QC_REJECTED_REASON = "qc_rejected_reason"
QC_REJECTED_SCORES = "qc_rejected_scores"
QC_DATASETS = (QC_FOCUS, QC_FOLD, QC_DEBRIS, QC_REJECTED_COORDS, QC_REJECTED_REASON, QC_REJECTED_SCORES)


def _attr_value(value: Any) -> Any:
    """HDF5 attributes take numbers, strings and arrays; anything nested goes as JSON."""
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
    ):
        return json.dumps(value)
    if value is None:
        return "null"
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class PatchFile:
    """Contents of ``patches/<id>.h5``: coordinates and their attributes."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_size_level0(self) -> int:
        """Side of one patch in level-0 pixels."""
        return int(self.attrs[ATTR_PATCH_SIZE_LEVEL0])


@dataclass
class Bag:
    """One slide's features: ``features`` (N, D) float32 and ``coords`` (N, 2)."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


def write_patches(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    attrs: Mapping[str, Any],
    datasets: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]] | None = None,
) -> None:
    """Write a CLAM-layout patch file atomically.

    Parameters
    ----------
    path : path-like
        Destination ``patches/<id>.h5``.
    coords : ndarray
        (N, 2) level-0 top-left (x, y); stored as int64.
    attrs : mapping
        Attributes stored on the ``coords`` dataset (where CLAM reads them) and on the file.
    datasets : mapping, optional
        More datasets (the ``qc_*`` names): name → (array, its attributes).
    """
    import h5py

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dset = f.create_dataset(COORDS, data=coords, maxshape=(None, 2), chunks=(4096, 2) if len(coords) else None)
        for key, value in attrs.items():
            dset.attrs[key] = _attr_value(value)
            f.attrs[key] = _attr_value(value)
        for name, (data, extra) in (datasets or {}).items():
            d = f.create_dataset(name, data=np.asarray(data))
            for key, value in extra.items():
                d.attrs[key] = _attr_value(value)


def read_patch_qc(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The ``qc_*`` datasets of ``patches/<id>.h5`` by name (empty if tiled with ``--qc off``)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return {name: np.asarray(f[name][:]) for name in QC_DATASETS if name in f}
    except READ_ERRORS as exc:
        raise BagError(f"{path}: not a readable patch file ({_why(exc)}); tile the slide again") from exc


#: What h5py and NumPy raise on a damaged file or a dataset of the wrong kind (a group where
#: a dataset belongs, strings where numbers do, an attribute of a type NumPy cannot hold).
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError)


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _coords(f: Any, n: int | None = None) -> np.ndarray:
    """``coords`` as (N, 2) int64; another shape, or N differing from ``n``, is a ValueError."""
    raw = np.asarray(f[COORDS][:])
    if raw.ndim != 2 or raw.shape[1] != 2 or not np.issubdtype(raw.dtype, np.number):
        raise ValueError(f"dataset '{COORDS}' must be (N, 2) numbers, got {raw.shape} {raw.dtype}")
    if n is not None and len(raw) != n:
        raise ValueError(f"{n} feature rows but {len(raw)} coords")
    return raw.astype(np.int64)


def read_patches(path: str | os.PathLike[str]) -> PatchFile:
    """Read ``patches/<id>.h5``; a missing or malformed file is a :class:`BagError`."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = _coords(f)
            attrs = {k: _decode(v) for k, v in f[COORDS].attrs.items()}
    except READ_ERRORS as exc:
        raise BagError(f"{path}: not a readable patch file ({_why(exc)}); tile the slide again") from exc
    return PatchFile(coords=coords, attrs=attrs)


def read_bag(path: str | os.PathLike[str], *, load_features: bool = True) -> Bag:
    """Read a feature bag ``features/<enc>/h5_files/<id>.h5``.

    Parameters
    ----------
    path : path-like
        The bag file.
    load_features : bool
        If False, ``features`` is an empty (0, D) array (coords and attributes only).
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            dset = f[FEATURES]
            if len(dset.shape) != 2 or not np.issubdtype(dset.dtype, np.number):
                raise ValueError(f"dataset '{FEATURES}' must be (N, D) numbers, got {dset.shape} {dset.dtype}")
            feats = (
                np.asarray(dset[:], dtype=np.float32)
                if load_features
                else np.empty((0, dset.shape[1]), np.float32)
            )
            coords = _coords(f, dset.shape[0])
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
    except READ_ERRORS as exc:
        raise BagError(f"{path}: not a readable feature bag ({_why(exc)}); re-extract the slide") from exc
    if load_features and not np.isfinite(feats).all():
        rows = np.flatnonzero(~np.isfinite(feats).all(1))
        raise BagError(f"{path}: {len(rows)} feature row(s) hold NaN or Inf (first: row {rows[0]}); "
                       "re-extract the slide with --overwrite")
    return Bag(features=feats, coords=coords, attrs=attrs)


def write_bag(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Mapping[str, Any],
) -> None:
    """Write a whole feature bag at once, atomically (small bags, tests, tools)."""
    import h5py

    features = np.asarray(features, dtype=np.float32)  # (N, D)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
    if len(features) != len(coords):
        raise BagError(f"{path}: {len(features)} feature rows but {len(coords)} coords")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(FEATURES, data=features)
        f.create_dataset(COORDS, data=coords)
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)


# ---------------------------------------------------------------------------------------
# ``heatmaps/<run>/<id>.h5``: per-patch attention and instance class probabilities.
# ---------------------------------------------------------------------------------------
ATTENTION = "attention"
ATTENTION_NORM = "attention_norm"
INSTANCE_PROBS = "instance_probs"
ATTR_CLASS_NAMES = "class_names"
ATTR_ATTENTION_NORMALISATION = "attention_normalisation"
ATTR_SLIDE_ID = "slide_id"
ATTR_RUN = "run"
ATTR_SLIDE_DIMENSIONS = "slide_dimensions"


@dataclass
class HeatmapData:
    """One slide's heatmap data: everything the renderings are made from.

    Attributes
    ----------
    coords : ndarray
        (N, 2) int64 level-0 (x, y) top-left corners.
    attention : ndarray
        (N,) float32 raw attention (sums to 1 over the bag for the loss-attention head).
    attention_norm : ndarray
        (N,) float32 attention normalised per slide to [0, 1] (see ``attrs``).
    instance_probs : ndarray
        (N, K) float32 instance class probabilities, one column per class.
    class_names : list of str
        The K class names, in column order.
    attrs : dict
        ``patch_size_level0``, ``mpp``, ``slide_dimensions``, ``slide_id``, ``run``, ...
    """

    coords: np.ndarray
    attention: np.ndarray
    attention_norm: np.ndarray
    instance_probs: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_size_level0(self) -> int:
        """Side of one patch in level-0 pixels."""
        return int(self.attrs[ATTR_PATCH_SIZE_LEVEL0])


def write_heatmap_data(path: str | os.PathLike[str], data: HeatmapData) -> None:
    """Write ``heatmaps/<run>/<id>.h5`` atomically.

    Class names go to the ``class_names`` attribute of ``instance_probs`` and of the file
    (a JSON list), the other ``attrs`` to the file.
    """
    import h5py

    coords = np.asarray(data.coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
    k = len(data.class_names)
    probs = np.asarray(data.instance_probs, dtype=np.float32).reshape(len(coords), k)  # (N, K)
    names = json.dumps(list(data.class_names))
    norm_name = str(data.attrs.get(ATTR_ATTENTION_NORMALISATION, "minmax"))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(COORDS, data=coords)
        f.create_dataset(ATTENTION, data=np.asarray(data.attention, np.float32))
        norm = f.create_dataset(ATTENTION_NORM, data=np.asarray(data.attention_norm, np.float32))
        norm.attrs[ATTR_ATTENTION_NORMALISATION] = norm_name
        f.create_dataset(INSTANCE_PROBS, data=probs).attrs[ATTR_CLASS_NAMES] = names
        f.attrs[ATTR_CLASS_NAMES] = names
        for key, value in data.attrs.items():
            f.attrs[key] = _attr_value(value)


def read_heatmap_data(path: str | os.PathLike[str]) -> HeatmapData:
    """Read ``heatmaps/<run>/<id>.h5``; a missing or malformed file is a :class:`BagError`."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f[COORDS][:], dtype=np.int64).reshape(-1, 2)
            attention = np.asarray(f[ATTENTION][:], dtype=np.float32)
            attention_norm = np.asarray(f[ATTENTION_NORM][:], dtype=np.float32)
            names = json.loads(_decode(f[INSTANCE_PROBS].attrs[ATTR_CLASS_NAMES]))
            probs = np.asarray(f[INSTANCE_PROBS][:], np.float32).reshape(len(coords), len(names))
            attrs = {k: _decode(v) for k, v in f.attrs.items() if k != ATTR_CLASS_NAMES}
    except READ_ERRORS as exc:
        raise BagError(f"{path}: not a readable heatmap file ({_why(exc)})") from exc
    return HeatmapData(coords, attention, attention_norm, probs, [str(n) for n in names], attrs)
