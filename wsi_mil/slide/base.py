"""The one abstract slide interface every backend implements (after tiffslide / dlup)."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from wsi_mil.errors import MissingMppError


@dataclass(frozen=True)
class Mpp:
    """Pixel size of level 0 in µm/px and where it came from.

    ``source`` is one of ``"metadata:<property>"``, ``"csv"``, ``"cli"``.
    """

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        """Average of the x and y pixel sizes."""
        return (self.x + self.y) / 2.0


def slide_id_from_path(path: str | Path) -> str:
    """Slide id = file name without its extension (``a/b/case-1.svs`` → ``case-1``)."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


class Slide(abc.ABC):
    """A pyramidal whole-slide image opened read-only.

    Backends implement the abstract members; everything else is derived. Open one per
    process or worker: never share an open handle across ``fork``.

    Parameters
    ----------
    path : path-like
        The slide file.
    mpp : float, optional
        Override the level-0 pixel size (µm/px); recorded with ``source``.
    mpp_source : str
        Where the override came from (``"csv"`` or ``"cli"``).
    """

    backend_name: str = "abstract"

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_source: str = "cli") -> None:
        self.path = Path(path)
        self.slide_id = slide_id_from_path(self.path)
        self._mpp_override = None if mpp is None else Mpp(float(mpp), float(mpp), mpp_source)

    # -- backend-specific ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each pyramid level, level 0 first."""

    @property
    @abc.abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each level relative to level 0."""

    @abc.abstractmethod
    def _metadata_mpp(self) -> Mpp | None:
        """Level-0 pixel size from the file's own metadata, or None if absent."""

    @abc.abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an RGB region as a (h, w, 3) uint8 array.

        ``location`` is the level-0 (x, y) of the top-left corner, ``size`` is
        (width, height) in pixels of ``level`` — OpenSlide's convention.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file handle."""

    # -- derived ---------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def mpp(self) -> Mpp:
        """Level-0 pixel size; the override wins over metadata; absent both, an error."""
        if self._mpp_override is not None:
            return self._mpp_override
        found = self._metadata_mpp()
        if found is None:
            raise MissingMppError(
                self.slide_id,
                f"{self.path} declares no pixel size (mpp); give it with --mpp or an 'mpp' "
                "column in the slide CSV",
            )
        return found

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (with 1% slack)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole level as (h, w, 3) uint8 — for the small levels only."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def read_at_mpp(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """Whole slide resampled near ``target_mpp``; returns the image and its true mpp.

        Reads the best level not finer than needed, then resizes with area averaging.
        """
        import cv2

        downsample = max(target_mpp / self.mpp.mean, 1.0)
        level = self.best_level_for_downsample(downsample)
        img = self.read_level(level)
        w0, h0 = self.dimensions
        out_w = max(1, math.ceil(w0 / downsample))
        out_h = max(1, math.ceil(h0 / downsample))
        if (out_w, out_h) != (img.shape[1], img.shape[0]):
            img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return img, w0 / out_w * self.mpp.mean

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"
