"""Benchmark ``wsi-mil run``: slides per hour end to end, and how the time splits across stages.

    .venv/bin/python pipelines/benchmarks/cohort.py [--slides 8 --width 4096 --height 3072]
        [--encoder texture] [--modes local,sequential] [--scheduler tcp://host:8786]

A synthetic cohort (tumour / normal alternating, cached) runs through tile → extract →
train → heatmap from an empty output folder, once per mode: ``local`` (the embedded Dask
LocalCluster: one worker process per core, one thread each), ``sequential`` (this process,
no Dask) and, with ``--scheduler``, an existing cluster. Per stage: the summed task time
(what the stage costs) and its wall span (tasks of different stages overlap on Dask).
Prints a table and writes results/cohort.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide


def make_cohort(folder: Path, n: int, width: int, height: int) -> Path:
    """``n`` synthetic slides and ``labels.csv`` in ``folder`` (reused when present)."""
    slides = folder / f"slides_{width}x{height}"
    slides.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label"]
    for i in range(n):
        tumour = i % 2 == 0
        sid = f"{'tum' if tumour else 'nor'}_{i:03d}"
        path = slides / f"{sid}.tif"
        if not path.exists():
            spec = SyntheticSpec(width=width, height=height, tumour=tumour, n_tissue=2 + i % 2, seed=500 + i)
            write_synthetic_slide(path, spec)
        rows.append(f"{sid},{'tumour' if tumour else 'normal'}")
    labels = folder / f"labels_{n}.csv"
    labels.write_text("\n".join(rows) + "\n")
    # Only the first n slides: a CSV of paths.
    listing = folder / f"slides_{n}_{width}x{height}.csv"
    listing.write_text("path\n" + "".join(f"{slides / (r.split(',')[0] + '.tif')}\n" for r in rows[1:]))
    return listing


def run_mode(mode: str, listing: Path, labels: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = out.parent / f"{out.name}.yaml"
    folds = 2 if args.slides < 10 else 5
    cfg_path.write_text(
        f"slides: {listing}\nlabels: {labels}\nout: {out}\n"
        "stages: [tile, extract, train, heatmap]\n"
        f"extract: {{encoder: {args.encoder}, weights: random}}\n"
        f"train: {{run_name: bench, cv: {{folds: {folds}, val_fraction: 0.4}}, optim: {{epochs: {args.epochs}}}}}\n"
        "heatmap: {gallery_k: 0}\n"
    )
    cfg = load_cohort_config(cfg_path)
    scheduler = {"local": None, "sequential": "sequential"}.get(mode, mode)
    t = time.perf_counter()
    summary = run_cohort(cfg, scheduler=scheduler, echo=lambda s: None, progress=False)
    wall = time.perf_counter() - t
    if not summary.ok:
        raise SystemExit(f"{mode}: failures {summary.failures}")
    stages = {
        name: {
            "task_s": round(r.task_seconds, 2),
            "wall_s": round(r.wall_seconds, 2),
            "share_of_task_time": 0.0,
            "patches": r.n_patches,
        }
        for name, r in summary.stages.items()
    }
    total_task = sum(s["task_s"] for s in stages.values()) or 1.0
    for s in stages.values():
        s["share_of_task_time"] = round(s["task_s"] / total_task, 3)
    return {
        "mode": mode,
        "slides": summary.n_slides,
        "wall_s": round(wall, 2),
        "slides_per_hour": round(summary.n_slides / wall * 3600, 1),
        "patches": stages["tile"]["patches"],
        "stages": stages,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--height", type=int, default=3072)
    ap.add_argument("--encoder", default="texture", help="texture (built in) or resnet50_trunc (random weights)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--modes", default="local,sequential", help="local, sequential, and/or a scheduler address")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench" / "cohort")
    args = ap.parse_args()

    t = time.perf_counter()
    listing = make_cohort(args.cache, args.slides, args.width, args.height)
    print(f"cohort: {args.slides} slides of {args.width}×{args.height} ({time.perf_counter() - t:.1f} s to make)")
    labels = args.cache / f"labels_{args.slides}.csv"
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        res = run_mode(mode, listing, labels, args.cache / f"out_{mode.replace('/', '_').replace(':', '_')}", args)
        results.append(res)
        print(
            f"{mode}: {res['slides']} slides, {res['patches']} patches in {res['wall_s']:.1f} s "
            f"= {res['slides_per_hour']:.0f} slides/hour"
        )
    rows = [{"mode": r["mode"], "stage": name, **s} for r in results for name, s in r["stages"].items()] + [
        {
            "mode": r["mode"],
            "stage": "END TO END",
            "wall_s": r["wall_s"],
            "task_s": "",
            "patches": r["patches"],
            "share_of_task_time": f"{r['slides_per_hour']:.0f} slides/h",
        }
        for r in results
    ]
    print_table(rows, ["mode", "stage", "task_s", "wall_s", "share_of_task_time", "patches"])
    path = save_json("cohort", {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results})
    print(f"→ {path}")


if __name__ == "__main__":
    main()
