"""Stream features into an HDF5 bag: rows written by index, unreadable rows compacted away.

Memory stays bounded by one batch (plus one bool per patch): the ``features`` dataset is
chunked and resizable; rows land at their coords index whatever order batches arrive in,
and at the end rows of unreadable patches are squeezed out chunk by chunk. Every batch is
checked for NaN/Inf before it is written (:func:`~wsi_mil.features.runtime.check_finite`):
a bag never holds non-finite features.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from wsi_mil.features.runtime import check_finite
from wsi_mil.io import h5

#: Bag attribute set last, once every row is written: a bag without it is not complete.
ATTR_COMPLETE = "complete"
UNREADABLE_COORDS = "unreadable_coords"
_CHUNK_ROWS = 1024


class BagWriter:
    """Write one bag to ``path`` (a temporary file: the caller renames it when done).

    Parameters
    ----------
    path : path-like
        The (temporary) HDF5 file to create.
    coords : ndarray
        (N, 2) int64 coords of every tiled patch, in coords order.
    dim : int
        Feature width D.
    slide_id : str, optional
        Named in errors; default the slide id in ``path`` (the name of the bag that an
        :func:`~wsi_mil.io.atomic.atomic_path` partial stands for).
    """

    def __init__(self, path: str | Path, coords: np.ndarray, dim: int, slide_id: str | None = None) -> None:
        import h5py

        self.slide_id = slide_id or _slide_id(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(self.coords)
        self.written = np.zeros(n, bool)
        self.failed = np.zeros(n, bool)
        self._f = h5py.File(path, "w")
        self._feats = self._f.create_dataset(
            h5.FEATURES,
            shape=(n, dim),
            maxshape=(None, dim),
            dtype=np.float32,
            chunks=(max(1, min(n, _CHUNK_ROWS)), dim),
        )
        self._coords = self._f.create_dataset(
            h5.COORDS, data=self.coords, maxshape=(None, 2), chunks=(max(1, min(n, 4096)), 2)
        )

    def write(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Store ``features`` (b, D) at patch rows ``rows`` (b,).

        Raises
        ------
        NonFiniteFeaturesError
            A row holds NaN or Inf (nothing of this batch is written).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        check_finite(np.asarray(features), self.slide_id, rows, self.coords)
        order = np.argsort(rows)  # h5py wants increasing indices
        rows, features = rows[order], np.asarray(features, dtype=np.float32)[order]
        if len(rows) == rows[-1] - rows[0] + 1:  # contiguous: one slice write
            self._feats[rows[0] : rows[-1] + 1] = features
        else:
            self._feats[rows] = features
        self.written[rows] = True

    def mark_failed(self, rows: np.ndarray) -> None:
        """Record rows whose patch could not be read."""
        self.failed[np.asarray(rows, dtype=np.int64)] = True

    @property
    def n_failed(self) -> int:
        """Unreadable patches so far."""
        return int(self.failed.sum())

    def finish(self, attrs: dict[str, Any]) -> int:
        """Drop unreadable rows, write attributes and the completion mark; returns rows kept."""
        missing = ~(self.written | self.failed)
        if missing.any():
            raise RuntimeError(f"{int(missing.sum())} patch rows were neither written nor failed")
        keep = np.flatnonzero(~self.failed)
        if len(keep) < len(self.coords):
            self._compact(keep)
            self._f.create_dataset(UNREADABLE_COORDS, data=self.coords[self.failed])
        for key, value in attrs.items():
            self._f.attrs[key] = h5._attr_value(value)
        self._f.attrs[ATTR_COMPLETE] = 1
        self._f.close()
        return len(keep)

    def _compact(self, keep: np.ndarray) -> None:
        # Kept rows only ever move towards the front, so copying forward in chunks is safe.
        dst = 0
        for start in range(0, len(keep), _CHUNK_ROWS):
            src = keep[start : start + _CHUNK_ROWS]
            block = self._feats[src[0] : src[-1] + 1][src - src[0]]  # (b, D)
            self._feats[dst : dst + len(src)] = block
            self._coords[dst : dst + len(src)] = self.coords[src]
            dst += len(src)
        self._feats.resize((dst, self._feats.shape[1]))
        self._coords.resize((dst, 2))

    def close(self) -> None:
        """Close the file (after an error; the caller deletes it)."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _slide_id(path: str | Path) -> str:
    """``a`` for ``…/a.h5`` and for its partial ``.a~<pid>@<host>~<random>.h5.partial``."""
    name = Path(path).name
    if name.startswith(".") and "~" in name and name.endswith(".partial"):
        return name[1:].split("~", 1)[0]
    return Path(path).stem
