"""Deep Zoom tiles: the slide's own pyramid through its backend, and the score overlay.

Slide tiles come from :class:`openslide.deepzoom.DeepZoomGenerator` reading through a
:class:`~wsi_mil.slide.Slide` (any backend); overlay tiles are rendered from the heatmap's
score grid (:class:`wsi_mil.heatmaps.pyramid.Overlay`) on the same Deep Zoom geometry, so
the two images line up at every zoom level. Encoded tiles are kept in a bounded LRU cache.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError, WsiMilError

#: Slide tiles: 254 px + 1 px overlap on each side = 256 px images (DeepZoomGenerator's advice).
SLIDE_TILE, SLIDE_OVERLAP = 254, 1
#: Overlay tiles: no overlap, so a tile's pixels are exactly a raster of the score grid.
OVERLAY_TILE = 256
#: Virtual levels (4× each) are added below a slide's coarsest level until it is this small.
VIRTUAL_MAX_SIDE = 1024
JPEG_QUALITY = 80


class LRU:
    """A small thread-safe least-recently-used cache of computed values.

    A value is made once even when many threads miss on it together (the others wait for
    it): 50 readers opening the same slide ask for the same overview tiles at once.
    """

    def __init__(self, maxsize: int, on_evict: Callable[[Any], None] | None = None) -> None:
        self.maxsize, self.on_evict = maxsize, on_evict
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._making: dict[Any, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The cached value of ``key``, made (outside the lock, by one thread) on a miss."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                event = self._making.get(key)
                if event is None:
                    event = self._making[key] = threading.Event()
                    break
            event.wait()  # another thread makes it; if that failed, try in turn
        try:
            value = make()
        except BaseException:
            with self._lock:
                del self._making[key]
            event.set()
            raise
        evicted = []
        with self._lock:  # stored before the waiters wake, so they find it
            del self._making[key]
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                evicted.append(self._items.popitem(last=False)[1])
        event.set()
        if self.on_evict is not None:
            for old in evicted:
                if old is not value:
                    self.on_evict(old)
        return value


class _DeepZoomSource:
    """The OpenSlide-like face that ``DeepZoomGenerator`` reads, over a wsi-mil :class:`Slide`.

    A slide whose coarsest level is still large (a flat, single-level TIFF) gets virtual
    levels, each 4× coarser, down to :data:`VIRTUAL_MAX_SIDE` px: without them the
    generator would read the whole of level 0 for a zoomed-out tile. Virtual tiles are
    read in bands from the nearest real level (:meth:`Slide.read_resized`); the coarsest
    virtual level is built once (in bands) and kept. tiffslide handles are not safe to
    share between threads, so reads take a per-slide lock there; OpenSlide's are (its C
    library locks internally), so reads run in parallel.
    """

    def __init__(self, slide: Any) -> None:
        self._slide = slide
        self._lock = threading.Lock() if slide.backend_name != "openslide" else None
        self.properties: dict[str, str] = {}  # white background, no bounds: the defaults
        w0, h0 = slide.dimensions
        dims, downs = list(slide.level_dimensions), list(slide.level_downsamples)
        while max(dims[-1]) > VIRTUAL_MAX_SIDE:
            ds = downs[-1] * 4
            dims.append((max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))))
            downs.append(w0 / dims[-1][0])
        self._dims, self._downs = tuple(dims), tuple(downs)
        self._coarsest: np.ndarray | None = None  # the last virtual level, once read
        self._coarse_lock = threading.Lock()  # built once, even when tiles ask for it in parallel

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downs

    def get_best_level_for_downsample(self, downsample: float) -> int:
        # Never a level coarser than asked: DeepZoomGenerator only shrinks what it reads.
        return max((i for i, d in enumerate(self._downs) if d <= downsample + 1e-9), default=0)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level < self._slide.level_count:
            return self._slide.read_region(location, level, size)
        ds = self._downs[level]
        if level < len(self._dims) - 1:
            return self._slide.read_resized(location, (round(size[0] * ds), round(size[1] * ds)), size)
        with self._coarse_lock:
            if self._coarsest is None:
                lw, lh = self._dims[level]
                self._coarsest = self._slide.read_resized((0, 0), self._slide.dimensions, (lw, lh))
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        part = self._coarsest[max(y, 0) : y + size[1], max(x, 0) : x + size[0]]
        out[max(-y, 0) : max(-y, 0) + part.shape[0], max(-x, 0) : max(-x, 0) + part.shape[1]] = part
        return out

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        from PIL import Image

        if self._lock is None:
            rgb = self._read(location, level, size)
        else:
            with self._lock:
                rgb = self._read(location, level, size)
        return Image.fromarray(np.ascontiguousarray(rgb)).convert("RGBA")

    def close(self) -> None:
        self._slide.close()


class SlideChangedError(SlideError):
    """The slide file is not the one its tiling read (its fingerprint differs): it is not served."""


@dataclass
class _Handle:
    """One open slide and the requests reading it (closed when evicted and no longer read)."""

    generator: Any
    source: _DeepZoomSource
    readers: int = 0
    evicted: bool = False


@dataclass(frozen=True)
class Geometry:
    """What a slide's Deep Zoom pyramid looks like (kept after the slide is closed)."""

    dzi: str
    level_count: int
    level_tiles: tuple[tuple[int, int], ...]
    dimensions: tuple[int, int]


class SlideTiles:
    """Open slides (a few at a time) and their Deep Zoom tiles, encoded and cached.

    Handles are reference-counted: a request *borrows* the slide's handle for the time of
    its read (:meth:`borrow`), and the least recently used handle, once more than
    ``max_open`` are open, is closed only when its last borrower returns it. OpenSlide
    aborts the process when a handle is closed during a read (its tile cache asserts), so
    no close may race a read. While every handle is borrowed, more than ``max_open`` may be
    open for a moment: at most one per concurrent request (the server's thread count).

    Parameters
    ----------
    backend : str
        Slide backend (``openslide`` or ``tiffslide``).
    max_open : int
        Slides kept open at once; the least recently used is closed once no request reads it.
    max_tiles : int
        Encoded tiles kept in memory.
    """

    def __init__(self, backend: str = "openslide", max_open: int = 8, max_tiles: int = 4096) -> None:
        if max_open < 1:
            raise WsiMilError(f"max_open must be at least 1, got {max_open}")
        self.backend, self.max_open = backend, max_open
        self._open: OrderedDict[tuple[str, str], _Handle] = OrderedDict()
        self._lock = threading.Lock()  # guards _open, readers, evicted
        self._opening: dict[tuple[str, str], threading.Lock] = {}
        self._geometry: dict[tuple[str, str], Geometry] = {}
        self._tiles = LRU(max_tiles)

    def open_count(self) -> int:
        """Handles open now (borrowed or cached)."""
        with self._lock:
            return len(self._open)

    @contextmanager
    def borrow(self, slide_id: str, path: Path, fingerprint: str | None = None) -> Iterator[Any]:
        """The slide's ``DeepZoomGenerator``, open for the duration of the ``with`` block.

        Parameters
        ----------
        slide_id : str
            The slide's id (for messages).
        path : Path
            The slide file.
        fingerprint : str, optional
            :func:`~wsi_mil.io.provenance.slide_fingerprint` the file must still have; checked
            each time the slide is opened (:class:`SlideChangedError` if it differs).
        """
        key = (slide_id, str(path))
        handle = self._acquire(key)
        if handle is None:
            with self._lock:
                opening = self._opening.setdefault(key, threading.Lock())
            with opening:  # one thread opens a slide; the others wait for its handle
                handle = self._acquire(key)
                if handle is None:
                    handle = self._make(slide_id, path, fingerprint)
                    self._insert(key, handle)
        try:
            yield handle.generator
        finally:
            self._release(handle)

    def _acquire(self, key: tuple[str, str]) -> _Handle | None:
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:
                self._open.move_to_end(key)
                handle.readers += 1
            return handle

    def _insert(self, key: tuple[str, str], handle: _Handle) -> None:
        to_close = []
        with self._lock:
            handle.readers += 1
            self._open[key] = handle
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.evicted = True
                if old.readers == 0:
                    to_close.append(old)
        for old in to_close:
            old.source.close()

    def _release(self, handle: _Handle) -> None:
        with self._lock:
            handle.readers -= 1
            close = handle.evicted and handle.readers == 0
        if close:
            handle.source.close()

    def _make(self, slide_id: str, path: Path, fingerprint: str | None) -> _Handle:
        from openslide.deepzoom import DeepZoomGenerator

        from wsi_mil.io.provenance import slide_fingerprint
        from wsi_mil.slide import open_slide

        if fingerprint is not None:
            now = slide_fingerprint(path)
            if now != fingerprint:
                raise SlideChangedError(
                    slide_id,
                    f"{path} is not the file that was tiled (fingerprint {now}, tiling recorded {fingerprint}); "
                    "re-run 'wsi-mil tile' on it",
                )
        try:
            source = _DeepZoomSource(open_slide(path, backend=self.backend))
        except WsiMilError:
            raise
        except Exception as exc:  # native readers raise many types
            raise SlideError(slide_id, f"cannot open {path} for the viewer ({exc})") from exc
        gen = DeepZoomGenerator(source, SLIDE_TILE, SLIDE_OVERLAP, limit_bounds=False)
        key = (slide_id, str(path))
        if key not in self._geometry:
            self._geometry[key] = Geometry(
                gen.get_dzi("jpeg"), gen.level_count, tuple(gen.level_tiles), tuple(gen.level_dimensions[-1])
            )
        return _Handle(gen, source)

    def geometry(self, slide_id: str, path: Path, fingerprint: str | None = None) -> Geometry:
        """The slide's Deep Zoom geometry (the slide is opened, and checked, the first time)."""
        key = (slide_id, str(path))
        if key not in self._geometry:
            with self.borrow(slide_id, path, fingerprint):
                pass
        return self._geometry[key]

    def dzi(self, slide_id: str, path: Path, fingerprint: str | None = None) -> str:
        """The slide's DZI XML (JPEG tiles)."""
        return self.geometry(slide_id, path, fingerprint).dzi

    def tile(
        self, slide_id: str, path: Path, level: int, col: int, row: int, fingerprint: str | None = None
    ) -> bytes | None:
        """JPEG bytes of one tile, or None when the address is outside the pyramid."""
        geom = self.geometry(slide_id, path, fingerprint)
        if not 0 <= level < geom.level_count:
            return None
        cols, rows = geom.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            return None

        def make() -> bytes:
            with self.borrow(slide_id, path, fingerprint) as gen:
                img = gen.get_tile(level, (col, row))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=JPEG_QUALITY)
            return buf.getvalue()

        return self._tiles.get((slide_id, level, col, row), make)


def dz_level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of each Deep Zoom level, 1 × 1 first (halving with ceil, as DZI defines).

    Examples
    --------
    >>> dz_level_dimensions(5, 3)
    [(1, 1), (2, 1), (3, 2), (5, 3)]
    """
    dims = [(width, height)]
    while dims[-1] != (1, 1):
        w, h = dims[-1]
        dims.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return dims[::-1]


def overlay_dzi(width: int, height: int) -> str:
    """DZI XML of an overlay with the slide's level-0 size (PNG tiles, no overlap)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{OVERLAY_TILE}" '
        f'Overlap="0" Format="png"><Size Width="{width}" Height="{height}"/></Image>'
    )


def overlay_tile_region(
    width: int, height: int, level: int, col: int, row: int
) -> tuple[float, float, float, float, int, int] | None:
    """Level-0 raster ``(x0, y0, sx, sy, w, h)`` of an overlay tile, or None outside the pyramid."""
    dims = dz_level_dimensions(width, height)
    if not 0 <= level < len(dims):
        return None
    lw, lh = dims[level]
    if not (0 <= col < math.ceil(lw / OVERLAY_TILE) and 0 <= row < math.ceil(lh / OVERLAY_TILE)):
        return None
    sx, sy = width / lw, height / lh
    w = min(OVERLAY_TILE, lw - col * OVERLAY_TILE)
    h = min(OVERLAY_TILE, lh - row * OVERLAY_TILE)
    return col * OVERLAY_TILE * sx, row * OVERLAY_TILE * sy, sx, sy, w, h


class OverlayTiles:
    """Score overlays (one per slide and score), rendered into PNG Deep Zoom tiles.

    Parameters
    ----------
    colormap : str
        matplotlib colormap of the scores (as the heatmap files use; default ``jet``).
    max_overlays, max_tiles : int
        Score grids and encoded tiles kept in memory.
    """

    def __init__(self, colormap: str = "jet", max_overlays: int = 16, max_tiles: int = 4096) -> None:
        from wsi_mil.heatmaps.scores import colour_lut

        self.colormap = colormap
        self.lut = colour_lut(colormap, 1.0)  # (257, 4); opacity is the browser's job
        self._overlays = LRU(max_overlays)
        self._tiles = LRU(max_tiles)

    def overlay(self, slide_id: str, data: Any, key: str, values: np.ndarray) -> Any:
        """The slide's :class:`~wsi_mil.heatmaps.pyramid.Overlay` of score ``key`` (patch squares)."""
        from wsi_mil.heatmaps.pyramid import Overlay
        from wsi_mil.heatmaps.raster import build_grid

        def make() -> Overlay:
            width, height = (int(v) for v in data.attrs["slide_dimensions"])
            grid = build_grid(data.coords, values, data.patch_size_level0, width, height)
            return Overlay(grid, self.lut, clip="patches")

        return self._overlays.get((slide_id, key), make)

    def tile(
        self, slide_id: str, data: Any, key: str, values: np.ndarray, level: int, col: int, row: int
    ) -> bytes | None:
        """PNG bytes (RGBA, transparent off the patches) of one overlay tile, or None outside."""
        width, height = (int(v) for v in data.attrs["slide_dimensions"])
        region = overlay_tile_region(width, height, level, col, row)
        if region is None:
            return None

        def make() -> bytes:
            import cv2

            rgba = self.overlay(slide_id, data, key, values).rgba(*region)  # (h, w, 4)
            ok, buf = cv2.imencode(".png", rgba[..., [2, 1, 0, 3]], [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:  # pragma: no cover - encoding a uint8 array does not fail
                raise WsiMilError(f"{slide_id}: cannot encode overlay tile {level}/{col}_{row}")
            return buf.tobytes()

        return self._tiles.get((slide_id, key, level, col, row), make)

    def legend(self, stops: int = 32) -> list[str]:
        """``stops`` CSS colours of the colormap from score 0 to 1 (for the legend)."""
        idx = np.round(np.linspace(0, 255, stops)).astype(int)
        return ["#{:02x}{:02x}{:02x}".format(*self.lut[i, :3]) for i in idx]
