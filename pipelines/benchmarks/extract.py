"""Benchmark stage 2: patches/s for reading only, model only and end to end; gaps between
slides; several encoders from one read against separate runs.

    .venv/bin/python pipelines/benchmarks/extract.py [--e2e-patches 640]
    .venv/bin/python pipelines/benchmarks/extract.py --sections gap,multi --json extract_throughput

``resnet50_trunc`` with random weights, batch 64, exact fp32 on CPU (or the GPU's mixed
precision with ``--device cuda``). Reading is timed per patch and with supertiles of
several sizes, in one process and through the DataLoader workers; the model in NCHW,
channels-last, and channels-last with conv–BN folding (optionally ``torch.compile``);
end to end is :func:`wsi_mil.features.extract.extract_slide` on the same slide. Model-only
runs are timed right before and after each end-to-end run, so a shared machine's load
affects both alike. ``gap``: a cohort of ``--cohort-slides`` slides through the cohort loop
with and without starting the next slide's readers early, each slide's gap (model idle
from the previous slide's last batch to this one's first) and wait on the readers.
``multi``: ``--multi`` encoders in one run (one read) against one run per encoder, with
the bags checked equal. Prints a table and writes results/<--json>.json.
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

from wsi_mil.features.cohort import extract_cohort, make_runner
from wsi_mil.features.extract import ExtractConfig, extract_slide
from wsi_mil.features.lookahead import Extractor
from wsi_mil.features.reader import PatchStream, ReadPlan, make_groups, make_loader
from wsi_mil.features.registry import create_encoder
from wsi_mil.features.runtime import Runner
from wsi_mil.io import h5
from wsi_mil.io.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.tiling.run import TileConfig, tile_slide

SECTIONS = ("read", "model", "e2e", "gap", "multi")
CLAM = {"end_to_end": 6.6, "model_nchw": 8.7, "model_channels_last": 12.7}  # issue 3, this machine


def make_slide(folder: Path, width: int, height: int) -> tuple[Path, Path]:
    """A large synthetic slide and its patch file (cached in ``folder``)."""
    slide = folder / f"bench_{width}x{height}.tif"
    if not slide.exists():
        write_synthetic_slide(slide, SyntheticSpec(width=width, height=height, n_tissue=3, tumour=True, seed=7))
    out = folder / "out"
    pfile = Layout(out).patches(slide.stem)
    if not pfile.exists():
        tile_slide(slide, out, TileConfig())
    return slide, pfile


def subset(pfile: Path, n: int, dst: Path) -> Path:
    """A patch file holding the first ``n`` patches (coords order) of ``pfile``."""
    pf = h5.read_patches(pfile)
    h5.write_patches(dst, pf.coords[:n], pf.attrs)
    return dst


def time_reading(pfile: Path, supertile: int, workers: int, backend: str, limit: int) -> float:
    pf = h5.read_patches(pfile)
    coords = pf.coords[:limit]
    from wsi_mil.slide import open_slide

    with open_slide(pf.attrs["slide_path"], backend=backend) as s:
        ds = s.level_downsamples
    plan = ReadPlan(pf.attrs["slide_path"], backend, None, 0, float(ds[0]), pf.patch_size_level0, 224)
    stream = PatchStream(plan, coords, make_groups(coords, pf.patch_size_level0, supertile), 64)
    t0 = time.perf_counter()
    n = sum(len(rows) for _, rows, _ in make_loader(stream, workers, pin_memory=False))
    return n / (time.perf_counter() - t0)


def time_model(runner: Runner, n_batches: int, batch: int) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=g)
    runner(x if runner.compiled else x[:8])  # warm-up (oneDNN primitives; compilation)
    if runner.device.type == "cuda":
        runner(x)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        runner(x)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=27648)
    ap.add_argument("--height", type=int, default=18432)
    ap.add_argument("--e2e-patches", type=int, default=0, help="patches for end to end (0 = whole slide)")
    ap.add_argument("--model-batches", type=int, default=6, help="batches per model-only timing")
    ap.add_argument("--read-patches", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--json", default="extract", help="results/<name>.json")
    ap.add_argument("--cohort-slides", type=int, default=4, help="slides of the gap and multi runs")
    ap.add_argument("--cohort-size", default="8192x6144", help="WIDTHxHEIGHT of each of those slides")
    ap.add_argument("--cohort-patches", type=int, default=128, help="patches kept per slide (0 = all)")
    ap.add_argument("--gap-encoder", default="resnet50_trunc")
    ap.add_argument("--multi", default="texture,resnet50_trunc", help="encoders of the one-read run")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench_extract")
    args = ap.parse_args()
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if sections - set(SECTIONS):
        ap.error(f"--sections: unknown {', '.join(sorted(sections - set(SECTIONS)))}")

    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sections {', '.join(sorted(sections))}")
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    slide, n_all = Path(f"bench_{args.width}x{args.height}.tif"), 0
    if sections & {"read", "model", "e2e"}:
        t = time.perf_counter()
        slide, pfile = make_slide(args.cache, args.width, args.height)
        n_all = len(h5.read_patches(pfile).coords)
        print(
            f"slide {slide.name}: {n_all} patches of 256 px at 0.5 µm/px (prepared in {time.perf_counter() - t:.0f} s)"
        )
        report.update(slide_sections(args, sections, rows, slide, pfile, n_all))
    if "gap" in sections or "multi" in sections:
        report.update(cohort_sections(args, sections, rows))
    print()
    print_table(rows, ["stage", "variant", "patches_per_s", "vs_model_only", "patches", "seconds", "gap_s"])
    path = save_json(
        args.json,
        {
            "slide": {"name": slide.name, "width": args.width, "height": args.height, "patches": n_all},
            "settings": {
                "encoder": "resnet50_trunc",
                "weights": "random",
                "batch_size": args.batch_size,
                "workers": args.workers,
                "device": args.device,
                "read_patches": args.read_patches,
                "model_batches": args.model_batches,
                "e2e_patches": args.e2e_patches or n_all,
                "torch_threads": torch.get_num_threads(),
                "sections": sorted(sections),
                "cohort": {
                    "slides": args.cohort_slides,
                    "size": args.cohort_size,
                    "patches_per_slide": args.cohort_patches,
                    "gap_encoder": args.gap_encoder,
                    "multi": args.multi,
                },
            },
            "rows": rows,
            **report,
            "clam_reference": CLAM,
        },
    )
    print(f"saved {path}")


def slide_sections(
    args: argparse.Namespace, sections: set[str], rows: list[dict[str, Any]], slide: Path, pfile: Path, n_all: int
) -> dict[str, Any]:
    """Reading only, model only, end to end on the one large slide."""
    if "read" not in sections:
        return _model_and_e2e(args, sections, rows, slide, n_all, pfile)
    # -- reading only ------------------------------------------------------------------
    for backend in ("openslide", "tiffslide"):
        for supertile in (1, 2, 4, 8):
            for workers in (0, args.workers):
                pps = time_reading(pfile, supertile, workers, backend, args.read_patches)
                rows.append(
                    {
                        "stage": "read",
                        "variant": f"{backend} supertile={supertile} workers={workers}",
                        "patches_per_s": pps,
                    }
                )
                print_row(rows[-1])
    return _model_and_e2e(args, sections, rows, slide, n_all, pfile)


def _model_and_e2e(
    args: argparse.Namespace, sections: set[str], rows: list[dict[str, Any]], slide: Path, n_all: int, pfile: Path
) -> dict[str, Any]:
    if not sections & {"model", "e2e"}:
        return {}
    # -- model only --------------------------------------------------------------------
    forms = {
        "nchw": {"fold_bn": False, "channels_last": False},
        "channels_last": {"fold_bn": False, "channels_last": True},
        "channels_last+fold_bn": {"fold_bn": True, "channels_last": True},
    }
    if args.compile:
        forms["channels_last+fold_bn+compile"] = {
            "fold_bn": True,
            "channels_last": True,
            "compile": True,
        }
    precision = "auto"
    model_pps: dict[str, float] = {}
    for label, kw in forms.items():
        enc = create_encoder("resnet50_trunc", weights="random")
        runner = Runner(enc, args.device, precision, **kw)
        model_pps[label] = time_model(runner, args.model_batches, args.batch_size)
        rows.append(
            {
                "stage": "model",
                "variant": f"{label} {runner.precision}",
                "patches_per_s": model_pps[label],
            }
        )
        print_row(rows[-1])
    best = max(model_pps, key=model_pps.__getitem__)
    eager = max((k for k in model_pps if "compile" not in k), key=model_pps.__getitem__)
    if "e2e" not in sections:
        return {"model_only": model_pps, "best_model_form": best}

    # -- end to end, each bracketed by model-only timings of the same form --------------
    n_e2e = args.e2e_patches or n_all
    pf_e2e = subset(pfile, n_e2e, Layout(args.cache / "e2e").patches("e2e"))
    e2e: dict[str, Any] = {}
    runs = [(eager, 4), (eager, 1)] + ([(best, 4)] if best != eager else [])
    for form, supertile in runs:
        kw = forms[form]
        cfg = ExtractConfig(
            encoder="resnet50_trunc",
            weights="random",
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            supertile=supertile,
            fold_bn=kw["fold_bn"],
            channels_last=kw["channels_last"],
            compile=kw.get("compile", False),
        )
        runner = Runner(
            create_encoder("resnet50_trunc", weights="random"),
            cfg.device,
            cfg.precision,
            cfg.fold_bn,
            cfg.channels_last,
            cfg.compile,
        )
        t0 = time.perf_counter()
        before = time_model(runner, args.model_batches, args.batch_size)  # includes warm-up
        warm = time.perf_counter() - t0 - args.model_batches * args.batch_size / before
        t0 = time.perf_counter()
        res = extract_slide(pf_e2e, args.cache / "e2e" / f"bag_s{supertile}.h5", runner, cfg, slide_path=slide)
        secs = time.perf_counter() - t0
        after = time_model(runner, args.model_batches, args.batch_size)
        model_ref = (before + after) / 2
        pps = res.n_patches / secs
        e2e[f"{form} supertile={supertile}"] = {
            "patches": res.n_patches,
            "seconds": secs,
            "patches_per_s": pps,
            "warm_up_seconds": warm,
            "model_only_before": before,
            "model_only_after": after,
            "ratio_to_model_only": pps / model_ref,
        }
        rows.append(
            {
                "stage": "end_to_end",
                "variant": f"{form} supertile={supertile} workers={cfg.workers}",
                "patches_per_s": pps,
                "vs_model_only": pps / model_ref,
                "seconds": secs,
                "patches": res.n_patches,
            }
        )
        print_row(rows[-1])
        if cfg.compile:
            print(f"    (compilation before the run: {warm:.0f} s, not counted above)")

    best_e2e = max(v["patches_per_s"] for v in e2e.values())
    print(
        f"\nend to end {best_e2e:.2f} patches/s = {best_e2e / CLAM['end_to_end']:.2f}× CLAM's "
        f"{CLAM['end_to_end']} (issue 3); target: ≥ 90% of model-only in the same run"
    )
    return {"model_only": model_pps, "best_model_form": best, "end_to_end": e2e}


def make_cohort(folder: Path, n: int, size: str, keep: int) -> Path:
    """OUT with ``n`` tiled synthetic slides of ``size`` (cached), ``keep`` patches each."""
    w, h = (int(v) for v in size.lower().split("x"))
    src = folder / f"cohort_{n}x{w}x{h}"
    slides = src / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = slides / f"c{i}.tif"
        if not path.exists():
            write_synthetic_slide(path, SyntheticSpec(width=w, height=h, n_tissue=2, tumour=True, seed=100 + i))
    for i in range(n):
        pfile = Layout(src / "out").patches(f"c{i}")
        if not pfile.exists():
            tile_slide(slides / f"c{i}.tif", src / "out", TileConfig())
    kept = src / f"kept_{keep}"
    for i in range(n):
        dst = Layout(kept).patches(f"c{i}")
        if not dst.exists():
            pf = h5.read_patches(Layout(src / "out").patches(f"c{i}"))
            h5.write_patches(dst, pf.coords[:keep] if keep else pf.coords, pf.attrs)
    return kept


def fresh(cohort: Path, dst: Path) -> Path:
    """A copy of ``cohort``'s patch files only (no bags, no status)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cohort / "patches", dst / "patches")
    return dst


def cohort_sections(args: argparse.Namespace, sections: set[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Gaps between slides with and without lookahead; several encoders from one read."""
    import numpy as np
    import torch

    cohort = make_cohort(args.cache, args.cohort_slides, args.cohort_size, args.cohort_patches)
    ids = sorted(p.stem for p in (cohort / "patches").glob("*.h5"))
    n = sum(len(h5.read_patches(cohort / "patches" / f"{s}.h5").coords) for s in ids)
    print(f"cohort: {len(ids)} slides of {args.cohort_size}, {n} patches in all")
    base = {"batch_size": args.batch_size, "workers": args.workers, "device": args.device}
    out: dict[str, Any] = {}
    if "gap" in sections:
        cfg = ExtractConfig(encoder=args.gap_encoder, weights="random", **base)
        runners = [make_runner(cfg, args.gap_encoder)]
        runners[0](torch.zeros((8, 224, 224, 3), dtype=torch.uint8))  # warm-up, outside the timings
        gaps: dict[str, Any] = {}
        for ahead in (False, True):
            results: list[Any] = []
            t0 = time.perf_counter()
            ex = Extractor(fresh(cohort, args.cache / "gap_run"), runners, cfg, lookahead=ahead)
            ex.run(ids, lambda o, acc=results: acc.append(o.result))
            secs = time.perf_counter() - t0
            label = "lookahead" if ahead else "no lookahead"
            per = [{"slide": r.slide_id, "gap_s": r.gap_s, "wait_s": r.wait_s, "seconds": r.seconds} for r in results]
            later = [p["gap_s"] for p in per[1:]]  # the first slide's gap is the run's start-up
            gaps[label] = {"slides": per, "max_gap_after_first_s": max(later, default=0.0), "seconds": secs}
            for p in per:
                rows.append({"stage": "gap", "variant": f"{label} {p['slide']}", "gap_s": p["gap_s"],
                             "seconds": p["seconds"]})  # fmt: skip
                print_row(rows[-1])
            print(f"  {label}: largest gap after the first slide {gaps[label]['max_gap_after_first_s']:.3f} s "
                  f"(target ≤ 1 s); {secs:.1f} s for the cohort")  # fmt: skip
        out["gaps"] = gaps
    if "multi" in sections:
        encs = [e.strip() for e in args.multi.split(",")]
        timing: dict[str, Any] = {}
        t0 = time.perf_counter()
        joint = fresh(cohort, args.cache / "multi_joint")
        extract_cohort(joint, args.multi, weights="random", overrides=base, progress=False)
        timing["one read, all encoders"] = time.perf_counter() - t0
        apart = fresh(cohort, args.cache / "multi_apart")
        for enc in encs:
            t0 = time.perf_counter()
            extract_cohort(apart, enc, weights="random", overrides=base, progress=False)
            timing[f"separate run: {enc}"] = time.perf_counter() - t0
        separate = sum(v for k, v in timing.items() if k.startswith("separate"))
        equal = all(
            np.array_equal(h5.read_bag(Layout(joint).bag(e, s)).features, h5.read_bag(Layout(apart).bag(e, s)).features)
            for e in encs
            for s in ids
        )
        for k, v in timing.items():
            rows.append({"stage": "multi", "variant": k, "seconds": v, "patches": n, "patches_per_s": n / v})
            print_row(rows[-1])
        print(f"  one read for {len(encs)} encoders: {timing['one read, all encoders']:.1f} s against "
              f"{separate:.1f} s in separate runs ({separate / timing['one read, all encoders']:.2f}×); "
              f"bags bitwise equal: {equal}")  # fmt: skip
        out["multi"] = {"encoders": encs, "seconds": timing, "separate_total_s": separate, "bags_equal": equal}
    return out


def print_row(r: dict[str, Any]) -> None:
    extra = f"  ({r['vs_model_only']:.1%} of model only)" if "vs_model_only" in r else ""
    if "gap_s" in r:
        figure = f"gap {r['gap_s']:7.3f} s, slide {r['seconds']:.1f} s"
    else:
        figure = f"{r['patches_per_s']:8.2f} patches/s"
    print(f"  {r['stage']:<10} {r['variant']:<48} {figure}{extra}", flush=True)


if __name__ == "__main__":
    main()
