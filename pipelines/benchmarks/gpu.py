"""Benchmark stage 2 on a GPU: reading, model and end to end per encoder, against targets.

    python pipelines/benchmarks/gpu.py                 # one GPU, at most ~8 minutes
    .venv/bin/python pipelines/benchmarks/gpu.py --quick   # CPU smoke run, tiny slide

Encoders (random weights): ``resnet50_trunc``, ``uni`` (ViT-L/16) and ``uni2-h`` (ViT-H/14).
The slide: a synthetic slide written by :mod:`wsi_mil.synthetic`, whose compressed
512-px JPEG tiles are laid out again (byte for byte, in a shuffled order) as a level-0
mosaic of 144 × 144 patches of 256 px (20,736); a second mosaic, shuffled differently,
is the next slide for the gap between slides. Measured: reading only (CPU readers with N
processes, GPU decode), model only (fp16, bf16, NCHW, channels-last, compile), end to end
(reader → model → bag on disk) with sampled GPU utilisation and the share of time spent
waiting on the loader, the gap between two slides, and several GPUs where present.
``results/gpu.json`` is rewritten atomically after every measurement, so a run cut short
keeps what it measured; ``--budget-s`` skips (and records) what would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
from _common import RESULTS, machine, print_table
from extract import time_reading

from wsi_mil.io.atomic import atomic_path

ENCODERS = ("resnet50_trunc", "uni", "uni2-h")
FALLBACK = {"uni": "timm:vit_large_patch16_224", "uni2-h": "timm:vit_huge_patch14_224"}
VITS = ("uni", "uni2-h")
TILE, PATCH = 512, 256
TARGET_VITL_PPS = 2500  # ViT-L/16 bf16 end to end on one H100/H200


class Bench:
    """Rows measured so far, written to ``path`` after each one."""

    def __init__(self, path: Path, budget_s: float, header: dict[str, Any]) -> None:
        self.path, self.t0, self.budget = path, time.perf_counter(), budget_s
        self.rows: list[dict[str, Any]] = []
        self.doc: dict[str, Any] = {"machine": machine(), **header, "rows": self.rows}
        self.save()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def fits(self, stage: str, variant: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.add(
            {"stage": stage, "variant": variant, "skipped": f"budget: {self.left():.0f} s left, needs ~{need_s:.0f}"}
        )
        return False

    def add(self, row: dict[str, Any]) -> None:
        row = {"device_name": self.doc["device_name"], **row}
        self.rows.append(row)
        pps = (
            f"{row['patches_per_s']:9.1f} patches/s"
            if "patches_per_s" in row
            else row.get("skipped", row.get("error", ""))
        )
        print(
            f"  [{time.perf_counter() - self.t0:5.0f} s] {row['stage']:<11} {row.get('variant', ''):<52} {pps}",
            flush=True,
        )
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=2, default=str))


# -- the slides ---------------------------------------------------------------------------
def mosaic(src: Path, dst: Path, side: int, seed: int) -> None:
    """Write a one-level tiled TIFF of ``side`` × ``side`` tiles copied from ``src``'s level 0."""
    import tifffile

    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        counts = np.asarray(page.databytecounts)
        segs = [s for s, _ in tf.filehandle.read_segments(page.dataoffsets, page.databytecounts, sort=False)]
        res, sub = page.resolution, page.subsampling
    # Tiles with tissue or ink (larger JPEGs) mostly, some glass: a tissue-rich slide.
    rich = np.flatnonzero(counts > np.percentile(counts, 30))
    pick = np.random.default_rng(seed).choice(rich, side * side)
    h = w = side * TILE
    with atomic_path(dst) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as out:
        out.write(
            (segs[i] for i in pick),
            shape=(h, w, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            subsampling=sub,
            resolution=res,
            resolutionunit="CENTIMETER",
            metadata=None,
        )


def make_slides(cache: Path, quick: bool) -> tuple[list[Path], dict[str, Any]]:
    """Two mosaic slides and their patch files (full 256-px grid); timings of making them."""
    from wsi_mil.io import h5
    from wsi_mil.io.layout import Layout
    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.run import TileConfig, tile_slide

    side = 2 if quick else 72  # tiles per side: 72 × 512 px = 144 × 144 patches of 256 px
    keep = 8 if quick else None  # --quick: 8 patches per slide
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / ("src_quick.tif" if quick else "src.tif")
    info: dict[str, Any] = {}
    t = time.perf_counter()
    if not src.exists():
        n = 2048 if quick else 8192
        write_synthetic_slide(src, SyntheticSpec(width=n, height=n, n_tissue=5, tissue_scale=0.8, tumour=True, seed=3))
    info["synthetic_s"] = time.perf_counter() - t
    out = cache / ("out_quick" if quick else "out")
    template = Layout(out).patches(src.stem)
    if not template.exists():
        tile_slide(src, out, TileConfig())
    attrs = dict(h5.read_patches(template).attrs)
    t = time.perf_counter()
    pfiles = []
    for k in range(2):
        slide = cache / f"mosaic{k}_{side}.tif"
        if not slide.exists():
            mosaic(src, slide, side, seed=k)
        n = side * TILE // PATCH
        grid = np.array([[x * PATCH, y * PATCH] for y in range(n) for x in range(n)], np.int64)[:keep]
        pf = Layout(out).patches(slide.stem)
        dims = [side * TILE, side * TILE]
        h5.write_patches(
            pf,
            grid,
            {**attrs, "slide_path": str(slide), "name": slide.stem, "level_dim": dims, "downsampled_level_dim": dims},
        )
        pfiles.append(pf)
    info["mosaic_s"] = time.perf_counter() - t
    info["patches_per_slide"] = len(grid)
    return pfiles, info


# -- measuring ----------------------------------------------------------------------------
class Utilisation:
    """GPU utilisation (%) sampled every 0.1 s in a thread: pynvml, else torch.cuda.utilization."""

    def __init__(self, device: Any) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._read = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # no NVML binding: torch's own reading (needs it too, maybe not)
            import torch

            self._read = lambda: torch.cuda.utilization(device)

    def __enter__(self) -> Utilisation:
        def run() -> None:
            while not self._stop.wait(0.1):
                try:
                    self.samples.append(float(self._read()))  # type: ignore[misc]
                except Exception:
                    return

        if self._read is not None:
            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(runner: Any, batch: int, seconds: float, min_batches: int) -> float:
    """Patches/s of the model alone on random uint8 batches already on the device."""
    import torch

    S = runner.encoder.preprocess.input_size
    x = torch.randint(0, 256, (batch, S, S, 3), dtype=torch.uint8, device=runner.device)
    for _ in range(min_batches // 2 or 1):  # warm-up (cuDNN choice, compilation)
        runner(x)
    sync(runner.device)
    n, t0 = 0, time.perf_counter()
    while n < min_batches or time.perf_counter() - t0 < seconds:
        runner(x)
        n += 1
    sync(runner.device)
    return n * batch / (time.perf_counter() - t0)


def plan_for(pfile: Path, size: int) -> tuple[Any, np.ndarray]:
    from wsi_mil.features.reader import ReadPlan
    from wsi_mil.io import h5

    pf = h5.read_patches(pfile)
    return ReadPlan(pf.attrs["slide_path"], "openslide", None, 0, 1.0, pf.patch_size_level0, size), pf.coords


def batches(
    kind: str,
    pfile: Path,
    size: int,
    batch: int,
    workers: int,
    device: Any,
    backend: str = "openslide",
    supertile: int = 1,
    limit: int = 0,
) -> Any:
    """The reader under test: CPU reader processes (``cpu``) or GPU decode (``gpu``)."""
    from dataclasses import replace

    from wsi_mil.features.reader import PatchStream, make_groups, make_loader

    plan, coords = plan_for(pfile, size)
    if limit:
        coords = coords[:limit]
    if kind == "gpu":
        from wsi_mil.features.gpu_decode import GpuJpegStream

        return GpuJpegStream(plan, coords, batch, device)
    plan = replace(plan, backend=backend)
    stream = PatchStream(plan, coords, make_groups(coords, plan.size_level0, supertile), batch)
    return make_loader(stream, workers, pin_memory=device.type == "cuda")


def end_to_end(runner: Any, source: Any, n: int, dim: int, bag: Path) -> dict[str, Any]:
    """reader → model → HDF5 bag: patches/s, share of time waiting on the loader, utilisation."""
    from wsi_mil.features.writer import BagWriter

    wait, done = 0.0, 0
    with Utilisation(runner.device) as util, atomic_path(bag) as tmp, BagWriter(tmp, np.zeros((n, 2)), dim) as w:
        t0 = time.perf_counter()
        it = iter(source)
        while True:
            t = time.perf_counter()
            try:
                images, rows, failed = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t
            if len(failed):
                w.mark_failed(failed.numpy())
            if len(rows):
                w.write(rows.numpy(), runner(images))
            done += len(rows)
        sync(runner.device)
        secs = time.perf_counter() - t0
        w.finish({})
    return {
        "patches": done,
        "seconds": secs,
        "patches_per_s": done / secs,
        "wait_share": wait / secs,
        "gpu_util_mean": util.mean,
    }


_BUILT: dict[str, Any] = {}  # one random-weight encoder per name (a ViT-H takes seconds to build)


def make_runner(name: str, device: str, precision: str, channels_last: bool = True, compile: bool = False) -> Any:
    """A Runner over ``name``'s encoder, built once; its forms share the weights."""
    from wsi_mil.features import create_encoder, list_encoders
    from wsi_mil.features.runtime import Runner

    if name not in _BUILT:
        real = name if name in list_encoders() else FALLBACK.get(name, name)
        _BUILT[name] = create_encoder(real, weights="random")
    return Runner(
        _BUILT[name],
        device,
        precision,
        fold_bn=True,
        channels_last=channels_last,
        compile=compile,
    )


def slide_gap(bench: Bench, pfiles: list[Path], name: str, args: argparse.Namespace, decode: str) -> None:
    """Two slides through :func:`extract_slide` back to back: the model's idle time between them."""
    import dataclasses

    from wsi_mil.features.extract import ExtractConfig, extract_slide

    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    if decode == "gpu" and "decode" not in fields:
        bench.add({"stage": "gap", "variant": f"{name} decode=gpu", "skipped": "ExtractConfig has no decode yet"})
        return
    cfg = ExtractConfig(
        encoder=name,
        weights="random",
        batch_size=args.batch_size,
        workers=args.workers_e2e,
        device=args.device,
        precision=args.precision,
        **({"decode": decode} if "decode" in fields else {}),
    )
    runner = make_runner(name, args.device, args.precision)
    stamps: list[list[float]] = [[], []]
    results = []
    t0 = time.perf_counter()
    for k, pf in enumerate(pfiles):
        bag = args.cache / "gap" / f"{k}.h5"
        results.append(
            extract_slide(pf, bag, runner, cfg, progress=lambda _n, tick=stamps[k].append: tick(time.perf_counter()))
        )
    total = time.perf_counter() - t0
    gap = stamps[1][0] - stamps[0][-1] if stamps[0] and stamps[1] else None
    first = stamps[1][1] - stamps[1][0] if len(stamps[1]) > 1 else 0.0
    bench.add(
        {
            "stage": "gap",
            "variant": f"{name} extract_slide x2 decode={decode} workers={args.workers_e2e}",
            "gap_s": gap,
            "next_batch_s": first,
            "gap_s_reported": [getattr(r, "gap_s", None) for r in results],
            "patches_per_s": sum(r.n_patches for r in results) / total,
        }
    )


def cohort_gap(bench: Bench, pfiles: list[Path], name: str, args: argparse.Namespace, decode: str) -> None:
    """The two slides through :func:`extract_cohort`, whose next slide's readers start early."""
    from wsi_mil.features import extract_cohort

    out = pfiles[0].parent.parent
    overrides = {
        "batch_size": args.batch_size,
        "workers": args.workers_e2e,
        "device": args.device,
        "precision": args.precision,
        "decode": decode,
    }
    t0 = time.perf_counter()
    summary = extract_cohort(
        out,
        name,
        weights="random",
        overrides=overrides,
        progress=False,
        overwrite=True,
        slide_ids=[p.stem for p in pfiles],
    )
    secs = time.perf_counter() - t0
    res = [summary.results.get(p.stem) for p in pfiles]
    gaps = [getattr(r, "gap_s", None) for r in res]
    bench.add(
        {
            "stage": "gap",
            "variant": f"{name} extract_cohort decode={decode} workers={args.workers_e2e}",
            "gap_s": gaps[-1],
            "first_slide_start_s": gaps[0],
            "failed": summary.failed,
            "patches_per_s": sum(r.n_patches for r in res if r is not None) / secs,
        }
    )


def several_gpus(bench: Bench, pfile: Path, name: str, args: argparse.Namespace) -> None:
    """One thread per GPU, each with its own model and GPU decode over its share of the slide."""
    import torch

    n = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    if n < 2:
        bench.add({"stage": "multi_gpu", "variant": name, "skipped": f"{n} GPU(s) visible"})
        return
    plan, coords = plan_for(pfile, 224)
    from wsi_mil.features.gpu_decode import GpuJpegStream

    for k in sorted({2, n}):
        runners = [make_runner(name, f"cuda:{i}", args.precision) for i in range(k)]
        done = [0] * k

        def work(i: int, k: int = k, runners: list = runners, done: list = done) -> None:
            for images, rows, _ in GpuJpegStream(plan, coords[i::k], args.batch_size, f"cuda:{i}"):
                runners[i](images)
                done[i] += len(rows)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bench.add(
            {
                "stage": "multi_gpu",
                "variant": f"{name} gpus={k} decode=gpu",
                "patches_per_s": sum(done) / (time.perf_counter() - t0),
            }
        )


# -- targets ------------------------------------------------------------------------------
def targets(bench: Bench) -> list[dict[str, Any]]:
    rows = [r for r in bench.rows if "patches_per_s" in r]

    def best(stage: str, enc: str | None = None, prec: str | None = None) -> float | None:
        v = [
            r["patches_per_s"]
            for r in rows
            if r["stage"] == stage
            and (enc is None or r.get("encoder") == enc)
            and (prec is None or r.get("precision") == prec)
        ]
        return max(v) if v else None

    out = []
    read = best("read")
    for enc in ENCODERS:
        e2e, model = best("end_to_end", enc), best("model", enc)
        if e2e is None or model is None:
            continue
        ref = model if enc in VITS or read is None else min(model, read)
        out.append(
            {
                "target": f"{enc}: end to end ≥ 80% of " + ("model only" if enc in VITS else "min(model, read)"),
                "value": e2e / ref,
                "met": e2e >= 0.8 * ref,
            }
        )
    vitl = best("end_to_end", "uni", "bf16")
    name = str(bench.doc["device_name"])
    if vitl is not None and ("H100" in name or "H200" in name):
        out.append(
            {
                "target": f"ViT-L/16 bf16 end to end ≥ {TARGET_VITL_PPS} patches/s",
                "value": vitl,
                "met": vitl >= TARGET_VITL_PPS,
            }
        )
    # Judged where extraction overlaps slides (extract_cohort); extract_slide alone does not.
    measured = [r for r in bench.rows if r["stage"] == "gap" and r.get("gap_s") is not None]
    gaps = [r["gap_s"] for r in measured if "extract_cohort" in r["variant"]] or [r["gap_s"] for r in measured]
    if gaps:
        out.append(
            {"target": "no gap over 1 s between slides (extract_cohort)", "value": max(gaps), "met": max(gaps) <= 1.0}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny slide, few batches, ~2 minutes")
    ap.add_argument("--device", default=None, help="default cuda:0 when present, else cpu (--quick: cpu)")
    ap.add_argument(
        "--encoders", default=None, help=f"comma-separated (default {','.join(ENCODERS)}; --quick: resnet50_trunc)"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting measurements after this (default 450)")
    ap.add_argument("--json", type=Path, default=RESULTS / "gpu.json")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench_gpu")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="time torch.compile")
    args = ap.parse_args()

    import torch

    from wsi_mil.features.runtime import usable_cpus

    cuda = torch.cuda.is_available() and not args.quick
    args.device = args.device or ("cuda:0" if cuda else "cpu")
    device = torch.device(args.device)
    encoders = (args.encoders or ("resnet50_trunc" if args.quick else ",".join(ENCODERS))).split(",")
    budget = args.budget_s or (110.0 if args.quick else 450.0)
    cpus = usable_cpus()
    args.batch_size = 2 if args.quick else 256
    args.precision = "auto"
    args.workers_e2e = min(cpus, 2 if args.quick else 16)
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {machine()['cpu']}"
    header = {
        "device_name": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "usable_cpus": cpus,
        "quick": args.quick,
        "budget_s": budget,
        "encoders": encoders,
        "batch_size": args.batch_size,
    }
    print(f"{name}; torch {torch.__version__}; {cpus} usable CPUs; budget {budget:.0f} s", flush=True)
    bench = Bench(args.json, budget, header)

    pfiles, info = make_slides(args.cache, args.quick)
    bench.doc["slides"] = {"files": [str(p) for p in pfiles], **info}
    bench.save()
    print(
        f"slides: 2 × {info['patches_per_slide']} patches (synthetic {info['synthetic_s']:.0f} s, "
        f"mosaics {info['mosaic_s']:.0f} s)",
        flush=True,
    )
    n = info["patches_per_slide"]
    read_n = n if args.quick else 4096

    # -- reading only (encoder-independent at 224 px) --------------------------------------
    from wsi_mil.features.gpu_decode import gpu_decode_supported

    gpu_ok = gpu_decode_supported(str(plan_for(pfiles[0], 224)[0].slide_path), 0)
    worker_counts = sorted({w for w in (2, 4, 8, 16, cpus) if w <= cpus}) if not args.quick else [0, 2]
    for backend, supertile in (("openslide", 1), ("tiffslide", 4)):
        for w in worker_counts:
            if bench.fits("read", f"cpu {backend} s={supertile} workers={w}", 15):
                pps = time_reading(pfiles[0], supertile, w, backend, read_n)
                bench.add(
                    {
                        "stage": "read",
                        "variant": f"cpu {backend} supertile={supertile} workers={w}",
                        "reader": "cpu",
                        "workers": w,
                        "patches_per_s": pps,
                    }
                )
    if gpu_ok and bench.fits("read", "gpu decode", 15):
        next(iter(batches("gpu", pfiles[0], 224, args.batch_size, 0, device, limit=args.batch_size)))  # decoder init
        t0 = time.perf_counter()
        got = sum(len(r) for _, r, _ in batches("gpu", pfiles[0], 224, args.batch_size, 0, device, limit=read_n))
        sync(device)
        bench.add(
            {
                "stage": "read",
                "variant": f"gpu decode on {device}",
                "reader": "gpu",
                "patches_per_s": got / (time.perf_counter() - t0),
            }
        )
    best_cpu = max(
        (r for r in bench.rows if r.get("reader") == "cpu" and "patches_per_s" in r),
        key=lambda r: r["patches_per_s"],
        default=None,
    )

    # -- per encoder: model only, then end to end --------------------------------------------
    for enc in encoders:
        forms = [("auto", True, False)] + ([] if args.quick else [("auto", False, False)])
        if device.type == "cuda":
            forms = [("bf16", True, False), ("fp16", True, False), ("bf16", False, False)]
            if compile_:
                forms.append(("bf16", True, True))
        runner = None
        for prec, cl, comp in forms:
            variant = f"{enc} {prec} {'channels_last' if cl else 'nchw'}{' compile' if comp else ''}"
            if not bench.fits("model", variant, 90 if comp else 20):
                continue
            try:
                r = make_runner(enc, args.device, prec, cl, comp)
                pps = model_only(r, args.batch_size, 0.0 if args.quick else 3.0, 2 if args.quick else 6)
            except Exception as exc:  # one form failing (compile) must not end the run
                bench.add({"stage": "model", "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            bench.add(
                {
                    "stage": "model",
                    "variant": variant,
                    "encoder": enc,
                    "precision": r.precision,
                    "channels_last": cl,
                    "compile": comp,
                    "patches_per_s": pps,
                }
            )
            if runner is None:
                runner = r
        if runner is None:
            continue
        S = runner.encoder.preprocess.input_size
        readers = [("gpu", 0)] if gpu_ok else []
        if best_cpu is not None:
            readers.insert(0, ("cpu", max(best_cpu["workers"], 1 if args.quick else 2)))
        for kind, w in readers:
            variant = f"{enc} {runner.precision} reader={kind}" + (f" workers={w}" if kind == "cpu" else "")
            est = 10 + n / max(
                1.0,
                0.5 * min(r["patches_per_s"] for r in bench.rows if r.get("encoder") == enc and "patches_per_s" in r),
            )
            if not bench.fits("end_to_end", variant, est):
                continue
            src = batches(kind, pfiles[0], S, args.batch_size, w, device)
            res = end_to_end(runner, src, n, runner.encoder.dim, args.cache / "e2e" / f"{enc}_{kind}.h5")
            bench.add(
                {
                    "stage": "end_to_end",
                    "variant": variant,
                    "encoder": enc,
                    "precision": runner.precision,
                    "reader": kind,
                    **res,
                }
            )
        del runner
        if enc != encoders[0]:  # the first one serves the gap run below
            _BUILT.pop(enc, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- between slides; several GPUs --------------------------------------------------------
    gap_enc = encoders[0]
    for decode in ("cpu", "gpu") if gpu_ok and device.type == "cuda" else ("cpu",):
        if bench.fits("gap", f"{gap_enc} decode={decode}", 30 + 4 * n / 2000):
            for how in (slide_gap, cohort_gap):
                try:
                    how(bench, pfiles, gap_enc, args, decode)
                except Exception as exc:  # extraction's API moves under us: record, go on
                    why = f"{type(exc).__name__}: {exc}"[:300]
                    bench.add({"stage": "gap", "variant": f"{gap_enc} {how.__name__} decode={decode}", "error": why})
    if device.type != "cuda":
        bench.add({"stage": "multi_gpu", "variant": "several GPUs", "skipped": "not a CUDA run"})
    elif gpu_ok and bench.fits("multi_gpu", "several GPUs", 40):
        several_gpus(bench, pfiles[0], "uni" if "uni" in encoders else encoders[0], args)

    bench.doc["targets"] = targets(bench)
    bench.doc["seconds"] = time.perf_counter() - bench.t0
    bench.save()
    print()
    print_table(
        [r for r in bench.rows if "patches_per_s" in r],
        ["stage", "variant", "patches_per_s", "wait_share", "gpu_util_mean", "gap_s", "device_name"],
    )
    print()
    for t in bench.doc["targets"]:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['value']:.3g}")
    print(f"\nsaved {args.json} ({bench.doc['seconds']:.0f} s)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
