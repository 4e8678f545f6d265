"""Patch-level quality control during tiling: focus, fold and debris scores, and rejection.

Every candidate patch (on tissue, after the grid) is read once at ``QcConfig.read_mpp``
— in strips of one grid row, from the best pyramid level (:meth:`Slide.read_resized`) —
and scored on its tissue pixels:

* **focus** — variance of the Laplacian of the grey image (0–255) at ``read_mpp``,
  over tissue pixels away from the tissue's edge. Rejected as **blur** when below
  ``min_focus`` × the slide's median focus, or below the absolute ``focus_floor``.
* **fold** — the share of tissue pixels whose *stroma* optical density (OD after a
  grey opening with a disc of ``fold_element_um`` µm, which removes nuclei) is at least
  ``fold_ratio`` × the slide's median. A double layer has twice the OD of one
  (Beer–Lambert), so the score compares a slide with itself and does not depend on stain
  intensity. Rejected as **fold** above ``max_fold``.
* **debris** — the share of the patch's pixels (H&E tissue and odd ones) that are
  specks: not H&E-like (brightness below ``debris_dark``, or saturated yellow, green or
  brown, hue 20–200°) and narrower than ``speck_um`` — dust, dirt, pigment crumbs; wider
  ink is the segmentation's (``exclude_pen``). Rejected as **debris** above ``max_debris``.
  Odd pixels count neither for focus nor for folds.

The pure functions (:func:`focus_score`, :func:`stroma_od`, :func:`debris_fraction`,
:func:`decide`) work on arrays; :func:`score_patches` is the one that reads a slide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from wsi_mil.errors import ConfigError

if TYPE_CHECKING:
    from wsi_mil.slide.base import Slide

#: Rejection reasons, in the order they are tested; the code stored per rejected patch.
REASONS = ("blur", "fold", "debris")
#: QuPath colours of the rejection classes (the QC GeoJSON layer).
REASON_COLOURS = {"blur": [230, 160, 0], "fold": [200, 0, 0], "debris": [120, 60, 0]}
#: The same colours by reason code (thumbnail drawing).
CODE_COLOURS = {i + 1: REASON_COLOURS[r] for i, r in enumerate(REASONS)}
#: Log-spaced OD bins of the stroma-density histograms (one per patch, summed for the slide).
_OD_BINS = np.geomspace(0.01, 3.0, 97)


@dataclass(frozen=True)
class QcConfig:
    """Patch QC settings; the ``qc:`` section of a tiling preset.

    Parameters
    ----------
    enabled : bool
        False keeps every patch and computes nothing (``wsi-mil tile --qc off``).
    read_mpp : float
        µm/px at which patches are scored (coarser than the patches is cheaper; the
        thresholds below are tuned at 2 µm/px).
    min_focus : float
        Blur when the focus is below this share of the slide's median focus.
    focus_floor : float
        Blur when the focus is below this absolute value (a slide blurred throughout).
    fold_element_um : float
        Diameter of the opening that removes nuclei before the fold test, in µm.
    fold_ratio : float
        A pixel is folded when its stroma OD is at least this multiple of the slide's median.
    max_fold : float
        Fold when more than this share of the patch's tissue is folded.
    debris_dark : int
        Brightness (HSV value, 0–255) below which a pixel is a dark speck.
    speck_um : float
        Debris is narrower than this (µm); wider ink or dirt is left to the segmentation.
    max_debris : float
        Debris when more than this share of the patch's tissue is not H&E-like.
    tissue_chroma : int
        Chroma (max − min of RGB) from which a pixel counts as tissue.
    band_px : int
        Height in pixels (at ``read_mpp``) of the bands of grid rows read at once (each
        stored tile is decoded once per band); only pixels at a band's edge see mirrored
        neighbours, so scores barely depend on it.
    """

    enabled: bool = True
    read_mpp: float = 2.0
    min_focus: float = 0.6
    focus_floor: float = 5.0
    fold_element_um: float = 20.0
    fold_ratio: float = 1.6
    max_fold: float = 0.45
    debris_dark: int = 40
    speck_um: float = 30.0
    max_debris: float = 0.25
    tissue_chroma: int = 15
    band_px: int = 256

    def __post_init__(self) -> None:
        if self.read_mpp <= 0 or self.fold_element_um < 0 or self.speck_um < 0:
            raise ConfigError(f"qc.read_mpp must be positive, qc.fold_element_um and qc.speck_um ≥ 0, got "
                              f"{self.read_mpp}, {self.fold_element_um} and {self.speck_um}")
        for name in ("min_focus", "max_fold", "max_debris"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"qc.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.fold_ratio <= 1.0 or self.focus_floor < 0:
            raise ConfigError(f"qc.fold_ratio must be > 1 and qc.focus_floor ≥ 0, got "
                              f"{self.fold_ratio} and {self.focus_floor}")
        if self.band_px < 1:
            raise ConfigError(f"qc.band_px must be ≥ 1, got {self.band_px}")
        if not 0 <= self.debris_dark <= 255 or not 0 <= self.tissue_chroma <= 255:
            raise ConfigError(f"qc.debris_dark and qc.tissue_chroma must be in 0..255, got "
                              f"{self.debris_dark} and {self.tissue_chroma}")


@dataclass
class QcScores:
    """Per-patch scores, in the order of the candidate coords."""

    focus: np.ndarray  # (N,) float32, variance of the Laplacian
    fold: np.ndarray  # (N,) float32, share of tissue folded
    debris: np.ndarray  # (N,) float32, share of tissue not H&E-like
    focus_reference: float  # the slide's median focus


# --------------------------------------------------------------------------- pure scores


def tissue_pixels(rgb: np.ndarray, chroma: int = 15) -> np.ndarray:
    """(h, w) bool: pixels with chroma (max − min of RGB) of at least ``chroma``."""
    import cv2

    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    return cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)) >= chroma


def laplacian(rgb: np.ndarray) -> np.ndarray:
    """Laplacian (float32) of the grey image of ``rgb`` (h, w, 3) uint8."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
    return cv2.Laplacian(gray, cv2.CV_32F)


def focus_mask(tissue: np.ndarray) -> np.ndarray:
    """Tissue pixels four pixels or more inside the tissue (the glass edge is not focus)."""
    import cv2

    return cv2.erode(tissue.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)


def focus_score(rgb: np.ndarray, chroma: int = 15, dark: int = 40) -> float:
    """Variance of the Laplacian of one patch's grey image over its inner tissue pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sharp = np.clip(rng.normal([200, 120, 180], 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    >>> import cv2
    >>> focus_score(sharp) > 10 * focus_score(cv2.GaussianBlur(sharp, (0, 0), 2))
    True
    """
    m = focus_mask(tissue_pixels(rgb, chroma) & ~odd_pixels(rgb, dark))
    return float(laplacian(rgb)[m].var()) if m.any() else 0.0


_OD_LUT = (-np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over the three channels, (h, w) float32: −log10(I / 255)."""
    import cv2

    od3 = cv2.LUT(np.ascontiguousarray(rgb), _OD_LUT)  # (h, w, 3) float32
    return cv2.transform(od3, np.full((1, 3), 1 / 3, np.float32)).reshape(od3.shape[:2])


def od_code(od: np.ndarray) -> np.ndarray:
    """Bin of each OD in :data:`_OD_BINS` as uint8 (``np.digitize`` semantics: 0 below the first)."""
    step = np.log(_OD_BINS[-1] / _OD_BINS[0]) / (len(_OD_BINS) - 1)
    code = np.floor(np.log(np.maximum(od, 1e-6) / _OD_BINS[0]) / step) + 1
    return np.clip(code, 0, len(_OD_BINS)).astype(np.uint8)


def stroma_od(rgb: np.ndarray, element_px: int) -> np.ndarray:
    """:func:`od_code` after a grey opening with a disc of ``element_px`` px: dark specks
    smaller than the disc (nuclei) are removed and the density of the tissue around them
    remains. (An opening commutes with the increasing OD → code map, so it runs on codes.)"""
    import cv2

    code = od_code(optical_density(rgb))
    if element_px < 2:
        return code
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (element_px, element_px))
    return cv2.morphologyEx(code, cv2.MORPH_OPEN, disc)


def odd_pixels(rgb: np.ndarray, dark: int = 40) -> np.ndarray:
    """(h, w) bool: not H&E — near-black, or saturated colour outside its purple–pink hues."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)  # H in 0..179 (2° steps)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    odd_hue = (h >= 10) & (h <= 100) & (s >= 64) & (v >= dark)  # 20°–200°: yellow, green, brown
    return (v < dark) | odd_hue


def speck_pixels(odd: np.ndarray, element_px: int) -> np.ndarray:
    """The parts of ``odd`` narrower than a disc of ``element_px`` px: specks, not pen strokes
    (ink wider than the disc is the segmentation's to exclude, and is left to it)."""
    import cv2

    if element_px < 2:
        return odd.copy()
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (element_px, element_px))
    wide = cv2.morphologyEx(odd.astype(np.uint8), cv2.MORPH_OPEN, disc).astype(bool)
    return odd & ~wide


def debris_fraction(rgb: np.ndarray, element_px: int = 15, dark: int = 40, chroma: int = 15) -> float:
    """Share of a patch's H&E tissue and odd pixels that are specks (:func:`speck_pixels`).

    Examples
    --------
    >>> patch = np.full((64, 64, 3), (230, 150, 200), np.uint8)
    >>> patch[::8, ::8] = (20, 20, 20)  # dust: one-pixel specks
    >>> round(debris_fraction(patch), 4)
    0.0156
    >>> patch[:, :32] = (40, 150, 70)  # a green pen stroke is no debris
    >>> round(debris_fraction(patch), 4)
    0.0078
    """
    odd = odd_pixels(rgb, dark)
    base = tissue_pixels(rgb, chroma) | odd
    return float(speck_pixels(odd, element_px)[base].mean()) if base.any() else 0.0


def decide(scores: QcScores, cfg: QcConfig) -> np.ndarray:
    """Reason code per patch: 0 kept, else 1 + index in :data:`REASONS` (first failing test).

    Examples
    --------
    >>> s = QcScores(np.array([100.0, 10, 100, 100]), np.array([0, 0, 0.9, 0]), np.array([0, 0, 0, 0.5]), 100.0)
    >>> decide(s, QcConfig()).tolist()
    [0, 1, 2, 3]
    """
    blur = (scores.focus < cfg.min_focus * scores.focus_reference) | (scores.focus < cfg.focus_floor)
    fold = scores.fold > cfg.max_fold
    debris = scores.debris > cfg.max_debris
    return np.select([blur, fold, debris], [1, 2, 3], 0).astype(np.uint8)


# --------------------------------------------------------------------------- reading


def _runs(xs: np.ndarray, stride: int) -> list[np.ndarray]:
    """Indices into sorted ``xs`` split where neighbours are more than one stride apart."""
    cut = np.flatnonzero(np.diff(xs) > stride) + 1
    return np.split(np.arange(len(xs)), cut)


def score_patches(
    read: Callable[[tuple[int, int], tuple[int, int], tuple[int, int]], np.ndarray],
    coords: np.ndarray,
    size_level0: int,
    stride_level0: int,
    mpp: float,
    cfg: QcConfig,
) -> QcScores:
    """Score every patch of ``coords``, reading each grid row as strips at ``cfg.read_mpp``.

    Parameters
    ----------
    read : callable
        ``read(location, size_level0, size)`` → (h, w, 3) uint8, as :meth:`Slide.read_resized`.
    coords : ndarray
        (N, 2) level-0 top-left corners.
    size_level0, stride_level0 : int
        Patch side and grid step in level-0 pixels.
    mpp : float
        Level-0 µm/px of the slide.
    cfg : QcConfig
        Settings.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    n = len(coords)
    f = mpp / cfg.read_mpp  # QC pixels per level-0 pixel
    p = max(8, int(round(size_level0 * f)))  # patch side at read_mpp
    element = int(round(cfg.fold_element_um / cfg.read_mpp)) | 1
    speck = int(round(cfg.speck_um / cfg.read_mpp)) | 1
    focus = np.zeros(n, np.float32)
    debris = np.zeros(n, np.float32)
    hist = np.zeros((n, len(_OD_BINS) + 1), np.int32)  # stroma-OD histogram of each patch's tissue
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    ys = coords[order, 1]
    # Bands of whole grid rows, about ``band_level0`` high: each stored tile is decoded once
    # per band rather than once per row of patches.
    band_level0 = max(size_level0, int(cfg.band_px / f))
    first = 0
    while first < n:
        last = int(np.searchsorted(ys, ys[first] + band_level0 - size_level0, side="right"))
        band = order[first:max(last, first + 1)]
        first = max(last, first + 1)
        xs = np.unique(coords[band, 0])
        for run in _runs(xs, stride_level0):
            x0, x1 = int(xs[run[0]]), int(xs[run[-1]]) + size_level0
            sel = band[(coords[band, 0] >= x0) & (coords[band, 0] < x1)]
            y0, y1 = int(coords[sel, 1].min()), int(coords[sel, 1].max()) + size_level0
            ox = np.round((coords[sel, 0] - x0) * f).astype(int)
            oy = np.round((coords[sel, 1] - y0) * f).astype(int)
            w, h = max(int(round((x1 - x0) * f)), int(ox.max()) + p), max(int(round((y1 - y0) * f)), int(oy.max()) + p)
            _score_block(read((x0, y0), (x1 - x0, y1 - y0), (w, h)), sel, ox, oy, p, element, speck, cfg,
                         focus, debris, hist)
    fold = _fold_fraction(hist, cfg.fold_ratio)
    full = hist.sum(1) >= 0.5 * p * p  # the reference comes from patches mostly on tissue
    ref = float(np.median(focus[full])) if full.any() else float(np.median(focus)) if n else 0.0
    return QcScores(focus=focus, fold=fold, debris=debris, focus_reference=ref)


def _score_block(block: np.ndarray, idx: np.ndarray, ox: np.ndarray, oy: np.ndarray, p: int, element: int,
                 speck: int, cfg: QcConfig, focus: np.ndarray, debris: np.ndarray, hist: np.ndarray) -> None:
    """Score the patches ``idx`` at block pixels (ox, oy), side ``p``, into the output arrays."""
    odd = odd_pixels(block, cfg.debris_dark)
    base = tissue_pixels(block, cfg.tissue_chroma) | odd  # what the debris share is of
    tis = base & ~odd  # H&E tissue: ink, dirt and dark specks are neither in focus nor folded
    inner = focus_mask(tis)
    lap = laplacian(block) * inner  # 0 off the inner tissue
    deb = speck_pixels(odd, speck)
    codes = stroma_od(block, element)
    nb = hist.shape[1]
    width = block.shape[1]
    col = np.broadcast_to(np.arange(width), codes.shape)
    for top in np.unique(oy).tolist():
        at = oy == top
        i, o = idx[at], ox[at]
        r = np.s_[top : top + p]
        t, m, lp, d = tis[r], inner[r], lap[r], deb[r]
        # Column sums, cumulated: any patch's sum is a difference of two columns.
        cols = np.stack([m.sum(0), lp.sum(0), (lp * lp).sum(0), d.sum(0), base[r].sum(0)])
        cum = np.concatenate([np.zeros((5, 1)), np.cumsum(cols, 1, dtype=np.float64)], 1)  # (5, width+1)
        sums = cum[:, o + p] - cum[:, o]  # (5, n): count, Σlap, Σlap², debris, base
        k = np.maximum(sums[0], 1)
        focus[i] = np.where(sums[0] > 1, sums[2] / k - (sums[1] / k) ** 2, 0.0)
        debris[i] = np.where(sums[4] > 0, sums[3] / np.maximum(sums[4], 1), 0.0)
        per_col = np.bincount(codes[r][t].astype(np.int64) * width + col[r][t],
                              minlength=nb * width).reshape(nb, width)  # (bins, width)
        cum_h = np.concatenate([np.zeros((nb, 1), np.int64), np.cumsum(per_col, 1)], 1)
        hist[i] = (cum_h[:, o + p] - cum_h[:, o]).T


def _fold_fraction(hist: np.ndarray, ratio: float) -> np.ndarray:
    """Per patch, the share of tissue pixels with stroma OD ≥ ``ratio`` × the slide's median."""
    total = hist.sum(0)
    if not total.sum():
        return np.zeros(len(hist), np.float32)
    cum = np.cumsum(total)
    median_bin = int(np.searchsorted(cum, cum[-1] / 2))
    edges = np.concatenate([[0.0], _OD_BINS])
    median = edges[min(median_bin, len(edges) - 1)]
    first = int(np.searchsorted(_OD_BINS, ratio * median))  # bin index of OD ≥ ratio × median
    above = hist[:, first + 1 :].sum(1)
    n = hist.sum(1)
    return np.where(n > 0, above / np.maximum(n, 1), 0.0).astype(np.float32)


def summary(reasons: np.ndarray) -> str:
    """One line for the status table: ``"qc: 12 blur, 3 fold, 0 debris of 240"``."""
    counts = [int((reasons == i + 1).sum()) for i in range(len(REASONS))]
    return "qc: " + ", ".join(f"{c} {r}" for c, r in zip(counts, REASONS, strict=True)) + f" of {len(reasons)}"


# --------------------------------------------------------------------------- one slide


@dataclass
class QcResult:
    """QC of one slide's candidate patches: their scores and the reason of each (0 kept)."""

    coords: np.ndarray  # (N, 2) int64, every candidate
    scores: QcScores
    reasons: np.ndarray  # (N,) uint8, 0 kept, else 1 + index in REASONS

    @property
    def kept(self) -> np.ndarray:
        """(N,) bool: patches that passed."""
        return self.reasons == 0

    def summary(self) -> str:
        """One line for the status table (:func:`summary`)."""
        return summary(self.reasons)

    def attrs(self) -> dict[str, object]:
        """Attributes of the patch file: the slide's focus reference and the summary."""
        return {"qc_focus_reference": self.scores.focus_reference, "qc_summary": self.summary()}

    def datasets(self) -> dict[str, tuple[np.ndarray, dict[str, object]]]:
        """The ``qc_*`` datasets of ``patches/<id>.h5`` (:mod:`wsi_mil.io.h5` names)."""
        from wsi_mil.io import h5

        k, r = self.kept, ~self.kept
        s = self.scores
        table = np.stack([s.focus, s.fold, s.debris], 1).astype(np.float32)  # (N, 3)
        return {
            h5.QC_FOCUS: (s.focus[k], {"description": "variance of the Laplacian of the grey patch"}),
            h5.QC_FOLD: (s.fold[k], {"description": "share of tissue with a double layer's stroma density"}),
            h5.QC_DEBRIS: (s.debris[k], {"description": "share of tissue that is dark specks or not H&E-like"}),
            h5.QC_REJECTED_COORDS: (self.coords[r], {}),
            h5.QC_REJECTED_REASON: (self.reasons[r], {"reasons": list(REASONS)}),
            h5.QC_REJECTED_SCORES: (table[r], {"columns": ["focus", "fold", "debris"]}),
        }


def run_qc(slide: Slide, coords: np.ndarray, size_level0: int, stride_level0: int, cfg: QcConfig) -> QcResult:
    """Score and judge every candidate patch of an open slide.

    Parameters
    ----------
    slide : Slide
        An open slide (:class:`wsi_mil.slide.base.Slide`).
    coords : ndarray
        (N, 2) level-0 corners of the candidate patches.
    size_level0, stride_level0 : int
        Patch side and grid step in level-0 pixels.
    cfg : QcConfig
        Settings.

    Raises
    ------
    SlideError
        The slide cannot be read.

    Examples
    --------
    >>> res = run_qc(slide, coords, 256, 256, QcConfig())  # doctest: +SKIP
    >>> res.summary()  # doctest: +SKIP
    'qc: 12 blur, 3 fold, 0 debris of 240'
    """
    from wsi_mil.errors import SlideError

    def read(location: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        try:
            return slide.read_resized(location, size_level0, size)
        except SlideError:
            raise
        except Exception as exc:  # decoders raise many types on truncated data
            raise SlideError(slide.slide_id, f"cannot read {slide.path} for patch QC ({exc})") from exc

    scores = score_patches(read, coords, size_level0, stride_level0, slide.mpp.mean, cfg)
    return QcResult(np.asarray(coords, np.int64).reshape(-1, 2), scores, decide(scores, cfg))


def qc_feature_collection(result: QcResult, size_level0: int) -> dict[str, object]:
    """The rejected patches as a QuPath FeatureCollection: level-0 squares classified
    ``blur``/``fold``/``debris``, with the three scores as measurements."""
    from wsi_mil.io.geojson import patch_feature_collection

    r = ~result.kept
    s = result.scores
    fc = patch_feature_collection(result.coords[r], size_level0,
                                  {"qc_focus": s.focus[r], "qc_fold": s.fold[r], "qc_debris": s.debris[r]},
                                  object_type="annotation")
    for feat, code in zip(fc["features"], result.reasons[r].tolist(), strict=True):
        name = REASONS[code - 1]
        feat["properties"]["classification"] = {"name": name, "color": REASON_COLOURS[name]}
    return fc
