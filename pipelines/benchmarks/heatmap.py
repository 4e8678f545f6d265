"""Benchmark stage-4 rendering: every heatmap output of a 100,000-patch slide from stored data.

    .venv/bin/python pipelines/benchmarks/heatmap.py [--patches 100000 --repeats 3]

The slide is synthetic and written at 4 µm/px (10,240² px) so that a 256-px patch at
0.5 µm/px is 32 level-0 pixels: the 100,000 patches span the same physical extent, and
give the same overlay sizes (TIFF base = 16 px per patch), GeoJSON and HDF5 as an
81,920²-px slide scanned at 0.5 µm/px, without writing a 6.7-gigapixel file. Each
scenario runs in a fresh process so its peak memory (max RSS) is its own. Prints a table
and writes results/heatmap.json.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.heatmaps import HeatmapOptions, render_heatmaps, write_heatmaps
from wsi_mil.io.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

SLIDE_PX, SLIDE_MPP, PATCH_L0 = 10_240, 4.0, 32  # 32 px at 4 µm/px = 256 px at 0.5 µm/px
CLAM_MINUTES = "45-60"  # CLAM issue #298, create_heatmaps.py per slide, as quoted in issue 5

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {"write": True, "stride": PATCH_L0, "options": {}},
    "default+zarr": {"write": True, "stride": PATCH_L0, "options": {"zarr": True}},
    "smooth+linear+zarr": {
        "write": True,
        "stride": PATCH_L0,
        "options": {"zarr": True, "smooth_um": 256.0, "interpolation": "linear"},
    },
    "overlap50+zarr": {"write": True, "stride": PATCH_L0 // 2, "options": {"zarr": True}},
    "re-render from h5": {"write": False, "stride": PATCH_L0, "options": {"zarr": True}},
}


def synthetic_scores(n: int, stride: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full grid of ``n`` patches with smooth attention and class probabilities."""
    side = math.ceil(math.sqrt(n))
    xs, ys = np.meshgrid(np.arange(side), np.arange(side))
    coords = (np.stack([xs.ravel(), ys.ravel()], 1)[:n] * stride).astype(np.int64)
    rng = np.random.default_rng(seed)
    c = coords / (side * stride)
    bump = np.exp(-((c[:, 0] - 0.4) ** 2 + (c[:, 1] - 0.6) ** 2) / 0.02)
    logits = 3 * bump + rng.normal(0, 0.3, n)
    attention = np.exp(logits) / np.exp(logits).sum()
    tumour = 1 / (1 + np.exp(-(6 * bump - 3 + rng.normal(0, 0.5, n))))
    return {
        "coords": coords,
        "attention": attention,
        "probs": np.stack([1 - tumour, tumour], 1).astype(np.float32),
    }


def run_scenario(name: str, out: str, slide: str, n: int) -> dict[str, Any]:
    """Time one scenario (in a fresh process); returns seconds per output and peak RSS."""
    from wsi_mil.io.h5 import read_heatmap_data

    spec = SCENARIOS[name]
    data = synthetic_scores(n, spec["stride"])
    options = HeatmapOptions(backend="tiffslide", **spec["options"])
    rss0 = _hwm_mb()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if spec["write"]:
        paths = write_heatmaps(
            out,
            name.replace(" ", "_"),
            Path(slide).stem,
            slide,
            data["coords"],
            PATCH_L0,
            data["attention"],
            data["probs"],
            ["normal", "tumour"],
            options,
            timings=timings,
        )
    else:
        t = time.perf_counter()
        stored = read_heatmap_data(Layout(out).heatmap_paths("default", Path(slide).stem)["h5"])
        timings["h5"] = time.perf_counter() - t
        paths = render_heatmaps(out, "rerender", stored, slide, options, timings=timings)
    total = time.perf_counter() - t0
    sizes = {k: _size(p) for k, p in paths.items()}
    rss = _hwm_mb()
    return {
        "total_s": total,
        "steps_s": timings,
        "sizes_mb": sizes,
        "peak_rss_mb": rss,
        "rss_before_mb": rss0,
    }


def _hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss, not inherited)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _size(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    return path.stat().st_size / 1e6


def main() -> None:
    """Run the benchmark and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        slide = work / "bench_heatmap.tif"
        t = time.perf_counter()
        write_synthetic_slide(
            slide,
            SyntheticSpec(
                width=SLIDE_PX, height=SLIDE_PX, mpp=SLIDE_MPP, n_tissue=4, tumour=True, seed=4
            ),
        )
        from wsi_mil.tiling.run import TileConfig, tile_slide

        tile_slide(slide, work, TileConfig(backend="tiffslide"))  # masks/<id>.geojson for clipping
        print(f"setup (slide + tissue mask, not timed below): {time.perf_counter() - t:.1f} s")

        rows, results = [], {}
        ctx = mp.get_context("spawn")
        for name in SCENARIOS:
            runs = []
            for _ in range(args.repeats):
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    runs.append(
                        pool.submit(
                            run_scenario, name, str(work), str(slide), args.patches
                        ).result()
                    )
            best = min(runs, key=lambda r: r["total_s"])
            results[name] = {
                "runs": runs,
                "median_total_s": statistics.median(r["total_s"] for r in runs),
            }
            row = {
                "scenario": name,
                "total_s": results[name]["median_total_s"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "start_rss_mb": min(r["rss_before_mb"] for r in runs),
            }
            row.update({k: v for k, v in best["steps_s"].items()})
            rows.append(row)
        cols = [
            "scenario",
            "total_s",
            "h5",
            "grid",
            "png",
            "gallery",
            "tiff",
            "zarr",
            "geojson",
            "start_rss_mb",
            "peak_rss_mb",
        ]
        print(
            f"\n{args.patches} patches, 256 px at 0.5 µm/px (extent of an 81,920² px slide), "
            f"median of {args.repeats}; steps from the fastest run"
        )
        print_table(rows, cols)
        path = save_json(
            "heatmap",
            {
                "patches": args.patches,
                "repeats": args.repeats,
                "slide": {"level0_px": SLIDE_PX, "mpp": SLIDE_MPP, "patch_size_level0": PATCH_L0},
                "default_options": asdict(HeatmapOptions()),
                "clam_reference_minutes": CLAM_MINUTES,
                "target_s": 30,
                "scenarios": results,
            },
        )
        print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
