"""Benchmark stage 1 on a large synthetic slide: time per step and quality vs ground truth.

    .venv/bin/python pipelines/benchmarks/tiling.py [--width 30000 --height 20000 --repeats 5]

Settings match the CLAM reference run quoted in issue 2 (256-px patches at the slide's
native resolution, 0.5 µm/px). Prints a table and writes results/tiling.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.io.h5 import read_patches
from wsi_mil.io.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, load_truth, write_synthetic_slide
from wsi_mil.tiling.run import TileConfig, tile_slide

CLAM_SECONDS = {"segment": 0.98, "tile": 0.22, "total": 1.2}  # issue 2, this machine's kind


def quality(slide: Path, out: Path, slide_id: str, min_tissue: float) -> dict[str, float]:
    import json

    import cv2
    from shapely.geometry import shape

    truth = load_truth(slide)
    pf = read_patches(Layout(out).patches(slide_id))
    size, d = pf.patch_size_level0, truth.downsample
    frac = np.array([truth.fraction_in(int(x), int(y), size) for x, y in pf.coords])
    covered = np.zeros_like(truth.tissue)
    for x, y in pf.coords:
        covered[y // d : (y + size) // d, x // d : (x + size) // d] = True
    # IoU of the GeoJSON polygons rasterised on the truth grid.
    mask = np.zeros(truth.tissue.shape, np.uint8)
    for f in json.loads(Layout(out).mask(slide_id).read_text())["features"]:
        geom = shape(f["geometry"])
        for poly in getattr(geom, "geoms", [geom]):
            if poly.geom_type != "Polygon":
                continue
            cv2.fillPoly(
                mask, [np.round(np.asarray(poly.exterior.coords) / d - 0.5).astype(np.int32)], 1
            )
            for hole in poly.interiors:
                cv2.fillPoly(
                    mask, [np.round(np.asarray(hole.coords) / d - 0.5).astype(np.int32)], 0
                )
    m = mask.astype(bool)
    return {
        "patches": len(pf.coords),
        "mask_iou": float((m & truth.tissue).sum() / (m | truth.tissue).sum()),
        "kept_above_threshold": float((frac >= min_tissue).mean()),
        "tissue_covered": float((covered & truth.tissue).sum() / truth.tissue.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=30_000)
    ap.add_argument("--height", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench")
    args = ap.parse_args()

    slide = args.cache / f"bench_{args.width}x{args.height}.tif"
    if not slide.exists():
        t = time.perf_counter()
        print(f"writing {slide} ...", flush=True)
        write_synthetic_slide(
            slide,
            SyntheticSpec(
                width=args.width,
                height=args.height,
                mpp=0.5,
                n_tissue=4,
                tumour=True,
                pen=("green", "blue"),
                truth_downsample=32,
                seed=42,
            ),
        )
        print(f"  {time.perf_counter() - t:.1f} s", flush=True)

    rows, payload = (
        [],
        {
            "slide": {"width": args.width, "height": args.height, "mpp": 0.5},
            "settings": "256 px at 0.5 µm/px (native), defaults",
            "clam_reference_s": CLAM_SECONDS,
        },
    )
    for backend in ("openslide", "tiffslide"):
        cfg = TileConfig(backend=backend)
        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats + 1):  # first run warms the page cache and imports
                t0 = time.perf_counter()
                res = tile_slide(slide, tmp, cfg)
                runs.append({**res.timings, "total": time.perf_counter() - t0})
            q = quality(slide, Path(tmp), res.slide_id, cfg.min_tissue)
        runs = runs[1:]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        row = {
            "backend": backend,
            **{f"{k}_s": v for k, v in med.items()},
            **q,
            "vs_clam": CLAM_SECONDS["total"] / med["total"],
        }
        rows.append(row)
        payload[backend] = {"median_s": med, "runs": runs, "quality": q}
    print_table(
        rows,
        [
            "backend",
            "open_s",
            "segment_s",
            "tile_s",
            "write_s",
            "total_s",
            "vs_clam",
            "patches",
            "mask_iou",
            "kept_above_threshold",
            "tissue_covered",
        ],
    )
    print(
        f"CLAM create_patches_fp.py reference: {CLAM_SECONDS['total']} s; target ≤ {CLAM_SECONDS['total'] / 2} s"
    )
    print(f"wrote {save_json('tiling', payload)}")


if __name__ == "__main__":
    main()
