"""Stage 1 for one slide: open → segment → tile → write patches, mask and thumbnail."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, SlideError
from wsi_mil.io import h5
from wsi_mil.io.layout import Layout
from wsi_mil.tiling.grid import box_fractions, grid_coords, patch_geometry
from wsi_mil.tiling.qc import QcConfig
from wsi_mil.tissue.segment import SegmentConfig, segment_tissue


@dataclass(frozen=True)
class TileConfig:
    """Tiling settings; ``configs/tile/*.yaml`` are presets of it.

    Parameters
    ----------
    patch_size : int
        Patch side in pixels at ``target_mpp``.
    target_mpp : float
        µm/px of the patches (0.5 ≈ 20×).
    overlap : float
        Fraction shared by neighbouring patches, in [0, 1).
    min_tissue : float
        Minimum share of a patch that must be tissue.
    backend : str
        Slide backend (``openslide`` or ``tiffslide``).
    thumbnail_max : int
        Longest side of ``thumbnails/<id>.png`` in pixels.
    simplify_um : float
        Douglas–Peucker tolerance for ``masks/<id>.geojson`` polygons, in µm.
    segment : SegmentConfig
        Tissue segmentation settings.
    qc : QcConfig
        Patch QC (focus, fold, debris) of the candidate patches; ``enabled: false`` keeps all.
    """

    patch_size: int = 256
    target_mpp: float = 0.5
    overlap: float = 0.0
    min_tissue: float = 0.25
    backend: str = "auto"
    thumbnail_max: int = 2048
    simplify_um: float = 4.0
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    qc: QcConfig = field(default_factory=QcConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.patch_size < 8:
            raise ConfigError(f"patch_size must be ≥ 8 px, got {self.patch_size}")
        if self.target_mpp <= 0:
            raise ConfigError(f"target_mpp must be a positive µm/px, got {self.target_mpp}")
        if self.thumbnail_max < 16 or self.simplify_um < 0:
            raise ConfigError(f"thumbnail_max must be ≥ 16 px and simplify_um ≥ 0, got "
                              f"{self.thumbnail_max} and {self.simplify_um}")


@dataclass
class TileResult:
    """What tiling one slide produced."""

    slide_id: str
    state: str  # "done" or "empty"
    n_patches: int
    mpp: float
    mpp_source: str
    timings: dict[str, float]
    qc: str = ""  # QC summary ("qc: 12 blur, 3 fold, 0 debris of 240"); "" with QC off


def patches_path(out: Path, slide_id: str) -> Path:
    """``OUT/patches/<id>.h5`` (:meth:`~wsi_mil.io.layout.Layout.patches`)."""
    return Layout(out).patches(slide_id)


def tile_inputs(cfg: TileConfig, slide_path: str | Path, mpp: float | None = None) -> dict[str, Any]:
    """What makes a patch file: the tile settings, the slide's identity and any mpp override.

    Recorded in ``patches/<id>.h5`` (:mod:`wsi_mil.io.provenance`); resume compares it.
    """
    from dataclasses import asdict

    from wsi_mil.io.provenance import slide_fingerprint

    return {"tile": asdict(cfg), "slide": slide_fingerprint(slide_path), "mpp_override": mpp}


def check_tiled(out: Path, slide_id: str, expected: dict[str, Any]) -> None:
    """Raise :class:`~wsi_mil.io.provenance.StaleOutputError` unless the patch file records ``expected``."""
    from wsi_mil.io.provenance import check

    p = patches_path(out, slide_id)
    check(slide_id, p, h5.read_patches(p).attrs, expected)


def is_tiled(out: Path, slide_id: str, expected: dict[str, Any] | None = None) -> bool:
    """True if a complete patch file exists (and, given ``expected``, records exactly those inputs).

    Files appear only complete (temp + rename), so existence plus a readable ``coords``
    dataset means finished; ``expected`` (:func:`tile_inputs`) also asks how it was made.
    """
    from wsi_mil.io.provenance import PROVENANCE, digest

    p = patches_path(out, slide_id)
    if not p.exists():
        return False
    try:
        attrs = h5.read_patches(p).attrs
    except Exception:
        return False
    return expected is None or str(attrs.get(PROVENANCE, "")) == digest(expected)


def tile_slide(
    path: str | Path,
    out: str | Path,
    cfg: TileConfig | None = None,
    mpp: float | None = None,
    mpp_source: str = "cli",
    slide_id: str | None = None,
) -> TileResult:
    """Tile one slide into ``OUT/patches``, ``OUT/masks`` and ``OUT/thumbnails``.

    Parameters
    ----------
    path : path-like
        Slide file.
    out : path-like
        Cohort output folder.
    cfg : TileConfig, optional
        Settings (defaults: 256 px at 0.5 µm/px).
    mpp, mpp_source : optional
        Level-0 µm/px override and where it came from (``"csv"``/``"cli"``).
    slide_id : str, optional
        Id to use instead of the file name's stem.

    Raises
    ------
    SlideError
        The slide cannot be opened or read, has no mpp, or is smaller than one patch.

    Examples
    --------
    >>> tile_slide("slides/a.tif", "out")  # doctest: +SKIP
    """
    from wsi_mil.io.geojson import tissue_feature_collection, write_geojson
    from wsi_mil.io.provenance import SLIDE_FINGERPRINT, stamp
    from wsi_mil.slide import open_slide
    from wsi_mil.tiling.qc import CODE_COLOURS, qc_feature_collection, run_qc
    from wsi_mil.tiling.thumbnail import draw_rejected, draw_thumbnail, write_png

    cfg = cfg or TileConfig()
    out = Path(out)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with open_slide(path, backend=cfg.backend, mpp=mpp, mpp_source=mpp_source) as slide:
        sid = slide_id or slide.slide_id
        slide_mpp, opened = slide.mpp, slide.backend_name
        width, height = slide.dimensions
        geom = patch_geometry(slide_mpp.mean, cfg.target_mpp, cfg.patch_size, slide.level_downsamples, cfg.overlap)
        if width < geom.size_level0 or height < geom.size_level0:
            raise SlideError(
                sid, f"{path} is {width}×{height} px, smaller than one patch ({geom.size_level0} px at level 0)"
            )
        timings["open"] = time.perf_counter() - t0

        t = time.perf_counter()
        try:
            rgb, seg_mpp = slide.read_at_mpp(cfg.segment.seg_mpp)
        except SlideError:
            raise
        except Exception as exc:  # decoders raise many types on truncated data
            raise SlideError(sid, f"cannot read {path} ({exc})") from exc
        scale = width / rgb.shape[1]
        tissue = segment_tissue(rgb, seg_mpp, scale, cfg.segment)
        timings["segment"] = time.perf_counter() - t

        t = time.perf_counter()
        coords = np.empty((0, 2), np.int64)
        if tissue.mask.any():
            ys, xs = np.nonzero(tissue.mask)
            bbox = (int(xs.min() * scale), int(ys.min() * scale), int((xs.max() + 1) * scale),
                    int((ys.max() + 1) * scale))  # fmt: skip
            coords = grid_coords(width, height, geom.size_level0, geom.stride_level0, bbox)
            frac = box_fractions(tissue.mask, scale, coords, geom.size_level0)
            coords = coords[frac >= max(cfg.min_tissue, 1e-9)]
        timings["tile"] = time.perf_counter() - t

        qc = None
        if cfg.qc.enabled and len(coords):  # through the handle that segmented: one open per slide
            t = time.perf_counter()
            qc = run_qc(slide, coords, geom.size_level0, geom.stride_level0, cfg.qc)
            coords = coords[qc.kept]
            timings["qc"] = time.perf_counter() - t

    t = time.perf_counter()
    attrs = {
        h5.ATTR_PATCH_SIZE: geom.size_at_level,
        h5.ATTR_PATCH_LEVEL: geom.level,
        h5.ATTR_DOWNSAMPLE: [geom.level_downsample, geom.level_downsample],
        h5.ATTR_DOWNSAMPLED_LEVEL_DIM: list(_level_dims(width, height, geom.level_downsample)),
        h5.ATTR_LEVEL_DIM: list(_level_dims(width, height, geom.level_downsample)),
        h5.ATTR_NAME: sid,
        h5.ATTR_PATCH_SIZE_LEVEL0: geom.size_level0,
        h5.ATTR_MPP: slide_mpp.mean,
        h5.ATTR_TARGET_MPP: cfg.target_mpp,
        h5.ATTR_OVERLAP: cfg.overlap,
        "target_patch_size": cfg.patch_size,
        "stride_level0": geom.stride_level0,
        "mpp_source": slide_mpp.source,
        "backend_used": opened,  # the reader that opened it (backend auto tries several)
        "min_tissue": cfg.min_tissue,
        "slide_path": str(Path(path).resolve()),
        "slide_dimensions": [width, height],
        "tissue_area_um2": tissue.area_um2,
    }
    inputs = tile_inputs(cfg, path, mpp)
    attrs.update(stamp(inputs), **{SLIDE_FINGERPRINT: inputs["slide"]}, qc_enabled=cfg.qc.enabled)
    layout = Layout(out)
    tol = cfg.simplify_um / slide_mpp.mean
    write_geojson(layout.mask(sid), tissue_feature_collection(tissue.polygons, tol))
    thumb, tscale = _thumbnail(rgb, scale, cfg.thumbnail_max)
    drawn = draw_thumbnail(thumb, tscale, tissue.polygons, coords, geom.size_level0)
    if qc is not None:
        drawn = draw_rejected(drawn, tscale, qc.coords, qc.reasons, geom.size_level0, CODE_COLOURS)
    write_png(layout.thumbnail(sid), drawn)
    if cfg.qc.enabled:  # an empty layer too, so a re-tile never leaves a stale one behind
        write_geojson(layout.qc_mask(sid), qc_feature_collection(qc, geom.size_level0) if qc else
                      {"type": "FeatureCollection", "features": []})
    else:
        layout.qc_mask(sid).unlink(missing_ok=True)
    # The patch file last: a re-run takes it as "this slide is tiled" (is_tiled), so a run
    # killed before it leaves no slide whose mask or thumbnail is missing.
    h5.write_patches(layout.patches(sid), coords, {**attrs, **(qc.attrs() if qc else {})},
                     qc.datasets() if qc else None)
    timings["write"] = time.perf_counter() - t
    return TileResult(sid, "done" if len(coords) else "empty", len(coords), slide_mpp.mean, slide_mpp.source,
                      timings, qc.summary() if qc else "")


def _level_dims(width: int, height: int, ds: float) -> tuple[int, int]:
    return int(round(width / ds)), int(round(height / ds))


def _thumbnail(rgb: np.ndarray, scale: float, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink the segmentation image to at most ``max_side`` px; return it and its scale."""
    import cv2

    h, w = rgb.shape[:2]
    f = max(h, w) / max_side
    if f <= 1:
        return rgb, scale
    small = cv2.resize(rgb, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    return small, scale * w / small.shape[1]
