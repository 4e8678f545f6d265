"""The overlay as an image pyramid: pyramidal TIFF and OME-Zarr, rendered tile by tile.

Every level is rendered straight from the :class:`~wsi_mil.heatmaps.raster.ScoreGrid`
(never from a full-resolution array), so memory stays at a few tiles whatever the
slide's size. Each level's pixel size is chosen so that pixels × µm/px equals the
slide's physical extent exactly, in x and in y.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi_mil.heatmaps.clip import TissueMask
from wsi_mil.heatmaps.raster import ScoreGrid
from wsi_mil.heatmaps.scores import to_lut_index
from wsi_mil.io.atomic import atomic_path


@dataclass
class Overlay:
    """Scores + colours + clipping: renders RGBA for any raster over the slide.

    Attributes
    ----------
    grid : ScoreGrid
        The scores.
    lut : ndarray
        (257, 4) uint8 RGBA table (row 256 transparent).
    clip : str
        ``tissue``, ``patches`` or ``none``.
    tissue : TissueMask or None
        Needed for ``clip = tissue``.
    interpolation : str
        ``nearest`` or ``linear``.
    """

    grid: ScoreGrid
    lut: np.ndarray
    clip: str = "patches"
    tissue: TissueMask | None = None
    interpolation: str = "nearest"

    def rgba(self, x0: float, y0: float, sx: float, sy: float, w: int, h: int) -> np.ndarray:
        """(h, w, 4) uint8 RGBA of a raster at level-0 ``(x0, y0)``, ``sx × sy`` px per pixel."""
        values, covered = self.grid.sample(x0, y0, sx, sy, w, h, self.interpolation)
        visible = None
        if self.clip == "patches":
            visible = covered
        elif self.clip == "tissue" and self.tissue is not None:
            visible = self.tissue.sample(x0, y0, sx, sy, w, h)
        return self.lut[to_lut_index(values, visible)]


@dataclass(frozen=True)
class Level:
    """One pyramid level: size in pixels and level-0 pixels per pixel (x, y)."""

    width: int
    height: int
    sx: float
    sy: float

    def mpp(self, slide_mpp: float) -> tuple[float, float]:
        """(x, y) µm per pixel of this level."""
        return self.sx * slide_mpp, self.sy * slide_mpp


def overlay_levels(width: int, height: int, base_downsample: float, tile: int) -> list[Level]:
    """Levels of the overlay pyramid: base ≈ ``width / base_downsample``, then halves.

    Sizes are rounded, and each level's ``sx = width / level_width`` (likewise y), so
    every level covers exactly the slide's extent.

    Examples
    --------
    >>> [(lv.width, lv.height) for lv in overlay_levels(80000, 40000, 16, 256)][:3]
    [(5000, 2500), (2500, 1250), (1250, 625)]
    """
    w = max(1, round(width / max(base_downsample, 1e-9)))
    h = max(1, round(height / max(base_downsample, 1e-9)))
    levels = [Level(w, h, width / w, height / h)]
    while max(w, h) > tile:
        w, h = math.ceil(w / 2), math.ceil(h / 2)
        levels.append(Level(w, h, width / w, height / h))
    return levels


def iter_tiles(overlay: Overlay, level: Level, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(x, y, rgba)`` for the tiles of ``level`` in row-major order.

    Edge tiles are cut to the level (shape (h, w, 4) with h, w ≤ ``tile``).
    """
    for ty in range(0, level.height, tile):
        for tx in range(0, level.width, tile):
            w, h = min(tile, level.width - tx), min(tile, level.height - ty)
            yield tx, ty, overlay.rgba(tx * level.sx, ty * level.sy, level.sx, level.sy, w, h)


def write_overlay_tiff(
    path: str | os.PathLike[str],
    overlay: Overlay,
    levels: list[Level],
    slide_mpp: float,
    tile: int = 256,
    compression_level: int = 1,
    info: dict | None = None,
) -> None:
    """Write a tiled pyramidal RGBA TIFF (zlib), one page per level, with µm resolution tags.

    Readable by OpenSlide (generic TIFF) and tiffslide; QuPath opens it as an image with
    the slide's physical size. Written atomically, tile by tile. ``info`` (what is shown,
    colormap, slide) goes as JSON into the first page's ImageDescription.
    """
    import json

    import tifffile

    raw = sum(lv.width * lv.height * 4 for lv in levels)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=raw > 2**31) as tif:
        for li, lv in enumerate(levels):

            def tiles(lv: Level = lv) -> Iterator[np.ndarray]:
                for _, _, rgba in iter_tiles(overlay, lv, tile):
                    if rgba.shape[:2] != (tile, tile):  # tifffile wants whole tiles
                        full = np.zeros((tile, tile, 4), np.uint8)
                        full[: rgba.shape[0], : rgba.shape[1]] = rgba
                        rgba = full
                    yield rgba

            mx, my = lv.mpp(slide_mpp)
            tif.write(
                tiles(),
                shape=(lv.height, lv.width, 4),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                extrasamples=("unassalpha",),
                compression="zlib",
                compressionargs={"level": compression_level},
                predictor=False,
                resolution=(1e4 / mx, 1e4 / my),
                resolutionunit="CENTIMETER",
                subfiletype=0 if li == 0 else 1,
                metadata=None,
                software="wsi-mil heatmap",
                description=json.dumps({"wsi_mil_heatmap": info}) if info and li == 0 else None,
            )


def ome_multiscales(name: str, levels: list[Level], slide_mpp: float) -> list[dict]:
    """OME-NGFF 0.4 ``multiscales`` metadata for a (c, y, x) pyramid in µm."""
    datasets = []
    for li, lv in enumerate(levels):
        mx, my = lv.mpp(slide_mpp)
        datasets.append(
            {
                "path": str(li),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, my, mx]}],
            }
        )
    return [
        {
            "version": "0.4",
            "name": name,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
            "type": "nearest",
        }
    ]


def _omero() -> dict:
    channels = [
        {
            "label": lab,
            "color": col,
            "active": lab != "alpha",
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"start": 0, "end": 255, "min": 0, "max": 255},
        }
        for lab, col in (
            ("red", "FF0000"),
            ("green", "00FF00"),
            ("blue", "0000FF"),
            ("alpha", "FFFFFF"),
        )
    ]
    return {"channels": channels, "rgb": True, "rdefs": {"model": "color"}}


def write_overlay_zarr(
    path: str | os.PathLike[str],
    overlay: Overlay,
    levels: list[Level],
    slide_mpp: float,
    name: str,
    tile: int = 256,
    info: dict | None = None,
) -> None:
    """Write the pyramid as an OME-Zarr 0.4 multiscale group (zarr v2 format, (c, y, x) uint8).

    Chunks are written one tile at a time into a temporary folder that is renamed into
    place, so ``<id>.zarr`` appears only complete (an existing one is replaced).
    """
    import zarr

    final = Path(path)
    old: Path | None = None
    with atomic_path(final) as tmp:
        tmp.unlink()
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        group.attrs["multiscales"] = ome_multiscales(name, levels, slide_mpp)
        group.attrs["omero"] = _omero()
        if info:
            group.attrs["wsi_mil_heatmap"] = info
        for li, lv in enumerate(levels):
            arr = group.create_array(
                str(li),
                shape=(4, lv.height, lv.width),
                chunks=(4, tile, tile),
                dtype=np.uint8,
                fill_value=0,
                chunk_key_encoding={"name": "v2", "separator": "/"},
                dimension_names=None,
            )
            for tx, ty, rgba in iter_tiles(overlay, lv, tile):
                if rgba[..., 3].any():  # all-transparent chunks stay implicit (fill value 0)
                    arr[:, ty : ty + rgba.shape[0], tx : tx + rgba.shape[1]] = rgba.transpose(
                        2, 0, 1
                    )
        if final.exists():  # os.replace cannot replace a non-empty folder: move it aside
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
