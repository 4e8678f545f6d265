"""Harder synthetic cohorts: small tumours, lymphoid hard negatives, GeoJSON ground truth.

The demo's slides carry tumour over a quarter of the tissue; real metastases (CAMELYON16)
are often under 1%. A :class:`HardSpec` slide draws

* **tumour** covering exactly ``tumour_share`` of the tissue on the truth grid (one or
  more foci; the threshold of the tumour field is the quantile that leaves that share);
* **lymphoid aggregates** (``lymphoid`` of them, on tumour and normal slides): dense
  small, dark nuclei, which at thumbnail resolution have the nuclear coverage of tumour
  (a hard negative) and at 20× differ in nucleus size and darkness; always outside the
  tumour, at least ``lymphoid_margin_um`` away from it.

:func:`write_hard_cohort` writes a labelled cohort with each tumour slide's mask as a
QuPath GeoJSON annotation (``annotations/<id>.geojson``, class ``Tumor``; normal slides
have no file, the convention of ``wsi-mil evaluate``), and the hard negatives as
``hard_negatives/<id>.geojson`` (class ``Lymphoid``) for inspection.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.synthetic.slides import SyntheticSpec, SyntheticTruth, write_synthetic_slide


@dataclass(frozen=True)
class HardSpec(SyntheticSpec):
    """A :class:`SyntheticSpec` with a tumour share and lymphoid hard negatives.

    Parameters
    ----------
    tumour_share : float
        Share of the tissue (truth-grid cells) that is tumour, used when ``tumour``.
    tumour_foci : int
        Number of tumour foci.
    lymphoid : int
        Number of lymphoid aggregates (0 draws none).
    lymphoid_um : float
        Mean radius of an aggregate in µm.
    lymphoid_margin_um : float
        Least distance between an aggregate and the tumour, in µm.
    """

    tumour_share: float = 0.01
    tumour_foci: int = 1
    lymphoid: int = 4
    lymphoid_um: float = 100.0
    lymphoid_margin_um: float = 100.0


def tumour_field(rng: np.random.Generator, tissue_f: np.ndarray, share: float, foci: int = 1) -> np.ndarray:
    """Tumour field on the truth grid, positive on exactly ``share`` of the tissue cells.

    Parameters
    ----------
    rng : numpy.random.Generator
        The slide's generator.
    tissue_f : ndarray
        (h, w) tissue field (tissue where > 0).
    share : float
        Wanted tumour share of the tissue, in (0, 1).
    foci : int
        Number of foci (Gaussian bumps of random height inside the tissue).

    Returns
    -------
    ndarray
        (h, w) float32 field; tumour where > 0, never outside the tissue.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"tumour_share must be in (0, 1), got {share}")
    tissue = tissue_f > 0
    inside = np.argwhere(tissue_f > 0.15)
    if not len(inside) or not tissue.any():
        return np.full(tissue_f.shape, -1.0, np.float32)
    yy, xx = np.mgrid[0 : tissue_f.shape[0], 0 : tissue_f.shape[1]].astype(np.float32)
    radius = 1.5 * math.sqrt(share * tissue.sum() / np.pi / max(foci, 1)) + 1.0
    raw = np.zeros(tissue_f.shape, np.float32)
    for _ in range(max(foci, 1)):
        cy, cx = inside[rng.integers(len(inside))]
        height = rng.uniform(0.8, 1.0)
        raw = np.maximum(raw, height * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2)))
    raw += 1e-3 * rng.random(raw.shape, dtype=np.float32)  # no ties at the threshold
    vals = np.sort(raw[tissue])[::-1]
    k = max(int(round(share * len(vals))), 1)
    thr = 0.5 * (vals[k - 1] + vals[k]) if k < len(vals) else vals[-1] - 1e-6
    return np.minimum(raw - thr, tissue_f).astype(np.float32)


def lymphoid_field(spec: HardSpec, tissue_f: np.ndarray, tumour_f: np.ndarray) -> np.ndarray:
    """Lymphoid-aggregate field on the truth grid (aggregate where > 0), outside the tumour.

    Drawn from its own generator ``(seed, 0x1F)``, so tissue and tumour are unchanged.
    """
    import cv2

    rng = np.random.default_rng((spec.seed, 0x1F))
    cell_um = spec.truth_downsample * (spec.mpp or 0.5)
    margin = spec.lymphoid_margin_um / cell_um
    tumour = (tumour_f > 0).astype(np.uint8)
    dist = cv2.distanceTransform(1 - tumour, cv2.DIST_L2, 5) if tumour.any() else np.full(
        tissue_f.shape, np.inf, np.float32
    )
    out = np.full(tissue_f.shape, -1.0, np.float32)
    yy, xx = np.mgrid[0 : tissue_f.shape[0], 0 : tissue_f.shape[1]].astype(np.float32)
    for _ in range(spec.lymphoid):
        r = spec.lymphoid_um / cell_um * rng.uniform(0.7, 1.3)
        ok = np.argwhere((tissue_f > 0.1) & (dist > margin + 0.5 * r))
        if not len(ok):
            break
        cy, cx = ok[rng.integers(len(ok))]
        out = np.maximum(out, 1.0 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r)
    out = np.minimum(out, tissue_f)
    out[dist <= margin] = -1.0
    return out.astype(np.float32)


def lymphoid_nuclei(rng: np.random.Generator, h: int, w: int, um: float) -> np.ndarray:
    """Nuclear coverage (h, w) in a lymphoid aggregate at ``um`` µm/px: small (~4 µm), dense."""
    import cv2

    cell = 4.0 / um
    if cell >= 1.5:
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        noise = cv2.resize(rng.random((gh, gw), dtype=np.float32), (int(gw * cell), int(gh * cell)),
                           interpolation=cv2.INTER_CUBIC)[:h, :w]
        return cv2.GaussianBlur((noise > 0.42).astype(np.float32), (0, 0), max(0.5, cell / 8))
    return (0.58 + rng.normal(0, 0.03, (h, w))).astype(np.float32)


def mask_feature_collection(mask: np.ndarray, downsample: int, name: str) -> dict[str, Any]:
    """A truth-grid mask as QuPath GeoJSON polygons (level-0 pixels, holes kept, exact cells)."""
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    boxes = []
    for y in np.flatnonzero(mask.any(1)):
        row = np.concatenate([[0], mask[y].astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(row))
        for x0, x1 in zip(edges[::2], edges[1::2], strict=True):
            boxes.append(box(x0 * downsample, y * downsample, x1 * downsample, (y + 1) * downsample))
    geom = unary_union(boxes) if boxes else None
    features = []
    for poly in [] if geom is None else getattr(geom, "geoms", [geom]):
        features.append({
            "type": "Feature",
            "geometry": mapping(poly),
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        })
    return {"type": "FeatureCollection", "features": features}


def _write_one(job: tuple[str, HardSpec, str, str]) -> dict[str, Any]:
    from wsi_mil.io.geojson import write_geojson

    slide, spec, ann_dir, neg_dir = job
    truth: SyntheticTruth = write_synthetic_slide(slide, spec)
    sid = Path(slide).stem
    if truth.tumour.any():
        write_geojson(Path(ann_dir) / f"{sid}.geojson",
                      mask_feature_collection(truth.tumour, truth.downsample, "Tumor"))
    if truth.lymphoid.any():
        write_geojson(Path(neg_dir) / f"{sid}.geojson",
                      mask_feature_collection(truth.lymphoid, truth.downsample, "Lymphoid"))
    tissue = max(int(truth.tissue.sum()), 1)
    return {"slide_id": sid, "tumour_share": float(truth.tumour.sum() / tissue),
            "lymphoid_share": float(truth.lymphoid.sum() / tissue)}


def write_hard_cohort(
    out: str | Path,
    n_slides: int = 64,
    *,
    seed: int = 0,
    width: int = 8192,
    height: int = 6144,
    share_range: tuple[float, float] = (0.005, 0.03),
    lymphoid_range: tuple[int, int] = (2, 6),
    workers: int = 1,
) -> Path:
    """Write a cohort of :class:`HardSpec` slides, half with tumour, and its ground truth.

    Parameters
    ----------
    out : path-like
        Cohort folder; gets ``slides/<id>.tif`` (+ ``.truth.npz``), ``annotations/`` (tumour
        GeoJSON, tumour slides only), ``hard_negatives/`` (lymphoid GeoJSON),
        ``labels.csv`` (``case_id,slide_id,label`` with labels ``normal``/``tumor``) and
        ``cohort.json`` (every slide's spec and measured shares).
    n_slides : int
        Number of slides (tumour on every second one).
    seed : int
        Cohort seed; slide i uses ``seed * 10_000 + i``. The same arguments write the
        same cohort.
    width, height : int
        Level-0 size of each slide (0.5 µm/px).
    share_range : (float, float)
        Tumour share of the tissue drawn uniformly from this range.
    lymphoid_range : (int, int)
        Number of lymphoid aggregates per slide, drawn uniformly (inclusive).
    workers : int
        Slides written in parallel processes.

    Returns
    -------
    Path
        The ``labels.csv`` written.

    Examples
    --------
    >>> write_hard_cohort("hard", n_slides=64, workers=2)  # doctest: +SKIP
    """
    from concurrent.futures import ProcessPoolExecutor

    from wsi_mil.io.atomic import write_text_atomic

    out = Path(out)
    dirs = {k: out / k for k in ("slides", "annotations", "hard_negatives")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jobs, rows = [], []
    for i in range(n_slides):
        tumour = i % 2 == 1
        share = float(rng.uniform(*share_range))
        foci = 1 if share < 0.015 else int(rng.integers(1, 3))  # small tumours stay one lesion
        spec = HardSpec(
            width=width, height=height, tumour=tumour, seed=seed * 10_000 + i,
            tumour_share=share, tumour_foci=foci,
            lymphoid=int(rng.integers(lymphoid_range[0], lymphoid_range[1] + 1)),
            n_tissue=int(rng.integers(2, 4)), plain_background=True,
        )
        sid = f"hard_{i:03d}"
        jobs.append((str(dirs["slides"] / f"{sid}.tif"), spec, str(dirs["annotations"]),
                     str(dirs["hard_negatives"])))
        rows.append({"case_id": f"case_{i:03d}", "slide_id": sid, "label": "tumor" if tumour else "normal"})
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            measured = list(pool.map(_write_one, jobs))
    else:
        measured = [_write_one(j) for j in jobs]
    labels = out / "labels.csv"
    write_text_atomic(labels, "case_id,slide_id,label\n"
                      + "".join(f"{r['case_id']},{r['slide_id']},{r['label']}\n" for r in rows))
    from dataclasses import asdict

    manifest = [{**r, **m, "spec": asdict(j[1])} for r, m, j in zip(rows, measured, jobs, strict=True)]
    write_text_atomic(out / "cohort.json", json.dumps({"seed": seed, "slides": manifest}, indent=1))
    return labels
