"""Classical tissue segmentation in the spirit of CLAM, with sizes in µm and µm².

Saturation (HSV) → median blur → Otsu (floored) or fixed threshold → pen ink removed →
morphological closing → contours with holes → area filters. Because every size is
physical, one preset serves 20× and 40× scans and every scanner alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wsi_mil.errors import ConfigError


@dataclass(frozen=True)
class SegmentConfig:
    """Tissue segmentation settings (physical units).

    Parameters
    ----------
    seg_mpp : float
        µm/px of the image that is segmented (a pyramid level resized to it).
    threshold : str
        ``"otsu"`` or ``"fixed"`` (then ``sat_threshold`` is used as is).
    sat_threshold : int
        Fixed saturation threshold (0–255), and the floor under Otsu's, so a blank
        slide yields no tissue rather than thresholded noise.
    median_um : float
        Median-blur window in µm.
    close_um : float
        Closing structuring element in µm (fills small gaps in tissue).
    min_tissue_area_um2 : float
        Tissue pieces smaller than this are dropped.
    min_hole_area_um2 : float
        Holes smaller than this are filled.
    max_holes : int
        Keep at most this many (largest) holes per piece.
    exclude_pen : bool
        Remove green, blue and black ink before thresholding.
    """

    seg_mpp: float = 8.0
    threshold: str = "otsu"
    sat_threshold: int = 15
    median_um: float = 32.0
    close_um: float = 32.0
    min_tissue_area_um2: float = 40_000.0
    min_hole_area_um2: float = 20_000.0
    max_holes: int = 16
    exclude_pen: bool = True

    def __post_init__(self) -> None:
        if self.threshold not in ("otsu", "fixed"):
            raise ConfigError(f"threshold must be 'otsu' or 'fixed', got {self.threshold!r}")
        if self.seg_mpp <= 0:
            raise ConfigError(f"seg_mpp must be positive, got {self.seg_mpp}")
        if not 0 <= self.sat_threshold <= 255:
            raise ConfigError(f"sat_threshold must be in 0..255, got {self.sat_threshold}")
        sizes = ("median_um", "close_um", "min_tissue_area_um2", "min_hole_area_um2", "max_holes")
        for name in sizes:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")


@dataclass
class TissueMask:
    """Segmentation result on an image of ``mpp`` µm/px (``scale`` level-0 px per px).

    ``polygons`` are (exterior, [holes]) in level-0 pixel coordinates.
    """

    mask: np.ndarray  # (h, w) bool at seg resolution
    scale: float  # level-0 pixels per mask pixel
    mpp: float
    polygons: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)
    threshold: float = 0.0

    @property
    def area_um2(self) -> float:
        """Tissue area in µm²."""
        return float(self.mask.sum()) * self.mpp**2


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or black marker ink (H&E is pink to purple, never these)."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # OpenCV hue is 0–180: green ≈ 35–85, blue ≈ 85–128; haematoxylin sits at ≈ 130–150.
    coloured = (h >= 35) & (h <= 127) & (s >= 60)
    black = v < 70
    ink = (coloured | black).astype(np.uint8)
    # JPEG and resampling blur ink edges into pale halos: grow the ink by one pixel.
    return cv2.dilate(ink, np.ones((3, 3), np.uint8)).astype(bool)


def segment_tissue(rgb: np.ndarray, mpp: float, scale: float, cfg: SegmentConfig | None = None) -> TissueMask:
    """Segment tissue in an RGB image of known pixel size.

    Parameters
    ----------
    rgb : ndarray
        (h, w, 3) uint8 image of the whole slide.
    mpp : float
        µm per pixel of ``rgb``.
    scale : float
        Level-0 pixels per pixel of ``rgb`` (to express polygons at level 0).
    cfg : SegmentConfig, optional
        Settings; defaults to ``SegmentConfig()``.

    Returns
    -------
    TissueMask
        Binary mask (after area filters) and polygons with holes at level 0.

    Examples
    --------
    >>> tm = segment_tissue(img, mpp=8.0, scale=16.0)  # doctest: +SKIP
    """
    import cv2

    cfg = cfg or SegmentConfig()
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(hsv[..., 1], min(_odd(cfg.median_um / mpp), 255))
    ink = pen_mask(rgb) if cfg.exclude_pen else np.zeros(sat.shape, bool)
    if cfg.threshold == "otsu":
        valid = sat[~ink]
        thr, _ = (
            cv2.threshold(valid.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            if valid.size
            else (255, None)
        )
        thr = max(float(thr), float(cfg.sat_threshold))
    else:
        thr = float(cfg.sat_threshold)
    binary = ((sat > thr) & ~ink).astype(np.uint8)
    k = _odd(cfg.close_um / mpp)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    binary &= (~ink).astype(np.uint8)
    polygons_px = _filtered_contours(binary, mpp, cfg)
    mask = np.zeros(binary.shape, np.uint8)
    for outer, holes in polygons_px:
        cv2.fillPoly(mask, [outer], 1)
        if holes:
            cv2.fillPoly(mask, holes, 0)
    polygons = [(_to_level0(outer, scale), [_to_level0(h, scale) for h in holes]) for outer, holes in polygons_px]
    return TissueMask(mask=mask.astype(bool), scale=scale, mpp=mpp, polygons=polygons, threshold=thr)


def _to_level0(contour: np.ndarray, scale: float) -> np.ndarray:
    """(n, 1, 2) pixel contour → (n, 2) float level-0 coordinates of the pixel centres."""
    return (contour.reshape(-1, 2).astype(np.float64) + 0.5) * scale


def _filtered_contours(binary: np.ndarray, mpp: float, cfg: SegmentConfig) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Outer contours with their holes, after the physical area filters."""
    import cv2

    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    px_area = mpp * mpp
    out = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent != -1:
            continue
        holes = []
        while child != -1:
            holes.append(contours[child])
            child = hierarchy[child][0]
        hole_areas = [cv2.contourArea(h) * px_area for h in holes]
        area = cv2.contourArea(contours[i]) * px_area - sum(hole_areas)
        if area < cfg.min_tissue_area_um2:
            continue
        kept = [
            h for h, a in sorted(zip(holes, hole_areas, strict=True), key=lambda t: -t[1]) if a >= cfg.min_hole_area_um2
        ][: cfg.max_holes]
        out.append((contours[i], kept))
    return out
