"""Labels, lazily read feature bags, and padded batches for training and inference."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsi_mil.errors import BagError, ConfigError
from wsi_mil.io.h5 import read_bag


@dataclass
class LabelTable:
    """Slides, their labels as class indices, their cases (patients) and the class names.

    ``case_ids[i]`` is the case of ``slide_ids[i]``; without a ``case_id`` column every
    slide is its own case (its case id is its slide id).
    """

    slide_ids: list[str]
    y: np.ndarray  # (S,) int64
    classes: list[str]
    case_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.case_ids:
            self.case_ids = list(self.slide_ids)

    @property
    def has_cases(self) -> bool:
        """True when some case has more than one slide (a CLAM-style cohort)."""
        return len(set(self.case_ids)) < len(self.case_ids)


def read_labels(path: str | os.PathLike[str]) -> LabelTable:
    r"""Read ``slide_id,label`` (or CLAM's ``case_id,slide_id,label``).

    Labels may be strings or numbers; classes are their sorted unique values as strings.
    A ``case_id`` column groups slides of one patient: cross-validation never splits a
    case, and metrics are reported per slide and per case. A UTF-8 byte-order mark is
    accepted.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> csv = pathlib.Path(tempfile.mkdtemp()) / "labels.csv"
    >>> _ = csv.write_text("case_id,slide_id,label\nA,a1,tumor\nA,a2,tumor\nB,b1,normal\n")
    >>> t = read_labels(csv)
    >>> t.classes, t.case_ids, t.y.tolist()
    (['normal', 'tumor'], ['A', 'A', 'B'], [1, 1, 0])
    """
    import pandas as pd

    from wsi_mil.io.ids import check_slide_id

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: labels CSV is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                          f"at offset {exc.start}); save it as UTF-8 (a byte-order mark is fine)") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read labels CSV ({' '.join(str(exc).split())})") from exc
    cols = {c.strip().lower(): c for c in df.columns}
    if "slide_id" not in cols or "label" not in cols:
        raise ConfigError(
            f"{path}: labels CSV needs columns slide_id,label; found "
            + (", ".join(c if c.isprintable() and c.strip() == c else repr(c) for c in map(str, df.columns)) or "none")
        )
    ids = [s.strip() for s in df[cols["slide_id"]].astype(str)]
    labels = [s.strip() for s in df[cols["label"]].astype(str)]
    if any(not s for s in ids) or any(not s for s in labels):
        raise ConfigError(f"{path}: empty slide_id or label in some rows")
    for lineno, sid in enumerate(ids, start=2):
        check_slide_id(sid, f"{path}:{lineno}")
    cases: list[str] = []
    if "case_id" in cols:
        cases = [s.strip() for s in df[cols["case_id"]].astype(str)]
        if any(not s for s in cases):
            raise ConfigError(f"{path}: empty case_id in some rows (leave the column out if slides are cases)")
    dup = sorted(s for s, n in Counter(ids).items() if n > 1)
    if dup:
        raise ConfigError(f"{path}: duplicate slide_id(s) {', '.join(dup[:5])}")
    try:  # numeric labels sort numerically ("2" < "10")
        classes = [str(c) for c in sorted({float(s) for s in labels})]
        num = {float(s): s for s in labels}
        classes = [num[float(c)] for c in classes]
    except ValueError:
        classes = sorted(set(labels))
    if len(classes) < 2:
        raise ConfigError(f"{path}: needs at least two classes, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return LabelTable(ids, np.array([index[s] for s in labels], np.int64), classes, cases)


def write_labels(path: str | os.PathLike[str], table: LabelTable, keep: Sequence[int] | None = None) -> None:
    """Write ``table`` (rows ``keep``, default all) as ``case_id,slide_id,label``, atomically."""
    import csv
    import io

    from wsi_mil.io.atomic import write_text_atomic

    rows = range(len(table.slide_ids)) if keep is None else keep
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "slide_id", "label"])
    for i in rows:
        w.writerow([table.case_ids[i], table.slide_ids[i], table.classes[int(table.y[i])]])
    write_text_atomic(path, buf.getvalue())


def bag_paths(feature_dir: str | os.PathLike[str], slide_ids: Sequence[str]) -> list[Path]:
    """``<feature_dir>/<id>.h5`` for every slide; missing files are one :class:`BagError`."""
    feature_dir = Path(feature_dir)
    paths = [feature_dir / f"{s}.h5" for s in slide_ids]
    missing = [p.stem for p in paths if not p.is_file()]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise BagError(
            f"{feature_dir}: no feature bag for slide(s) {', '.join(missing[:5])}{more}; "
            "run `wsi-mil extract` first or fix the labels CSV"
        )
    return paths


class BagItem(NamedTuple):
    """One bag as :class:`BagDataset` returns it."""

    features: Tensor  # (n, D) float32, the kept instances
    label: int
    index: int  # the bag's place in the dataset
    rows: Tensor  # (n,) int64, each kept instance's row in the bag file (sorted)
    coords: Tensor | None = None  # (n, 2) int64 level-0 (x, y) of the kept instances


class BagBatch(NamedTuple):
    """A padded batch (:func:`collate_bags`)."""

    X: Tensor  # (B, N, D)
    mask: Tensor  # (B, N) bool, True for real instances
    y: Tensor  # (B,)
    index: Tensor  # (B,) dataset index of each bag
    rows: Tensor  # (B, N) int64 row of each instance in its bag file, -1 on padding
    coords: Tensor | None = None  # (B, N, 2) int64 level-0 (x, y), 0 on padding (None if an item has none)


class BagDataset(Dataset):
    """Reads one bag per item from disk; nothing is held in memory between items.

    Items are :class:`BagItem`: the features, the label, the bag's index, the rows of
    the bag file the features are (all rows, or the kept subset) and those rows' level-0
    coordinates (read with the features; the graph models of :mod:`wsi_mil.mil.zoo` need them).

    ``max_instances > 0`` keeps a random subset of that many instances (training only).
    The subset is drawn from a generator seeded by ``(seed, epoch, bag index)``: it
    differs from epoch to epoch (call :meth:`set_epoch` before each), is the same for
    the same seed, and does not depend on which reader worker loads the bag, so
    ``num_workers`` stays a speed-only setting.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from wsi_mil.io.h5 import write_bag
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.h5"
    >>> write_bag(p, np.ones((10, 4), np.float32), np.zeros((10, 2)), {})
    >>> ds = BagDataset([p], np.array([1]), max_instances=3, seed=0)
    >>> item = ds[0]
    >>> item.features.shape, len(item.rows)
    (torch.Size([3, 4]), 3)
    """

    def __init__(
        self, paths: Sequence[Path], y: np.ndarray, max_instances: int = 0, seed: int = 0
    ) -> None:
        self.paths = list(paths)
        self.y = np.asarray(y, np.int64)
        self.max_instances = int(max_instances)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next subsets for ``epoch`` (before the loader iterates, so workers get it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def kept_rows(self, i: int, n: int) -> np.ndarray:
        """Sorted rows of bag ``i`` (``n`` instances) kept in the current epoch."""
        if not self.max_instances or n <= self.max_instances:
            return np.arange(n)
        rng = np.random.default_rng((self.seed, self.epoch, i))
        return np.sort(rng.choice(n, self.max_instances, replace=False))

    def __getitem__(self, i: int) -> BagItem:
        bag = read_bag(self.paths[i])
        feats, coords = bag.features, bag.coords  # (N, D), (N, 2)
        if len(feats) == 0:
            raise BagError(f"{self.paths[i]}: bag has no instances")
        rows = self.kept_rows(i, len(feats))
        if len(rows) < len(feats):
            feats, coords = feats[rows], coords[rows]
        return BagItem(torch.from_numpy(feats), int(self.y[i]), i, torch.from_numpy(rows.astype(np.int64)),
                       torch.from_numpy(np.ascontiguousarray(coords, np.int64)))


def collate_bags(items: Sequence[BagItem]) -> BagBatch:
    """Pad bags to the longest: X (B, N, D), mask (B, N), y (B,), index (B,), rows (B, N), coords (B, N, 2)."""
    n = max(it.features.shape[0] for it in items)
    D = items[0].features.shape[1]
    X = torch.zeros(len(items), n, D)  # (B, N, D)
    mask = torch.zeros(len(items), n, dtype=torch.bool)  # (B, N)
    rows = torch.full((len(items), n), -1, dtype=torch.long)  # (B, N)
    has_coords = all(it.coords is not None for it in items)
    coords = torch.zeros(len(items), n, 2, dtype=torch.long) if has_coords else None  # (B, N, 2)
    for i, it in enumerate(items):
        m = it.features.shape[0]
        X[i, :m] = it.features
        mask[i, :m] = True
        rows[i, :m] = it.rows
        if coords is not None:
            coords[i, :m] = it.coords
    y = torch.tensor([it.label for it in items], dtype=torch.long)
    idx = torch.tensor([it.index for it in items], dtype=torch.long)
    return BagBatch(X, mask, y, idx, rows, coords)


def feature_stats(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and std (D,) over all instances of ``paths``, one bag in memory at a time."""
    total = 0
    mean = None
    m2 = None
    for p in paths:
        f = read_bag(p).features.astype(np.float64)  # (N, D)
        if len(f) == 0:
            continue
        n_b, mean_b = len(f), f.mean(0)
        m2_b = ((f - mean_b) ** 2).sum(0)
        if mean is None:
            total, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean  # Chan et al. parallel update
        new_total = total + n_b
        mean = mean + delta * n_b / new_total
        m2 = m2 + m2_b + delta**2 * total * n_b / new_total
        total = new_total
    if mean is None or m2 is None:
        raise BagError("no instances in the training bags")
    return mean.astype(np.float32), np.sqrt(m2 / max(total, 1)).astype(np.float32), total
