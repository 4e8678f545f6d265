"""Benchmark peak memory of every command on large flat and pyramidal slides.

    .venv/bin/python pipelines/benchmarks/memory.py [--shapes flat-40k,pyramid-100k --scale 1]

Each command (``tile``, ``extract``, ``heatmap``, ``predict`` and ``view`` serving a
zoomed-out view) runs as its own ``wsi-mil`` process under GNU time; its peak RSS is the
largest of that process and the workers it waited for (``%M``). The slides
are synthetic (mostly glass, a few tissue islands, tiled JPEG), written tile by tile, and
kept in ``--workdir`` between runs. The model comes from a small cohort of small slides
trained once (texture encoder, 2 folds), so it says nothing about accuracy. Prints a table
and writes results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.io.layout import Layout
from wsi_mil.io.run_folder import PIPELINE_FILE
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

#: name -> (width, height, level downsamples, µm/px); the shapes of issue 13.
SHAPES: dict[str, tuple[int, int, tuple[int, ...], float]] = {
    "flat-40k": (40_000, 30_000, (1,), 0.5),
    "pyramid-100k": (100_000, 80_000, (1, 4), 0.25),
    "pyramid-40k": (40_000, 30_000, (1, 4, 16, 64), 0.5),
}
ENCODER = "texture"
LIMIT_MB = 2048
WSI_MIL = [sys.executable, "-m", "wsi_mil.cli"]


def _timed(cmd: list[str], peak_file: Path) -> list[str]:
    """``cmd`` under GNU time writing its peak RSS (KB) to ``peak_file``, where time exists.

    A child's own ``ru_maxrss`` would include this process's memory at fork (Linux keeps
    it across ``exec``); GNU time is a small parent, so its figure is the command's.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    return [gnu_time, "-f", "%M", "-o", str(peak_file), *cmd] if gnu_time else cmd


def _peak(peak_file: Path, usage: Any) -> float:
    """Peak RSS in MB: GNU time's report, else ``ru_maxrss`` from ``wait4``."""
    try:
        return int(peak_file.read_text().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):
        return usage.ru_maxrss / 1024


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion; its wall time, exit code and peak RSS in MB."""
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(_timed(cmd, peak_file), stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t, "peak_mb": _peak(peak_file, usage)}


def measure_view(out: Path, slide_id: str, port: int, log: Path) -> dict[str, Any]:
    """Serve ``out``, fetch a zoomed-out view (whole coarse levels, one tile per finer level).

    The requests are what OpenSeadragon asks first, then a walk to full resolution: each
    Deep Zoom level's middle tile, slide and overlay.
    """
    cmd = [*WSI_MIL, "view", str(out), "--port", str(port)]
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    t = time.perf_counter()
    fh = open(log, "ab")  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(_timed(cmd, peak_file), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    ok, n = True, 0
    try:
        for _ in range(600):  # the server is up once the slide list answers
            try:
                urllib.request.urlopen(f"{base}/api/slides", timeout=5).read()
                break
            except OSError:
                time.sleep(0.2)
        dzi = urllib.request.urlopen(f"{base}/slides/{slide_id}.dzi", timeout=600).read().decode()
        width = int(dzi.split('Width="')[1].split('"')[0])
        height = int(dzi.split('Height="')[1].split('"')[0])
        dims = [(width, height)]
        while dims[-1] != (1, 1):
            w, h = dims[-1]
            dims.append((max(1, -(-w // 2)), max(1, -(-h // 2))))
        dims = dims[::-1]
        for level, (w, h) in enumerate(dims):
            cols, rows = -(-w // 254), -(-h // 254)
            tiles = [(c, r) for c in range(cols) for r in range(rows)]
            if len(tiles) > 16:  # a finer level: the middle tile only
                tiles = [(cols // 2, rows // 2)]
            for c, r in tiles:
                urllib.request.urlopen(f"{base}/slides/{slide_id}_files/{level}/{c}_{r}.jpeg", timeout=600).read()
                n += 1
            oc, orow = min(cols // 2, -(-w // 256) - 1), min(rows // 2, -(-h // 256) - 1)
            try:
                urllib.request.urlopen(
                    f"{base}/overlay/{slide_id}/attention_files/{level}/{oc}_{orow}.png", timeout=600
                ).read()
                n += 1
            except OSError:
                pass  # no heatmap for this slide yet: slide tiles only
    except OSError as exc:
        ok = False
        print(f"  view: {exc}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # the server, not only GNU time
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            fh.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = _peak(peak_file, usage)
    return {"rc": 0 if ok else 1, "wall_s": time.perf_counter() - t, "peak_mb": peak, "tiles": n}


def write_slide(path: Path, shape: tuple[int, int, tuple[int, ...], float], seed: int) -> float:
    """Write one benchmark slide (once); seconds taken, 0 if it was there."""
    if path.exists():
        return 0.0
    width, height, levels, mpp = shape
    t = time.perf_counter()
    spec = SyntheticSpec(
        width=width, height=height, mpp=mpp, levels=levels, n_tissue=4, tissue_scale=0.08,
        tumour=True, plain_background=True, truth_downsample=64, seed=seed,
    )
    write_synthetic_slide(path, spec)
    return time.perf_counter() - t


def train_model(work: Path, log: Path) -> Path:
    """A small model on 12 small slides (tile → extract → train, 2 folds); its run folder."""
    out = work / "train"
    run = Layout(out).run_dir("bench")
    if (run / PIPELINE_FILE).exists():
        return run
    slides = work / "train_slides"
    slides.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label"]
    for i in range(12):
        path = slides / f"train_{i}.tif"
        if not path.exists():
            spec = SyntheticSpec(width=2048, height=2048, tumour=i % 2 == 1, n_tissue=2, seed=100 + i)
            write_synthetic_slide(path, spec)
        rows.append(f"train_{i},{'tumour' if i % 2 else 'normal'}")
    (work / "labels.csv").write_text("\n".join(rows) + "\n")
    for cmd in (
        [*WSI_MIL, "tile", str(slides), "--out", str(out)],
        [*WSI_MIL, "extract", "--out", str(out), "--encoder", ENCODER, "--workers", "1"],
        [*WSI_MIL, "train", "--out", str(out), "--labels", str(work / "labels.csv"), "--folds", "2",
         "--epochs", "3", "--run-name", "bench"],
    ):
        res = measure(cmd, log)
        if res["rc"] != 0:
            raise SystemExit(f"training the benchmark model failed: {' '.join(cmd)} (see {log})")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="flat-40k,pyramid-100k", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every side by this factor (quick runs)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_memory")
    ap.add_argument("--commands", default="tile,extract,heatmap,predict,view")
    ap.add_argument("--port", type=int, default=8799)
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    commands = args.commands.split(",")
    model = train_model(work, log) if {"heatmap", "predict", "view"} & set(commands) else None
    rows: list[dict[str, Any]] = []
    shapes_out: dict[str, Any] = {}
    for k, name in enumerate(args.shapes.split(",")):
        w, h, levels, mpp = SHAPES[name]
        shape = (round(w * args.scale), round(h * args.scale), levels, mpp)
        sid = f"{name}_{shape[0]}x{shape[1]}"
        slide = work / "slides" / f"{sid}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        print(f"{sid}: writing ..." if not slide.exists() else f"{sid}: cached", flush=True)
        written_s = write_slide(slide, shape, seed=7 + k)
        out, pred = work / f"out_{sid}", work / f"predict_{sid}"
        for d in (out, pred):
            shutil.rmtree(d, ignore_errors=True)
        level0_mb = shape[0] * shape[1] * 3 / 2**20
        shapes_out[sid] = {
            "width": shape[0], "height": shape[1], "level_downsamples": list(levels), "mpp": mpp,
            "file_mb": slide.stat().st_size / 2**20, "level0_rgb_mb": level0_mb,
            "coarsest_level_rgb_mb": level0_mb / levels[-1] ** 2, "written_s": written_s,
        }
        cmds = {
            "tile": [*WSI_MIL, "tile", str(slide), "--out", str(out)],
            "extract": [*WSI_MIL, "extract", "--out", str(out), "--encoder", ENCODER, "--workers", "2"],
            "heatmap": [*WSI_MIL, "heatmap", "--out", str(out), "--model", str(model), "--no-progress"],
            "predict": [*WSI_MIL, "predict", str(slide), "--model", str(model), "--out", str(pred),
                        "--workers", "2", "--no-progress"],
        }
        for cmd_name in commands:
            view = cmd_name == "view"
            res = measure_view(out, sid, args.port, log) if view else measure(cmds[cmd_name], log)
            row = {"slide": sid, "command": cmd_name, **res, "under_2gb": res["peak_mb"] < LIMIT_MB}
            rows.append(row)
            print(f"  {cmd_name}: {res['peak_mb']:.0f} MB, {res['wall_s']:.1f} s, rc {res['rc']}", flush=True)
    print_table(rows, ["slide", "command", "peak_mb", "wall_s", "rc", "under_2gb"])
    payload = {
        "what": "peak RSS (ru_maxrss of each wsi-mil process, MB) and wall time per command",
        "limit_mb": LIMIT_MB,
        "encoder": ENCODER,
        "shapes": shapes_out,
        "rows": rows,
    }
    print(f"wrote {save_json('memory', payload)}")


if __name__ == "__main__":
    main()
