"""Patches decoded on the GPU: a slide's compressed JPEG tiles → ``torchvision.io.decode_jpeg``.

tifffile says where each tile's bytes lie (``dataoffsets`` / ``databytecounts``) and gives
the level's shared ``JPEGTables``; the bytes are read with one file handle (``os.pread``),
made into standalone JPEG streams, decoded as one batch per patch batch by
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA, libjpeg-turbo on CPU), then
every patch is gathered from the decoded tiles and resized on the device.
:class:`GpuJpegStream` keeps :class:`~wsi_mil.features.reader.PatchStream`'s contract.

Colour: photometric YCbCr tiles are converted to RGB by the decoder; photometric RGB tiles
without a JFIF marker hold RGB-coded JPEG (Aperio SVS; tifffile's rule), so an Adobe
marker (transform 0) is put in front to keep the decoder from converting them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.features.reader import ReadPlan
from wsi_mil.slide.base import slide_id_from_path

log = logging.getLogger(__name__)

JPEG = 7  # TIFF Compression
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# APP14 "Adobe", version 100, flags 0, 0, transform 0: the components are RGB, not YCbCr.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
BASELINE_SOF = (0xC0, 0xC1)  # sequential Huffman, 8-bit: what nvJPEG's batched path decodes
FILL = 255  # outside the slide: white glass, as the slide backends return it


@dataclass(frozen=True)
class TileLevel:
    """Where one pyramid level's JPEG tiles lie in the file.

    Parameters
    ----------
    width, height : int
        Level size in pixels.
    tile_width, tile_height : int
        Tile size (every stored tile has it; edge tiles are padded).
    offsets, counts : ndarray
        int64 (n_tiles,) byte offset and length of each tile, row-major.
    tables : bytes
        The level's JPEGTables (SOI … EOI), or empty when every tile is a full JPEG.
    rgb_coded : bool
        The tiles hold RGB (not YCbCr) components: an Adobe marker is prepended.
    """

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes
    rgb_coded: bool

    @property
    def tiles_across(self) -> int:
        """Tile columns."""
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        """Tile rows."""
        return -(-self.height // self.tile_height)

    def stream(self, data: bytes) -> bytes:
        """One tile's bytes as a standalone JPEG (tables merged, colour marked)."""
        if self.tables and data.startswith(SOI):
            data = self.tables[:-2] + data[2:]  # tables' SOI…(DQT, DHT) + tile's SOF…EOI
        if self.rgb_coded:
            data = SOI + ADOBE_RGB + data[2:]
        return data


def _markers(data: bytes) -> list[int]:
    """JPEG marker codes before the first scan (SOS), in order; stops at anything odd."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        m = data[i + 1]
        out.append(m)
        if m == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return out


def open_tile_level(slide_path: str, level: int) -> TileLevel:
    """Describe ``level`` of a tiled JPEG TIFF, or raise :class:`SlideError` saying why not.

    Parameters
    ----------
    slide_path : str
        SVS, generic tiled TIFF, or a slide written by :mod:`wsi_mil.synthetic`.
    level : int
        Pyramid level, numbered as tifffile's first series (as OpenSlide and tiffslide do).

    Returns
    -------
    TileLevel

    Examples
    --------
    >>> open_tile_level("slide.tif", 0).tile_width  # doctest: +SKIP
    512
    """
    import tifffile

    sid = slide_id_from_path(slide_path)

    def no(why: str) -> SlideError:
        return SlideError(sid, f"{slide_path} level {level}: no GPU decoding ({why})")

    try:
        tf = tifffile.TiffFile(slide_path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise no(f"not a TIFF file tifffile opens: {exc}") from exc
    with tf:
        levels = tf.series[0].levels if tf.series else []
        if not 0 <= level < len(levels):
            raise no(f"it has {len(levels)} levels")
        page = levels[level].keyframe
        if not page.is_tiled or page.tiledepth != 1:
            raise no("not tiled")
        if page.compression != JPEG:
            raise no(f"tiles are {page.compression.name}, not JPEG")
        if page.photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR) or page.samplesperpixel != 3:
            raise no(f"photometric {page.photometric.name} with {page.samplesperpixel} samples")
        if page.bitspersample != 8 or page.planarconfig != 1 or page.extrasamples:
            raise no("not 8-bit interleaved RGB")
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        tables = bytes(page.jpegtables or b"")
        height, width = int(page.imagelength), int(page.imagewidth)
        tw, th = int(page.tilewidth), int(page.tilelength)
        nonempty = np.flatnonzero(counts > 0)
        if len(nonempty) == 0:
            raise no("no stored tiles")
        first = int(nonempty[0])
        tf.filehandle.seek(int(offsets[first]))
        head = tf.filehandle.read(int(min(counts[first], 1 << 16)))
    if tables and not (tables.startswith(SOI) and tables.endswith(EOI)):
        raise no("malformed JPEGTables")
    markers = _markers((tables[:-2] + head[2:]) if tables else head)
    sof = [m for m in markers if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)]
    if not head.startswith(SOI) or not sof:
        raise no("tile is not a JPEG stream")
    if sof[0] not in BASELINE_SOF:
        raise no(f"JPEG SOF 0x{sof[0]:02X} is not baseline")
    has_jfif, has_adobe = 0xE0 in markers, 0xEE in markers
    rgb_coded = page.photometric == PHOTOMETRIC_RGB and not has_jfif and not has_adobe
    if len(offsets) != -(-width // tw) * -(-height // th):
        raise no("tile table does not match the level size")
    return TileLevel(width, height, tw, th, offsets, counts, tables, rgb_coded)


def gpu_decode_supported(slide_path: str, level: int) -> bool:
    """True when ``level`` of the slide is tiled baseline JPEG that tifffile hands over raw.

    Parameters
    ----------
    slide_path : str
        The slide file.
    level : int
        Pyramid level.

    Examples
    --------
    >>> gpu_decode_supported("slide.svs", 0)  # doctest: +SKIP
    True
    """
    try:
        open_tile_level(str(slide_path), level)
    except SlideError as exc:
        log.debug("%s", exc)
        return False
    return True


class GpuJpegStream:
    """Iterable of batches ``(images, rows, failed)`` decoded and cut on ``device``.

    ``images`` uint8 (b, S, S, 3) on ``device`` (S = ``plan.input_size``), ``rows`` int64
    (b,) and ``failed`` int64 (k,) on the CPU — :class:`~wsi_mil.features.reader.PatchStream`'s
    contract. A patch touching a tile that does not decode is reported in ``failed``.
    A background thread reads and decodes the next batch while the caller runs the model.

    Parameters
    ----------
    plan : ReadPlan
        Level, patch size and input size (the backend is not used).
    coords : ndarray
        (N, 2) level-0 (x, y) top-left corners.
    batch_size : int
        Patches per batch.
    device : str or torch.device
        Where tiles are decoded (``"cuda:0"``; ``"cpu"`` works too, with libjpeg-turbo).

    Examples
    --------
    >>> for images, rows, failed in GpuJpegStream(plan, coords, 256, "cuda"):  # doctest: +SKIP
    ...     feats = runner(images)
    """

    def __init__(self, plan: ReadPlan, coords: np.ndarray, batch_size: int, device: Any) -> None:
        import torch

        self.plan = plan
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.level = open_tile_level(plan.slide_path, plan.level)

    def __len__(self) -> int:
        return -(-len(self.coords) // self.batch_size)

    # -- planning: which tiles each batch needs ------------------------------------------
    def _origins(self, rows: np.ndarray) -> np.ndarray:
        """(b, 2) level-pixel (x, y) of each patch's corner (floor, as tiffslide reads)."""
        return np.floor(self.coords[rows] / self.plan.level_downsample).astype(np.int64)

    def _tiles_of(self, origin: np.ndarray) -> np.ndarray:
        """Tile ids (row-major) a patch at ``origin`` covers inside the level."""
        lv, s = self.level, self.plan.size_at_level
        c0, r0 = origin[0] // lv.tile_width, origin[1] // lv.tile_height
        c1 = min((origin[0] + s - 1) // lv.tile_width, lv.tiles_across - 1)
        r1 = min((origin[1] + s - 1) // lv.tile_height, lv.tiles_down - 1)
        if c1 < c0 or r1 < r0:
            return np.empty(0, np.int64)
        cols, rws = np.arange(c0, c1 + 1), np.arange(r0, r1 + 1)
        return (rws[:, None] * lv.tiles_across + cols[None, :]).ravel()

    def _read(self, fd: int, tiles: np.ndarray) -> list[bytes]:
        lv = self.level
        order = np.argsort(lv.offsets[tiles], kind="stable")  # file order: sequential reads
        out: list[bytes] = [b""] * len(tiles)
        try:
            for i in order:
                t = int(tiles[i])
                out[i] = os.pread(fd, int(lv.counts[t]), int(lv.offsets[t])) if lv.counts[t] else b""
        except OSError as exc:  # the file went away or its disk failed: the slide, not a patch
            raise SlideError(slide_id_from_path(self.plan.slide_path), f"{self.plan.slide_path}: {exc}") from exc
        return out

    # -- decoding and cutting -------------------------------------------------------------
    def _decode(self, data: list[bytes]) -> list[Any]:
        """Decoded (3, th, tw) tiles; None for a tile that fails or has the wrong size."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        lv = self.level
        streams = [torch.frombuffer(bytearray(lv.stream(d)), dtype=torch.uint8) for d in data]

        def ok(img: Any) -> Any:
            return img if tuple(img.shape) == (3, lv.tile_height, lv.tile_width) else None

        if not streams:
            return []
        try:
            return [ok(i) for i in decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)]
        except RuntimeError:  # one bad tile fails the batch: find it
            out = []
            for s in streams:
                try:
                    out.append(ok(decode_jpeg(s, mode=ImageReadMode.RGB, device=self.device)))
                except RuntimeError as exc:
                    log.info("%s: a tile does not decode: %s", self.plan.slide_path, exc)
                    out.append(None)
            return out

    def _cut(self, tiles: Any, pos: Any, origin: np.ndarray) -> Any:
        """Patches (b, S, S, 3) uint8 gathered from decoded ``tiles`` (n+1, th, tw, 3)."""
        import torch
        import torch.nn.functional as F

        lv, s, S = self.level, self.plan.size_at_level, self.plan.input_size
        dev = self.device
        o = torch.as_tensor(origin, device=dev)  # (b, 2)
        ar = torch.arange(s, device=dev)
        xs, ys = o[:, :1] + ar, o[:, 1:] + ar  # (b, s) level x, y of each column / row
        col = xs.clamp(0, lv.width - 1) // lv.tile_width  # (b, s)
        row = ys.clamp(0, lv.height - 1) // lv.tile_height  # (b, s)
        tid = row[:, :, None] * lv.tiles_across + col[:, None, :]  # (b, s, s)
        where = pos[tid]  # (b, s, s) index into tiles; the last one is the fill tile
        inside = ((ys >= 0) & (ys < lv.height))[:, :, None] & ((xs >= 0) & (xs < lv.width))[:, None, :]
        where = torch.where(inside, where, tiles.shape[0] - 1)
        iy, ix = ys % lv.tile_height, xs % lv.tile_width  # (b, s)
        flat = (where * lv.tile_height + iy[:, :, None]) * lv.tile_width + ix[:, None, :]  # (b, s, s)
        x = tiles.view(-1, 3)[flat]  # (b, s, s, 3)
        if s == S:
            return x
        y = F.interpolate(  # (b, 3, S, S) from the (b, 3, s, s) view
            x.permute(0, 3, 1, 2).float(), size=(S, S), mode="bilinear", align_corners=False, antialias=s > S
        )
        return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (b, S, S, 3)

    def _batches(self) -> Iterator[tuple[Any, Any, Any]]:
        """Read, decode and cut each batch (runs in the background thread)."""
        import torch

        lv, n, B, S = self.level, len(self.coords), self.batch_size, self.plan.input_size
        prev: dict[int, int] = {}  # tile id → index in prev_tiles (decoded in the last batch)
        prev_tiles = None
        try:
            fd = os.open(self.plan.slide_path, os.O_RDONLY)
        except OSError as exc:
            raise SlideError(slide_id_from_path(self.plan.slide_path), f"{self.plan.slide_path}: {exc}") from exc
        try:
            for start in range(0, n, B):
                rows = np.arange(start, min(start + B, n))
                origin = self._origins(rows)
                per = [self._tiles_of(o) for o in origin]
                need = np.unique(np.concatenate(per)) if per else np.empty(0, np.int64)
                stored = need[lv.counts[need] > 0]  # zero-length tiles are missing: glass
                fresh = np.array([t for t in stored if t not in prev], np.int64)
                decoded = self._decode(self._read(fd, fresh))
                bad = {int(t) for t, img in zip(fresh, decoded, strict=True) if img is None}
                fill = torch.full((1, lv.tile_height, lv.tile_width, 3), FILL, dtype=torch.uint8, device=self.device)
                parts = [prev_tiles[[prev[int(t)] for t in stored if int(t) in prev]]] if prev else []
                parts += [img.permute(1, 2, 0)[None] for img in decoded if img is not None] + [fill]
                tiles = torch.cat(parts)  # (n_tiles + 1, th, tw, 3)
                ids = [int(t) for t in stored if int(t) in prev] + [int(t) for t in fresh if int(t) not in bad]
                index = {t: i for i, t in enumerate(ids)}
                pos = torch.full((len(lv.offsets),), len(ids), dtype=torch.int64)
                if ids:
                    pos[torch.as_tensor(ids)] = torch.arange(len(ids))
                pos = pos.to(self.device)
                good = np.array([not (set(p.tolist()) & bad) for p in per], bool)
                if good.any():
                    images = self._cut(tiles, pos, origin[good])
                else:
                    images = torch.empty((0, S, S, 3), dtype=torch.uint8, device=self.device)
                prev, prev_tiles = index, tiles
                yield images, torch.from_numpy(rows[good]), torch.from_numpy(rows[~good])
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        import torch

        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        q: queue.Queue[Any] = queue.Queue(maxsize=2)
        stop = threading.Event()
        done = object()

        def put(x: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                if side is not None:
                    torch.cuda.set_device(self.device)
                ctx = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
                with torch.no_grad(), ctx:
                    for item in self._batches():
                        event = None
                        if side is not None:
                            event = torch.cuda.Event()
                            event.record(side)
                        if not put((item, event)):
                            return
                put((done, None))
            except BaseException as exc:  # handed to the consumer, raised there
                put((exc, None))

        worker = threading.Thread(target=produce, name="gpu-jpeg-reader", daemon=True)
        worker.start()
        try:
            while True:
                item, event = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    item[0].record_stream(current)  # allocated on the side stream
                yield item
        finally:
            stop.set()
            worker.join(timeout=10)
