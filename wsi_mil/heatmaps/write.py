"""Stage 4 outputs of one slide: ``heatmaps/<run>/<id>.{h5,png,tiff,geojson,zarr}`` + gallery."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.heatmaps.options import HeatmapOptions
from wsi_mil.io import h5
from wsi_mil.io.h5 import HeatmapData
from wsi_mil.io.layout import HEATMAP_OUTPUTS, Layout

#: Keys of the dict :func:`write_heatmaps` returns.
OUTPUTS = HEATMAP_OUTPUTS


def heatmap_dir(out: str | Path, run: str) -> Path:
    """``OUT/heatmaps/<run>`` (:meth:`~wsi_mil.io.layout.Layout.heatmap_dir`)."""
    return Layout(out).heatmap_dir(run)


def heatmap_paths(out: str | Path, run: str, slide_id: str) -> dict[str, Path]:
    """Where each output of a slide goes (:meth:`~wsi_mil.io.layout.Layout.heatmap_paths`)."""
    return Layout(out).heatmap_paths(run, slide_id)


def make_heatmap_data(
    slide_id: str,
    run: str,
    coords: np.ndarray,
    patch_size_level0: int,
    attention: np.ndarray,
    instance_probs: np.ndarray,
    class_names: Sequence[str],
    slide_dimensions: tuple[int, int],
    mpp: float,
    options: HeatmapOptions,
    attrs: Mapping[str, Any] | None = None,
) -> HeatmapData:
    """Check shapes and build the :class:`~wsi_mil.io.h5.HeatmapData` of one slide."""
    from wsi_mil.heatmaps.scores import normalise_scores

    coords = np.asarray(coords, np.int64).reshape(-1, 2)  # (N, 2)
    n = len(coords)
    attention = np.asarray(attention, np.float32).reshape(-1)  # (N,)
    probs = np.asarray(instance_probs, np.float32)
    probs = (
        probs.reshape(n, -1) if probs.size else np.zeros((n, len(class_names)), np.float32)
    )  # (N, K)
    if len(attention) != n or probs.shape != (n, len(class_names)):
        raise SlideError(
            slide_id,
            f"heatmap data do not match: {n} coords, {len(attention)} attention "
            f"values, instance probabilities {probs.shape} for {len(class_names)} classes",
        )
    all_attrs: dict[str, Any] = {
        h5.ATTR_SLIDE_ID: slide_id,
        h5.ATTR_RUN: run,
        h5.ATTR_PATCH_SIZE_LEVEL0: int(patch_size_level0),
        h5.ATTR_MPP: float(mpp),
        h5.ATTR_SLIDE_DIMENSIONS: [int(slide_dimensions[0]), int(slide_dimensions[1])],
        h5.ATTR_ATTENTION_NORMALISATION: options.attention_normalisation,
    }
    all_attrs.update(attrs or {})
    norm = normalise_scores(attention, options.attention_normalisation)
    return HeatmapData(coords, attention, norm, probs, [str(c) for c in class_names], all_attrs)


def write_heatmaps(
    out: str | Path,
    run: str,
    slide_id: str,
    slide_path: str | Path | None,
    coords: np.ndarray,
    patch_size_level0: int,
    attention: np.ndarray,
    instance_probs: np.ndarray,
    class_names: Sequence[str],
    options: HeatmapOptions | None = None,
    *,
    slide_dimensions: tuple[int, int] | None = None,
    mpp: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write every heatmap output of one slide under ``OUT/heatmaps/<run>/``.

    Parameters
    ----------
    out : path-like
        Cohort output folder (``OUT``); the tissue mask is read from ``OUT/masks/<id>.geojson``.
    run : str
        Model run name (``OUT/models/<run>``).
    slide_id : str
        The slide's id.
    slide_path : path-like or None
        The slide, for its size, mpp, thumbnail and gallery patches. ``None`` needs
        ``slide_dimensions`` and ``mpp`` and skips the gallery; the PNG is then drawn on
        ``OUT/thumbnails/<id>.png`` if it exists, else on white.
    coords : ndarray
        (N, 2) level-0 top-left (x, y) of each patch, in the bag's order.
    patch_size_level0 : int
        Patch side in level-0 pixels.
    attention : ndarray
        (N,) attention from ``model.predict(..., return_instance=True)``.
    instance_probs : ndarray
        (N, K) instance class probabilities, columns in ``class_names`` order.
    class_names : sequence of str
        The K class names.
    options : HeatmapOptions, optional
        Rendering options (defaults: ``configs/heatmap/default.yaml`` values).
    slide_dimensions, mpp : optional
        Level-0 (width, height) and µm/px, overriding the slide's (e.g. an mpp from the CSV).
    attrs : mapping, optional
        Extra attributes stored in the HDF5 file (model run, encoder, slide probabilities).
    timings : dict, optional
        Filled with seconds per output.

    Returns
    -------
    dict of str to Path
        ``h5``, ``png``, ``tiff``, ``geojson`` and, when written, ``gallery`` and ``zarr``.

    Examples
    --------
    >>> pred = model.predict(X, return_instance=True)  # doctest: +SKIP
    >>> write_heatmaps("out", "run1", "case-1", "slides/case-1.svs", bag.coords, 512,
    ...                pred.attention[0], pred.instance_probs[0],
    ...                ["normal", "tumour"])  # doctest: +SKIP
    """
    options = options or HeatmapOptions()
    dims, slide_mpp = _slide_geometry(slide_id, slide_path, options.backend, slide_dimensions, mpp)
    data = make_heatmap_data(
        slide_id,
        run,
        coords,
        patch_size_level0,
        attention,
        instance_probs,
        class_names,
        dims,
        slide_mpp,
        options,
        attrs,
    )
    paths = heatmap_paths(out, run, slide_id)
    t = time.perf_counter()
    h5.write_heatmap_data(paths["h5"], data)
    if timings is not None:
        timings["h5"] = time.perf_counter() - t
    rendered = render_heatmaps(out, run, data, slide_path, options, mpp=mpp, timings=timings)
    return {"h5": paths["h5"], **rendered}


def render_heatmaps(
    out: str | Path,
    run: str,
    data: HeatmapData,
    slide_path: str | Path | None,
    options: HeatmapOptions | None = None,
    *,
    mpp: float | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Render PNG, TIFF, GeoJSON, gallery (and Zarr) from stored heatmap data.

    ``data`` is what :func:`wsi_mil.io.h5.read_heatmap_data` returns; re-rendering with
    other options never needs the model. Returns the paths written (no ``h5``).
    """
    from wsi_mil.heatmaps.clip import rasterise_polygons, read_tissue_polygons
    from wsi_mil.heatmaps.png import read_thumbnail, render_gallery, render_overlay, thumbnail_size
    from wsi_mil.heatmaps.pyramid import (
        Overlay,
        overlay_levels,
        write_overlay_tiff,
        write_overlay_zarr,
    )
    from wsi_mil.heatmaps.raster import build_grid
    from wsi_mil.heatmaps.scores import colour_lut, normalise_scores, select_score
    from wsi_mil.tiling.thumbnail import write_png

    options = options or HeatmapOptions()
    sid = str(data.attrs.get(h5.ATTR_SLIDE_ID, Path(slide_path).stem if slide_path else "slide"))
    width, height = (int(v) for v in data.attrs[h5.ATTR_SLIDE_DIMENSIONS])
    slide_mpp = float(mpp if mpp is not None else data.attrs[h5.ATTR_MPP])
    p0 = data.patch_size_level0
    paths = heatmap_paths(out, run, sid)
    clock = _Clock(timings)

    name, raw = select_score(options.score, data.attention, data.instance_probs, data.class_names)
    shown = normalise_scores(raw, options.normalise, options.percentiles)
    grid = build_grid(
        data.coords,
        shown,
        p0,
        width,
        height,
        combine=options.combine,
        smooth_sigma_level0=options.smooth_um / slide_mpp,
    )
    clip, tissue = options.clip, None
    mask_path = Layout(out).mask(sid)
    if clip in ("auto", "tissue"):
        if mask_path.exists():
            tissue = rasterise_polygons(read_tissue_polygons(mask_path), width, height)
            clip = "tissue"
        elif clip == "tissue":
            raise SlideError(
                sid, f"clip = tissue needs {mask_path}; tile the slide first or use clip: patches"
            )
        else:
            clip = "patches"
    interp = options.interpolation
    clock.lap("grid")

    lut_png = colour_lut(options.colormap, options.alpha)
    lut_full = colour_lut(options.colormap, 1.0)
    written: dict[str, Path] = {}
    slide = _open(sid, slide_path, options.backend, mpp) if slide_path is not None else None
    try:
        if slide is not None:
            thumb = read_thumbnail(slide, options.png_max)
        else:
            thumb = _stored_thumbnail(
                Layout(out).thumbnail(sid),
                thumbnail_size(width, height, options.png_max),
            )
        overlay_png = Overlay(grid, lut_png, clip, tissue, interp)
        write_png(
            paths["png"],
            render_overlay(thumb, overlay_png, width, height, f"{name} ({options.normalise})"),
        )
        written["png"] = paths["png"]
        clock.lap("png")

        if slide is not None and options.gallery_k > 0 and len(data.coords):
            img, _, _ = render_gallery(
                slide, data.coords, p0, raw, shown, options.gallery_k, options.gallery_px, lut_full
            )
            write_png(paths["gallery"], img)
            written["gallery"] = paths["gallery"]
            clock.lap("gallery")
    finally:
        if slide is not None:
            slide.close()

    overlay = Overlay(grid, lut_full, clip, tissue, interp)
    info = {
        "slide_id": sid,
        "run": run,
        "score": name,
        "normalise": options.normalise,
        "colormap": options.colormap,
        "clip": clip,
        "smooth_um": options.smooth_um,
        "slide_dimensions": [width, height],
        "slide_mpp": slide_mpp,
        "patch_size_level0": p0,
    }
    levels = overlay_levels(width, height, p0 / options.tiff_px_per_patch, options.tile_size)
    write_overlay_tiff(
        paths["tiff"],
        overlay,
        levels,
        slide_mpp,
        options.tile_size,
        options.compression_level,
        info,
    )
    written["tiff"] = paths["tiff"]
    clock.lap("tiff")
    if options.zarr:
        write_overlay_zarr(paths["zarr"], overlay, levels, slide_mpp, sid, options.tile_size, info)
        written["zarr"] = paths["zarr"]
        clock.lap("zarr")

    measurements = {"attention": data.attention, "attention_norm": data.attention_norm}
    for k, c in enumerate(data.class_names):
        measurements[f"prob_{c}"] = data.instance_probs[:, k]
    if name != "attention":
        measurements[f"{name}_shown"] = shown
    else:
        measurements["attention_shown"] = shown
    write_patch_geojson(paths["geojson"], data.coords, p0, measurements)
    written["geojson"] = paths["geojson"]
    clock.lap("geojson")
    return written


def write_patch_geojson(
    path: str | Path,
    coords: np.ndarray,
    patch_size_level0: int,
    measurements: Mapping[str, np.ndarray],
    chunk: int = 8192,
) -> None:
    """Write the patch squares as a FeatureCollection, ``chunk`` features at a time.

    The same document :func:`wsi_mil.io.geojson.write_geojson` writes for
    :func:`~wsi_mil.io.geojson.patch_feature_collection`, streamed so that 100,000
    patches never exist as Python objects at once; written atomically.
    """
    import json

    from wsi_mil.io.atomic import atomic_path
    from wsi_mil.io.geojson import patch_feature_collection

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for start in range(0, len(coords), chunk):
            part = {k: np.asarray(v)[start : start + chunk] for k, v in measurements.items()}
            fc = patch_feature_collection(coords[start : start + chunk], patch_size_level0, part)
            if start:
                fh.write(",")
            fh.write(json.dumps(fc["features"], separators=(",", ":"))[1:-1])
        fh.write("]}")


class _Clock:
    """Seconds per step into an optional dict."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[key] = now - self.t
        self.t = now


def _stored_thumbnail(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Stage 1's ``thumbnails/<id>.png`` (contours drawn) at ``size``, else white."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.exists() else None
    if img is None:
        return np.full((size[1], size[0], 3), 255, np.uint8)
    return cv2.resize(img[..., ::-1], size, interpolation=cv2.INTER_AREA)


def _open(slide_id: str, path: str | Path, backend: str, mpp: float | None) -> Any:
    from wsi_mil.slide import open_slide

    try:
        return open_slide(path, backend=backend, mpp=mpp)
    except WsiMilError:
        raise
    except Exception as exc:  # native readers raise many types
        raise SlideError(slide_id, f"cannot open {path} for heatmaps ({exc})") from exc


def _slide_geometry(
    slide_id: str,
    slide_path: str | Path | None,
    backend: str,
    dims: tuple[int, int] | None,
    mpp: float | None,
) -> tuple[tuple[int, int], float]:
    """Level-0 (width, height) and µm/px: given values win, else the slide's own."""
    if dims is not None and mpp is not None:
        return (int(dims[0]), int(dims[1])), float(mpp)
    if slide_path is None:
        raise SlideError(slide_id, "heatmaps need the slide, or its slide_dimensions and mpp")
    with _open(slide_id, slide_path, backend, mpp) as slide:
        return (dims or slide.dimensions), float(mpp if mpp is not None else slide.mpp.mean)
