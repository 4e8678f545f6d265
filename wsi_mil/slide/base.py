"""The one abstract slide interface every backend implements (after tiffslide / dlup)."""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from wsi_mil.errors import MissingMppError, SlideError
from wsi_mil.slide.formats import dicom_files

#: Source pixels read per band when a level is resampled (plus one row of tiles at least).
BAND_PIXELS = 16_000_000
#: Source pixels turned into float at a time inside a band.
CHUNK_PIXELS = 2_000_000
#: Largest level :meth:`Slide.read_level` reads whole (4096 × 4096).
MAX_LEVEL_PIXELS = 4096 * 4096


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
    """Slide id = file name without its extension (``a/b/case-1.svs`` → ``case-1``).

    A DICOM WSI is a folder of instances: its id is the folder's name, whether the folder
    or one of its ``.dcm`` files is given (``a/case-2/1.2.826….dcm`` → ``case-2``).

    Examples
    --------
    >>> slide_id_from_path("a/b/case-1.ome.tiff"), slide_id_from_path("a/case-2/level0.dcm")
    ('case-1', 'case-2')
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.parent.resolve().name if p.parent.name in ("", ".", "..") else p.parent.name
    if dicom_files(p):  # a DICOM WSI folder: its name whole (UIDs and dates hold dots)
        return p.resolve().name if p.name in ("", ".", "..") else p.name
    name = p.name
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
    #: Bands a banded read fetches ahead in threads (0 where a handle is not thread-safe).
    read_ahead: int = 0

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
        """Read a whole level as (h, w, 3) uint8 — small levels only.

        Raises
        ------
        SlideError
            The level has more than :data:`MAX_LEVEL_PIXELS` pixels; a low-resolution
            image of the slide comes from :meth:`read_at_mpp` or :meth:`read_thumbnail`,
            which read in bands.
        """
        w, h = self.level_dimensions[level]
        if w * h > MAX_LEVEL_PIXELS:
            raise SlideError(
                self.slide_id,
                f"level {level} of {self.path} is {w}×{h} px, too large to read whole; "
                "use read_at_mpp or read_thumbnail, which read in bands",
            )
        return self.read_region((0, 0), level, (w, h))

    def read_level_pixels(self, level: int, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` at level pixel ``location`` (white outside).

        The default converts to a level-0 location for :meth:`read_region`; backends
        that address levels directly override it to avoid rounding.
        """
        ds = self.level_downsamples[level]
        loc0 = (int(round(location[0] * ds)), int(round(location[1] * ds)))
        return self.read_region(loc0, level, size)

    def tile_height(self, level: int) -> int | None:
        """Height of the stored tiles (or strips) of ``level``, when the backend knows it."""
        return None

    def resample_level(
        self,
        level: int,
        rect: tuple[int, int, int, int],
        size: tuple[int, int],
        band_pixels: int | None = None,
    ) -> np.ndarray:
        """Area-average a rectangle of ``level`` to ``size``, reading it in bands of rows.

        Memory is the (float) output plus one band of :data:`BAND_PIXELS` source pixels
        (at least one row of tiles), whatever the rectangle's size. Equal, within one grey
        level, to reading the rectangle whole and ``cv2.resize(..., INTER_AREA)``.

        Parameters
        ----------
        level : int
            Pyramid level to read.
        rect : (int, int, int, int)
            (x, y, w, h) in pixels of ``level``; parts outside the level read as white.
        size : (int, int)
            Output (width, height).
        band_pixels : int, optional
            Source pixels per band (default :data:`BAND_PIXELS`).

        Returns
        -------
        ndarray
            (h, w, 3) uint8.

        Examples
        --------
        >>> img = slide.resample_level(1, (0, 0, *slide.level_dimensions[1]), (512, 384))  # doctest: +SKIP
        """
        x, y, sw, sh = (int(v) for v in rect)
        ow, oh = (max(1, int(v)) for v in size)
        budget = int(band_pixels or BAND_PIXELS)
        rows = max(1, budget // max(sw, 1))
        th = self.tile_height(level)
        if th and 0 < th <= 4096:  # whole rows of tiles: each tile is decoded once
            rows = max(th, rows // th * th)
        starts = list(range(0, sh, rows))
        bands = self._bands(level, x, y, sw, [(s0, min(sh, s0 + rows)) for s0 in starts])
        if (ow, oh) == (sw, sh):
            out = np.empty((oh, ow, 3), np.uint8)
            for s0, band in zip(starts, bands, strict=True):
                out[s0 : s0 + len(band)] = band
            return out
        acc = np.zeros((oh, ow * 3), np.float32)
        fy = sh / oh
        for s0, band in zip(starts, bands, strict=True):
            s1 = s0 + len(band)
            flat = _shrink_rows(band, ow).reshape(s1 - s0, ow * 3)  # (n, ow*3) float32
            o0, o1 = int(s0 // fy), min(oh, math.ceil(s1 / fy))
            acc[o0:o1] += _area_weights(o0, o1, s0, s1, fy).astype(np.float32) @ flat  # (o1-o0, n) @ (n, ow*3)
        return np.clip(np.rint(acc), 0, 255).astype(np.uint8).reshape(oh, ow, 3)

    def _bands(
        self, level: int, x: int, y: int, w: int, spans: list[tuple[int, int]]
    ) -> Iterator[np.ndarray]:
        """The bands ``[(row0, row1)]`` in order, :attr:`read_ahead` of them read in threads
        while the current one is averaged (so at most ``read_ahead + 1`` bands in memory)."""

        def read(span: tuple[int, int]) -> np.ndarray:
            return self.read_level_pixels(level, (x, y + span[0]), (w, span[1] - span[0]))

        ahead = self.read_ahead
        if ahead < 1 or len(spans) == 1:
            yield from map(read, spans)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(ahead) as pool:
            pending = deque(pool.submit(read, sp) for sp in spans[:ahead])
            for sp in spans[ahead:]:
                band = pending.popleft().result()
                pending.append(pool.submit(read, sp))
                yield band
            while pending:
                yield pending.popleft().result()

    def read_resized(
        self, location: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """A level-0 rectangle resampled to ``size`` (w, h), from the best level, in bands.

        Parameters
        ----------
        location : (int, int)
            Level-0 (x, y) of the top-left corner.
        size_level0 : (int, int)
            (width, height) of the rectangle in level-0 pixels.
        size : (int, int)
            Output (width, height).

        Examples
        --------
        >>> tile = slide.read_resized((0, 0), (16384, 16384), (256, 256))  # doctest: +SKIP
        """
        w0, h0 = size_level0
        ow, oh = (max(1, int(v)) for v in size)
        level = self.best_level_for_downsample(max(min(w0 / ow, h0 / oh), 1.0))
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(location[0] / ds + 1e-6)), int(math.floor(location[1] / ds + 1e-6))
        lw, lh = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
        return self.resample_level(level, (lx, ly, lw, lh), (ow, oh))

    def read_at_mpp(self, target_mpp: float, band_pixels: int | None = None) -> tuple[np.ndarray, float]:
        """Whole slide resampled near ``target_mpp``; returns the image and its true mpp.

        Reads the best level not finer than needed in bands of rows and area-averages
        each band into the output, so memory is bounded by the output whatever the
        slide's size (a flat, single-level slide included).

        Examples
        --------
        >>> rgb, mpp = slide.read_at_mpp(8.0)  # doctest: +SKIP
        """
        downsample = max(target_mpp / self.mpp.mean, 1.0)
        w0, h0 = self.dimensions
        out_w = max(1, math.ceil(w0 / downsample))
        out_h = max(1, math.ceil(h0 / downsample))
        img = self._whole_slide(downsample, (out_w, out_h), band_pixels)
        return img, w0 / out_w * self.mpp.mean

    def read_thumbnail(self, max_side: int, band_pixels: int | None = None) -> np.ndarray:
        """The whole slide with its longest side ``max_side`` px, as (h, w, 3) uint8.

        Size as :func:`thumbnail_size`; read in bands like :meth:`read_at_mpp`.

        Examples
        --------
        >>> thumb = slide.read_thumbnail(2048)  # doctest: +SKIP
        """
        w0, h0 = self.dimensions
        tw, th = thumbnail_size(w0, h0, max_side)
        return self._whole_slide(w0 / tw, (tw, th), band_pixels)

    def _whole_slide(self, downsample: float, size: tuple[int, int], band_pixels: int | None) -> np.ndarray:
        """The best level for ``downsample``, whole, resampled to ``size``."""
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        return self.resample_level(level, (0, 0, lw, lh), size, band_pixels)

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


def thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) of a thumbnail of a ``width × height`` slide with longest side ``max_side``.

    Examples
    --------
    >>> thumbnail_size(40000, 30000, 2048)
    (2048, 1536)
    """
    f = max(width, height) / max_side
    return max(1, round(width / f)), max(1, round(height / f))


def _shrink_rows(band: np.ndarray, out_w: int) -> np.ndarray:
    """(n, w, 3) uint8 → (n, out_w, 3) float32 area-averaged along x, a chunk of rows at a time."""
    import cv2

    n, w = band.shape[:2]
    out = np.empty((n, out_w, 3), np.float32)
    step = max(1, CHUNK_PIXELS // max(w, 1))
    for r in range(0, n, step):
        chunk = band[r : r + step].astype(np.float32)
        if w != out_w:
            chunk = cv2.resize(chunk, (out_w, len(chunk)), interpolation=cv2.INTER_AREA)
        out[r : r + step] = chunk
    return out


def _area_weights(o0: int, o1: int, s0: int, s1: int, f: float) -> np.ndarray:
    """(o1-o0, s1-s0) share of source rows [s0, s1) in output rows [o0, o1), ``f`` rows each.

    Output row ``o`` averages the source interval [o·f, (o+1)·f): the weight of source
    row ``s`` is the overlap of [s, s+1) with it, over ``f``. A source row split across
    two bands gets its share in each, so bands sum to the whole-image area average.
    """
    lo = np.arange(o0, o1, dtype=np.float64)[:, None] * f  # (m, 1)
    src = np.arange(s0, s1, dtype=np.float64)[None, :]  # (1, n)
    overlap = np.minimum(src + 1, lo + f) - np.maximum(src, lo)
    return np.clip(overlap, 0, None) / f
