"""Benchmark stage 2: patches/s for reading only, model only and end to end.

    .venv/bin/python pipelines/benchmarks/extract.py [--patches 2000] [--e2e-patches 640]

``resnet50_trunc`` with random weights, batch 64, exact fp32 on CPU (or the GPU's mixed
precision with ``--device cuda``). Reading is timed per patch and with supertiles of
several sizes, in one process and through the DataLoader workers; the model in NCHW,
channels-last, and channels-last with conv–BN folding (optionally ``torch.compile``);
end to end is :func:`wsi_mil.features.extract.extract_slide` on the same slide. Model-only
runs are timed right before and after each end-to-end run, so a shared machine's load
affects both alike. Prints a table and writes results/extract.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.features.extract import ExtractConfig, extract_slide
from wsi_mil.features.reader import PatchStream, ReadPlan, make_groups, make_loader
from wsi_mil.features.registry import create_encoder
from wsi_mil.features.runtime import Runner
from wsi_mil.io import h5
from wsi_mil.io.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.tiling.run import TileConfig, tile_slide

CLAM = {"end_to_end": 6.6, "model_nchw": 8.7, "model_channels_last": 12.7}  # issue 3, this machine


def make_slide(folder: Path, width: int, height: int) -> tuple[Path, Path]:
    """A large synthetic slide and its patch file (cached in ``folder``)."""
    slide = folder / f"bench_{width}x{height}.tif"
    if not slide.exists():
        write_synthetic_slide(
            slide, SyntheticSpec(width=width, height=height, n_tissue=3, tumour=True, seed=7)
        )
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
    plan = ReadPlan(
        pf.attrs["slide_path"], backend, None, 0, float(ds[0]), pf.patch_size_level0, 224
    )
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
    ap.add_argument(
        "--e2e-patches", type=int, default=0, help="patches for end to end (0 = whole slide)"
    )
    ap.add_argument("--model-batches", type=int, default=6, help="batches per model-only timing")
    ap.add_argument("--read-patches", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench_extract"
    )
    args = ap.parse_args()

    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    slide, pfile = make_slide(args.cache, args.width, args.height)
    n_all = len(h5.read_patches(pfile).coords)
    print(
        f"slide {slide.name}: {n_all} patches of 256 px at 0.5 µm/px "
        f"(prepared in {time.perf_counter() - t:.0f} s); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows: list[dict[str, Any]] = []

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
        res = extract_slide(
            pf_e2e, args.cache / "e2e" / f"bag_s{supertile}.h5", runner, cfg, slide_path=slide
        )
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

    print()
    print_table(rows, ["stage", "variant", "patches_per_s", "vs_model_only", "patches", "seconds"])
    best_e2e = max(v["patches_per_s"] for v in e2e.values())
    print(
        f"\nend to end {best_e2e:.2f} patches/s = {best_e2e / CLAM['end_to_end']:.2f}× CLAM's "
        f"{CLAM['end_to_end']} (issue 3); target: ≥ 90% of model-only in the same run"
    )
    path = save_json(
        "extract",
        {
            "slide": {
                "name": slide.name,
                "width": args.width,
                "height": args.height,
                "patches": n_all,
            },
            "settings": {
                "encoder": "resnet50_trunc",
                "weights": "random",
                "batch_size": args.batch_size,
                "workers": args.workers,
                "device": args.device,
                "read_patches": args.read_patches,
                "model_batches": args.model_batches,
                "e2e_patches": n_e2e,
                "torch_threads": torch.get_num_threads(),
            },
            "rows": rows,
            "model_only": model_pps,
            "best_model_form": best,
            "end_to_end": e2e,
            "clam_reference": CLAM,
        },
    )
    print(f"saved {path}")


def print_row(r: dict[str, Any]) -> None:
    extra = f"  ({r['vs_model_only']:.1%} of model only)" if "vs_model_only" in r else ""
    print(
        f"  {r['stage']:<10} {r['variant']:<48} {r['patches_per_s']:8.2f} patches/s{extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
