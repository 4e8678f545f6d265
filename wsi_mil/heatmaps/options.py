"""Rendering options of the heatmaps; ``configs/heatmap/*.yaml`` are presets of them."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_mil.errors import ConfigError

NORMALISATIONS = ("raw", "minmax", "percentile", "rank")
CLIPS = ("auto", "tissue", "patches", "none")
COMBINES = ("mean", "max")


@dataclass(frozen=True)
class HeatmapOptions:
    """How heatmaps are rendered.

    Parameters
    ----------
    score : str
        What the PNG, TIFF and Zarr show: ``"attention"`` or a class, given by name or as
        ``"prob:<name>"`` / ``"prob:<index>"`` (its instance probability).
    normalise : str
        ``raw`` (values clipped to [0, 1]), ``minmax`` (per slide), ``percentile``
        (clip to ``percentiles`` then min–max) or ``rank`` (per-slide rank / (N − 1)).
    percentiles : tuple of float
        Lower and upper percentiles for ``normalise = percentile``.
    attention_normalisation : str
        How ``attention_norm`` in the HDF5 file is made: ``minmax`` or ``rank``.
    colormap : str
        A matplotlib colormap name.
    alpha : float
        Opacity of the overlay on the PNG thumbnail (the TIFF and Zarr are opaque where
        there is a score and transparent elsewhere; viewers set their own opacity).
    smooth_um : float
        Standard deviation of a Gaussian smoothing of the score map, in µm (0 = off).
        Smoothing is normalised (gaps are not pulled to zero) and clipped by ``clip``.
    clip : str
        Where the overlay is drawn: ``tissue`` (polygons of ``masks/<id>.geojson``),
        ``patches`` (patch coverage), ``none``, or ``auto`` (tissue when a mask exists).
    combine : str
        How overlapping patches are combined at a pixel: ``mean`` or ``max``.
    interpolation : str
        ``nearest`` keeps patch squares sharp; ``linear`` blends neighbouring patches.
    png_max : int
        Longest side of the PNG overlay in pixels.
    tiff_px_per_patch : int
        Pixels per patch side at the TIFF/Zarr base level; the base-level pixel size is
        ``patch_size_level0 * mpp / tiff_px_per_patch`` (adjusted so that the overlay's
        physical extent equals the slide's exactly).
    tile_size : int
        TIFF tile and Zarr chunk side.
    compression_level : int
        zlib level of the TIFF tiles (1 = fastest).
    zarr : bool
        Also write ``<id>.zarr`` (OME-Zarr 0.4 multiscale group).
    gallery_k : int
        Patches in each row of the gallery (top-k and bottom-k by score; 0 = no gallery).
    gallery_px : int
        Side of one gallery patch in pixels.
    backend : str
        Slide backend used for the thumbnail and the gallery.
    """

    score: str = "attention"
    normalise: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    attention_normalisation: str = "minmax"
    colormap: str = "jet"
    alpha: float = 0.5
    smooth_um: float = 0.0
    clip: str = "auto"
    combine: str = "mean"
    interpolation: str = "nearest"
    png_max: int = 2048
    tiff_px_per_patch: int = 16
    tile_size: int = 256
    compression_level: int = 1
    zarr: bool = False
    gallery_k: int = 8
    gallery_px: int = 128
    backend: str = "auto"

    def __post_init__(self) -> None:
        checks = (
            ("normalise", self.normalise, NORMALISATIONS),
            ("attention_normalisation", self.attention_normalisation, ("minmax", "rank")),
            ("clip", self.clip, CLIPS),
            ("combine", self.combine, COMBINES),
            ("interpolation", self.interpolation, ("nearest", "linear")),
        )
        for name, value, valid in checks:
            if value not in valid:
                raise ConfigError(
                    f"heatmap {name} must be one of {', '.join(valid)}, got {value!r}"
                )
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(
                f"heatmap percentiles must satisfy 0 ≤ low < high ≤ 100, got {self.percentiles}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"heatmap alpha must be in [0, 1], got {self.alpha}")
        if self.smooth_um < 0:
            raise ConfigError(f"heatmap smooth_um must be ≥ 0, got {self.smooth_um}")
        if self.tiff_px_per_patch < 1 or self.tile_size < 16 or self.tile_size % 16:
            raise ConfigError(
                "heatmap tiff_px_per_patch must be ≥ 1 and tile_size a multiple of 16"
            )
        if self.png_max < 16 or self.gallery_k < 0 or self.gallery_px < 8:
            raise ConfigError("heatmap png_max must be ≥ 16, gallery_k ≥ 0 and gallery_px ≥ 8")
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(
                f"heatmap compression_level must be in 0..9, got {self.compression_level}"
            )
