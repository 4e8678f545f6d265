"""Write H&E-like pyramidal TIFF slides with ground-truth tissue and tumour masks.

The slide is a tiled, JPEG-compressed, pyramidal TIFF with resolution tags (µm/px), read
by both OpenSlide (generic-tiff) and tiffslide. Tissue is drawn from a smooth random
field defined on a coarse "truth grid"; every pyramid level is rendered tile by tile from
that field, so a 30,000 × 20,000 slide never exists in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_mil.io.atomic import atomic_path
from wsi_mil.synthetic.artefacts import apply_artefacts, artefact_masks

BACKGROUND = np.array([243, 241, 244], np.float32)
EOSIN = np.array([236, 160, 200], np.float32)
HEMATOXYLIN = np.array([85, 45, 135], np.float32)
PEN_COLOURS = {"green": (40, 150, 70), "blue": (40, 60, 170), "black": (30, 30, 35)}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to draw.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float or None
        Level-0 µm/px written into the resolution tags; None writes no resolution.
    n_tissue : int
        Number of tissue pieces.
    tumour : bool
        Draw tumour regions (denser, darker nuclei) inside the tissue.
    pen : tuple of str
        Pen-mark colours to draw (``"green"``, ``"blue"``, ``"black"``).
    truth_downsample : int
        Level-0 pixels per ground-truth mask pixel (use 64 or more for slides of
        gigapixels: the truth grid and the fields drawn on it are held in memory).
    seed : int
        Random seed; the same spec writes the same slide.
    levels : tuple of int, optional
        Downsample of each pyramid level, ``(1,)`` for a flat single-level slide;
        default 1, 4, 16, ... until a level fits in about 1,500 px.
    tissue_scale : float
        Size of each tissue piece as a fraction of the slide's short side (0.4 fills
        much of the slide; 0.05 gives small islands on glass).
    plain_background : bool
        Write tiles away from tissue and ink as plain glass without rendering them, so
        mostly-empty slides of 10⁹–10¹⁰ pixels are written in minutes.
    blur, folds : int
        Number of out-of-focus regions and of folded (double-layer) bands drawn on the
        tissue (:mod:`wsi_mil.synthetic.artefacts`); 0 draws none.
    blur_sigma_um : float
        Gaussian sigma of the blur, in µm.
    artefact_scale : float
        Size of a blur region (radius) and of a fold (half-length / 2) as a fraction of
        the slide's short side.
    """

    width: int = 8192
    height: int = 6144
    mpp: float | None = 0.5
    n_tissue: int = 3
    tumour: bool = False
    tumour_fraction: float = 0.25
    pen: tuple[str, ...] = ()
    truth_downsample: int = 16
    tile: int = 512
    jpeg_quality: int = 85
    seed: int = 0
    levels: tuple[int, ...] | None = None
    tissue_scale: float = 0.4
    plain_background: bool = False
    blur: int = 0
    folds: int = 0
    blur_sigma_um: float = 2.5
    artefact_scale: float = 0.08


@dataclass
class SyntheticTruth:
    """Ground truth on a grid of ``downsample`` level-0 pixels per cell."""

    tissue: np.ndarray  # (h, w) bool, tissue not covered by ink
    tumour: np.ndarray  # (h, w) bool, subset of tissue
    pen: np.ndarray  # (h, w) bool
    downsample: int
    spec: dict = field(default_factory=dict)
    blur: np.ndarray | None = None  # (h, w) bool, out-of-focus tissue
    fold: np.ndarray | None = None  # (h, w) bool, folded (double-layer) tissue
    lymphoid: np.ndarray | None = None  # (h, w) bool, lymphoid aggregates (hard negatives)

    def __post_init__(self) -> None:
        if self.blur is None:
            self.blur = np.zeros_like(self.tissue)
        if self.fold is None:
            self.fold = np.zeros_like(self.tissue)
        if self.lymphoid is None:
            self.lymphoid = np.zeros_like(self.tissue)

    def fraction_in(self, x: int, y: int, size: int, which: str = "tissue") -> float:
        """Share of the level-0 square (x, y, size) that is ``which`` on the truth grid."""
        mask = getattr(self, which)
        d = self.downsample
        x0, y0 = x / d, y / d
        x1, y1 = (x + size) / d, (y + size) / d
        sub = mask[int(y0) : math.ceil(y1), int(x0) : math.ceil(x1)]
        return float(sub.mean()) if sub.size else 0.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], blobs: int, scale: float) -> np.ndarray:
    """Sum of random elliptic bumps warped by low-frequency noise, in [0, ~1]."""
    import cv2

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(blobs):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        rx = rng.uniform(0.6, 1.0) * scale * min(h, w)
        ry = rx * rng.uniform(0.5, 1.0)
        th = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(th) + dy * np.sin(th)) / rx
        v = (-dx * np.sin(th) + dy * np.cos(th)) / ry
        out = np.maximum(out, np.exp(-(u**2 + v**2) * 1.5))
    noise = rng.normal(0, 1, (max(h // 24, 2), max(w // 24, 2))).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return out + 0.08 * noise


def _truth(spec: SyntheticSpec) -> tuple[SyntheticTruth, np.ndarray, np.ndarray, np.ndarray]:
    """Fields on the truth grid: tissue field, tumour field, pen label image."""
    import cv2

    rng = np.random.default_rng(spec.seed)
    d = spec.truth_downsample
    shape = (math.ceil(spec.height / d), math.ceil(spec.width / d))
    tissue_f = _smooth_field(rng, shape, spec.n_tissue, spec.tissue_scale) - 0.5
    tumour_f = np.full(shape, -1.0, np.float32)
    share = getattr(spec, "tumour_share", None)  # set by wsi_mil.synthetic.cohorts.HardSpec
    if spec.tumour and share is not None:
        from wsi_mil.synthetic.cohorts import tumour_field

        tumour_f = tumour_field(rng, tissue_f, share, getattr(spec, "tumour_foci", 1))
    elif spec.tumour:
        inside = np.argwhere(tissue_f > 0.15)
        if len(inside):
            raw = np.zeros(shape, np.float32)
            yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
            radius = math.sqrt(spec.tumour_fraction * (tissue_f > 0).sum() / np.pi / 2)
            for _ in range(2):
                cy, cx = inside[rng.integers(len(inside))]
                raw = np.maximum(raw, np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2)))
            tumour_f = np.minimum(raw - 0.45, tissue_f)
    pen = np.zeros(shape, np.uint8)
    for i, colour in enumerate(spec.pen, start=1):
        pts = np.stack([rng.uniform(0.05, 0.95, 3) * shape[1], rng.uniform(0.05, 0.95, 3) * shape[0]], 1)
        thick = max(2, int(round(120 / d)))  # strokes ~120 level-0 px wide
        cv2.polylines(pen, [pts.astype(np.int32)], False, i, thick)
        del colour
    ink = pen > 0
    truth = SyntheticTruth(
        tissue=(tissue_f > 0) & ~ink,
        tumour=(tumour_f > 0) & ~ink,
        pen=ink,
        downsample=d,
        spec=asdict(spec),
    )
    return truth, tissue_f, tumour_f, pen


def _render_tile(
    spec: SyntheticSpec,
    fields: tuple[np.ndarray, ...],
    ds: float,
    x0: int,
    y0: int,
    w: int,
    h: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """RGB tile (h, w, 3) of the level with downsample ``ds`` at level pixel (x0, y0)."""
    import cv2

    tissue_f, tumour_f, pen = fields[:3]
    d = spec.truth_downsample
    # Truth-grid coordinates of each pixel centre of this tile.
    gx = ((np.arange(w, dtype=np.float32) + x0 + 0.5) * ds / d - 0.5)[None, :].repeat(h, 0)
    gy = ((np.arange(h, dtype=np.float32) + y0 + 0.5) * ds / d - 0.5)[:, None].repeat(w, 1)
    tis = cv2.remap(tissue_f, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    tum = cv2.remap(tumour_f, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    ink = cv2.remap(pen, gx, gy, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    um = ds * (spec.mpp or 0.5)  # µm per pixel of this level
    # Nuclei: value noise at the nucleus scale (~7 µm), thresholded by local density.
    cell = 7.0 / um
    if cell >= 1.5:
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        noise = cv2.resize(rng.random((gh, gw), dtype=np.float32), (int(gw * cell), int(gh * cell)),
                           interpolation=cv2.INTER_CUBIC)[:h, :w]
        tumour_px = tum > 0
        nuclei = np.where(tumour_px, noise > 0.45, noise > 0.72).astype(np.float32)
        nuclei = cv2.GaussianBlur(nuclei, (0, 0), max(0.6, cell / 8))
    else:  # nuclei smaller than a pixel: their mean coverage
        nuclei = np.where(tum > 0, 0.55, 0.22).astype(np.float32)
        nuclei += rng.normal(0, 0.03, (h, w)).astype(np.float32)
    lym = None
    if len(fields) > 3:  # lymphoid aggregates (wsi_mil.synthetic.cohorts): small dark nuclei
        from wsi_mil.synthetic.cohorts import lymphoid_nuclei

        lym = cv2.remap(fields[3], gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) > 0
        nuclei = np.where(lym, lymphoid_nuclei(rng, h, w, um), nuclei)
    nuclei = np.clip(nuclei, 0, 1)[..., None]
    stroma = EOSIN + rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    hema = HEMATOXYLIN if lym is None else np.where(lym[..., None], HEMATOXYLIN * 0.8, HEMATOXYLIN)
    tissue_rgb = stroma * (1 - nuclei) + hema * nuclei
    alpha = np.clip(tis * 40 + 0.5, 0, 1)[..., None]  # soft edge about one truth cell wide
    bg = BACKGROUND + rng.normal(0, 2, (h, w, 1)).astype(np.float32)
    rgb = bg * (1 - alpha) + tissue_rgb * alpha
    for i, colour in enumerate(spec.pen, start=1):
        rgb[ink == i] = PEN_COLOURS[colour]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _levels(spec: SyntheticSpec) -> list[int]:
    """The spec's downsamples, else 1, 4, 16, ... until the level fits in ~1,500 px."""
    if spec.levels is not None:
        return [int(d) for d in spec.levels]
    out = [1]
    while max(spec.width, spec.height) / out[-1] > 1500:
        out.append(out[-1] * 4)
    return out


def draw_truth(spec: SyntheticSpec) -> SyntheticTruth:
    """The ground truth :func:`write_synthetic_slide` would write for ``spec``, without the slide.

    Examples
    --------
    >>> truth = draw_truth(SyntheticSpec(width=1024, height=768, tumour=True))
    >>> bool(truth.tumour.any()), bool((truth.tumour & ~truth.tissue).any())
    (True, False)
    """
    truth, tissue_f, tumour_f, _ = _truth(spec)
    art = artefact_masks(spec, tissue_f)
    if art is not None:
        truth.blur, truth.fold = art.blur, art.fold
    if getattr(spec, "lymphoid", 0):
        from wsi_mil.synthetic.cohorts import lymphoid_field

        truth.lymphoid = (lymphoid_field(spec, tissue_f, tumour_f) > 0) & ~truth.pen
    return truth


def write_synthetic_slide(path: str | Path, spec: SyntheticSpec | None = None) -> SyntheticTruth:
    """Write a synthetic slide and its ground truth (``<stem>.truth.npz`` beside it).

    Parameters
    ----------
    path : path-like
        Destination ``.tif``; written atomically.
    spec : SyntheticSpec, optional
        What to draw; defaults to a 8,192 × 6,144 slide at 0.5 µm/px.

    Returns
    -------
    SyntheticTruth
        Tissue, tumour and pen masks on the truth grid.

    Examples
    --------
    >>> truth = write_synthetic_slide("s.tif", SyntheticSpec(tumour=True))  # doctest: +SKIP
    """
    import tifffile

    spec = spec or SyntheticSpec()
    path = Path(path)
    truth, tissue_f, tumour_f, pen = _truth(spec)
    fields: tuple[np.ndarray, ...] = (tissue_f, tumour_f, pen)
    if getattr(spec, "lymphoid", 0):  # set by wsi_mil.synthetic.cohorts.HardSpec
        from wsi_mil.synthetic.cohorts import lymphoid_field

        lymph_f = lymphoid_field(spec, tissue_f, tumour_f)
        truth.lymphoid = (lymph_f > 0) & ~truth.pen
        fields = (*fields, lymph_f)
    art = artefact_masks(spec, tissue_f)
    if art is not None:
        truth.blur, truth.fold = art.blur, art.fold
    t = spec.tile
    d = spec.truth_downsample
    # Truth cells where a tile can show anything but glass (soft edge and ink included).
    active = (tissue_f > -0.05) | (pen > 0)
    glass = np.full((t, t, 3), np.round(BACKGROUND), np.uint8)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for li, ds in enumerate(_levels(spec)):
            lw, lh = math.ceil(spec.width / ds), math.ceil(spec.height / ds)

            def tiles(ds: int = ds, lw: int = lw, lh: int = lh) -> Iterator[np.ndarray]:
                for ty in range(0, lh, t):
                    for tx in range(0, lw, t):
                        w, h = min(t, lw - tx), min(t, lh - ty)
                        if spec.plain_background:
                            gx0, gy0 = max(int(tx * ds / d) - 1, 0), max(int(ty * ds / d) - 1, 0)
                            gx1, gy1 = math.ceil((tx + w) * ds / d) + 1, math.ceil((ty + h) * ds / d) + 1
                            if not active[gy0:gy1, gx0:gx1].any():
                                yield glass
                                continue
                        rng = np.random.default_rng((spec.seed, ds, tx, ty))
                        out = np.full((t, t, 3), 255, np.uint8)
                        out[:h, :w] = _render_tile(spec, fields, ds, tx, ty, w, h, rng)
                        if art is not None:
                            out[:h, :w] = apply_artefacts(
                                art, out[:h, :w], ds, tx, ty,
                                lambda *a: _render_tile(spec, fields, *a), (spec.seed, ds, tx, ty),
                            )
                        yield out

            kwargs = {}
            if spec.mpp is not None:
                res = 1e4 / (spec.mpp * ds)  # pixels per centimetre
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tif.write(
                tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(t, t), photometric="rgb",
                compression="jpeg", compressionargs={"level": spec.jpeg_quality},
                subfiletype=0 if li == 0 else 1, metadata=None, **kwargs,
            )
    save_truth(truth, truth_path(path))
    return truth


def truth_path(slide_path: str | Path) -> Path:
    """Where the ground truth of a synthetic slide is stored."""
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth.npz")


def save_truth(truth: SyntheticTruth, path: str | Path) -> None:
    """Store the ground truth as a compressed npz (atomically)."""
    import json

    extra = {k: m for k in ("blur", "fold", "lymphoid") if (m := getattr(truth, k)) is not None and m.any()}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, tissue=truth.tissue, tumour=truth.tumour, pen=truth.pen,
                            downsample=truth.downsample, spec=json.dumps(truth.spec), **extra)


def load_truth(slide_path: str | Path) -> SyntheticTruth:
    """Load the ground truth written beside a synthetic slide."""
    import json

    with np.load(truth_path(slide_path)) as z:
        return SyntheticTruth(tissue=z["tissue"], tumour=z["tumour"], pen=z["pen"],
                              downsample=int(z["downsample"]), spec=json.loads(str(z["spec"])),
                              blur=z.get("blur"), fold=z.get("fold"), lymphoid=z.get("lymphoid"))
