"""Benchmark ``wsi-mil run``: slides per hour end to end and against cohort size, and the status store.

    .venv/bin/python pipelines/benchmarks/cohort.py [--slides 8 --width 4096 --height 3072]
        [--encoder texture] [--modes local,sequential]
    .venv/bin/python pipelines/benchmarks/cohort.py --what scaling [--sizes 400,1000,4000] [--modes local]
    .venv/bin/python pipelines/benchmarks/cohort.py --what records [--records 40000]

``e2e`` (default): a synthetic cohort (tumour / normal alternating, cached) runs through
tile → extract → train → heatmap from an empty output folder, once per mode: ``local``
(the embedded Dask LocalCluster: one worker process per core, one thread each),
``sequential`` (this process, no Dask) and, with a scheduler address, an existing cluster.
Per stage: the summed task time (what the stage costs) and its wall span (tasks of
different stages overlap on Dask). Writes results/cohort.json.

``scaling``: tile + extract (``texture`` encoder) of cohorts of tiny slides (768 × 768,
about three patches; 16 distinct files, linked under as many names as the cohort needs)
at each size: slides/hour and seconds per slide — of the whole command (``wall``, with the
cluster's start-up) and of its task span (first task start to last task end) — and their
ratio to the smallest cohort: the bookkeeping of a run must not grow with the cohort.
Writes results/cohort_scaling.json.

``records``: status records per second — the store (one file per slide and stage), SQLite
in WAL mode (the alternative weighed in docs/cohort.md), and the old whole-CSV rewrite —
from one and two processes, with the cost of a gate read and of exporting status.csv.
Writes results/cohort_records.json.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, save_json

from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.harness import status
from wsi_mil.io.atomic import write_text_atomic
from wsi_mil.io.layout import Layout
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


def timed_run(cfg_path: Path, mode: str, label: str) -> tuple[Any, float]:
    """``wsi-mil run`` of ``cfg_path`` on ``mode`` (local / sequential / an address); summary and wall seconds."""
    cfg = load_cohort_config(cfg_path)
    scheduler = {"local": None, "sequential": "sequential"}.get(mode, mode)
    t = time.perf_counter()
    summary = run_cohort(cfg, scheduler=scheduler, echo=lambda s: None, progress=False)
    wall = time.perf_counter() - t
    if not summary.ok:
        raise SystemExit(f"{label}: failures {list(summary.failures)[:5]}")
    return summary, wall


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
    summary, wall = timed_run(cfg_path, mode, mode)
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


def e2e(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    listing = make_cohort(args.cache, args.slides, args.width, args.height)
    print(f"cohort: {args.slides} slides of {args.width}×{args.height} ({time.perf_counter() - t:.1f} s to make)")
    labels = args.cache / f"labels_{args.slides}.csv"
    results = []
    for mode in _modes(args.modes):
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


def _modes(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


# --------------------------------------------------------------------------- scaling

N_DISTINCT = 16


def tiny_cohort(folder: Path, n: int) -> Path:
    """A folder of ``n`` tiny slides: 16 distinct files, linked under ``n`` names."""
    src = folder / "tiny_src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(N_DISTINCT):
        path = src / f"t{i:02d}.tif"
        if not path.exists():
            spec = SyntheticSpec(width=768, height=768, tumour=i % 2 == 0, n_tissue=1, tissue_scale=0.7, seed=2000 + i)
            write_synthetic_slide(path, spec)
    slides = folder / f"tiny_{n}"
    if not slides.is_dir() or len(list(slides.iterdir())) != n:
        shutil.rmtree(slides, ignore_errors=True)
        slides.mkdir()
        for i in range(n):
            (slides / f"s{i:05d}.tif").symlink_to(src / f"t{i % N_DISTINCT:02d}.tif")
    return slides


def scaling(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.sizes.split(",")]
    results = []
    for mode in _modes(args.modes):
        for n in sizes:
            slides = tiny_cohort(args.cache, n)
            out = args.cache / f"scaling_out_{n}"
            shutil.rmtree(out, ignore_errors=True)
            cfg_path = args.cache / f"scaling_{n}.yaml"
            cfg_path.write_text(
                f"slides: {slides}\nout: {out}\nstages: [tile, extract]\n"
                "extract: {encoder: texture, batch_size: 8, workers: 0}\n"
            )
            summary, wall = timed_run(cfg_path, mode, f"{mode} {n}")
            rows = status.read_status(out)
            assert len(rows) == 2 * n, (len(rows), n)
            task = sum(r.task_seconds for r in summary.stages.values())
            # From the first task's start to the last one's end: without the cluster's start-up.
            starts = [r.first_start for r in summary.stages.values() if r.first_start is not None]
            span = max(r.last_end or 0 for r in summary.stages.values()) - min(starts)
            res = {
                "mode": mode,
                "slides": n,
                "wall_s": round(wall, 1),
                "s_per_slide": round(wall / n, 4),
                "span_s": round(span, 1),
                "span_per_slide": round(span / n, 4),
                "task_s_per_slide": round(task / n, 4),
                # Typical task (median over the cohort, per stage): what a load spike does not move.
                **{
                    f"median_{st}_s": round(statistics.median(ts), 4)
                    for st in ("tile", "extract")
                    if (ts := [o.seconds for o in summary.outcomes if o.stage == st and o.state in ("done", "empty")])
                },
                "slides_per_hour": round(n / wall * 3600),
                "patches": summary.stages["tile"].n_patches,
            }
            results.append(res)
            print(
                f"{mode}: {n} slides in {wall:.1f} s = {res['slides_per_hour']} slides/hour "
                f"({wall / n * 1e3:.1f} ms/slide)"
            )
            shutil.rmtree(out, ignore_errors=True)
    for r in results:
        base = next(b for b in results if b["mode"] == r["mode"])
        r["per_slide_vs_smallest"] = round(r["s_per_slide"] / base["s_per_slide"], 3)
        r["span_per_slide_vs_smallest"] = round(r["span_per_slide"] / base["span_per_slide"], 3)
    cols = ["mode", "slides", "wall_s", "s_per_slide", "span_per_slide", "task_s_per_slide", "median_extract_s"]
    cols += ["slides_per_hour"]
    cols += ["per_slide_vs_smallest", "span_per_slide_vs_smallest"]
    print_table(results, cols)
    path = save_json("cohort_scaling", {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results})
    print(f"→ {path}")


# --------------------------------------------------------------------------- records


class SqliteStore:
    """The alternative weighed against the file store: one table keyed (slide_id, stage),
    WAL, busy_timeout for concurrent writers, one connection per process (reopened after fork)."""

    def __init__(self, path: Path) -> None:
        self.path, self._pid, self._con = path, -1, None

    def con(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # never use a connection across fork
            self._con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            self._con.execute("PRAGMA busy_timeout=60000")
            self._con.execute(
                "CREATE TABLE IF NOT EXISTS status (slide_id TEXT, stage TEXT, state TEXT, reason TEXT, "
                "n_patches TEXT, seconds TEXT, detail TEXT, worker TEXT, updated TEXT, PRIMARY KEY (slide_id, stage))"
            )
            self._pid = os.getpid()
        assert self._con is not None
        return self._con

    def record(self, sid: str, stage: str, state: str, n: int) -> None:
        row = (sid, stage, state, "", str(n), "0.100", "", "", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.con().execute("INSERT OR REPLACE INTO status VALUES (?,?,?,?,?,?,?,?,?)", row)

    def get(self, sid: str, stage: str) -> Any:
        return self.con().execute("SELECT * FROM status WHERE slide_id=? AND stage=?", (sid, stage)).fetchone()

    def export(self, out: Path) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(status.COLUMNS)
        w.writerows(self.con().execute("SELECT * FROM status ORDER BY stage, slide_id"))
        write_text_atomic(Layout(out).status_csv, buf.getvalue())


def legacy_record(out: Path, sid: str, stage: str, state: str, n: int) -> None:
    """The old status.record: re-read and rewrite the whole status.csv under a flock."""
    path = Layout(out).status_csv
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        rows = []
        if path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if (r["slide_id"], r["stage"]) != (sid, stage)]
        rows.append({"slide_id": sid, "stage": stage, "state": state, "n_patches": str(n), "seconds": "0.100"})
        rows.sort(key=lambda r: (r["stage"], r["slide_id"]))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=status.COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(path, buf.getvalue())
        fcntl.flock(fh, fcntl.LOCK_UN)


STAGES = ("tile", "extract", "train", "heatmap")


def _key(i: int) -> tuple[str, str]:
    return f"slide_{i // 4:05d}", STAGES[i % 4]


def _writer(kind: str, out: str, lo: int, hi: int) -> None:
    store = SqliteStore(Path(out) / "status.db") if kind == "sqlite" else None
    for i in range(lo, hi):
        sid, stage = _key(i)
        if kind == "files":
            status.get(out, sid, stage)  # the task's gate, then its record
            status.record(out, sid, stage, "done", n_patches=i, seconds=0.1)
        elif kind == "sqlite":
            assert store is not None
            store.get(sid, stage)
            store.record(sid, stage, "done", i)
        else:
            legacy_record(Path(out), sid, stage, "done", i)


def _time_records(kind: str, out: Path, n: int, procs: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        SqliteStore(out / "status.db").con()  # create the table before the writers race
    t = time.perf_counter()
    if procs == 1:
        _writer(kind, str(out), 0, n)
    else:
        ctx = multiprocessing.get_context("fork")
        ps = [
            ctx.Process(target=_writer, args=(kind, str(out), k * n // procs, (k + 1) * n // procs))
            for k in range(procs)
        ]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
            if p.exitcode:
                raise SystemExit(f"{kind}: a writer failed")
    return time.perf_counter() - t


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _reads(kind: str, out: Path, m: int) -> dict[str, float]:
    """Milliseconds per gate read (1,000 keys spread over the store) and seconds to export status.csv."""
    keys = [_key(i) for i in range(0, m, max(1, m // 1000))]
    if kind == "files":
        read: Callable[[tuple[str, str]], Any] = lambda k: status.get(out, *k)  # noqa: E731
        export: Callable[[], Any] = lambda: status.export_status(out)  # noqa: E731
    else:
        st = SqliteStore(out / "status.db")
        read, export = (lambda k: st.get(*k)), (lambda: st.export(out))
    gate = _timed(lambda: [read(k) for k in keys]) / len(keys)
    return {"gate_read_ms": round(gate * 1e3, 4), "export_s": round(_timed(export), 3)}


def records(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="records_", dir=args.cache))
    n = args.records
    results = []
    for kind, counts in (("files", [n]), ("sqlite", [n]), ("csv_rewrite", [500, 1000, 2000])):
        for procs in (1, 2):
            for m in counts:
                out = root / f"{kind}_{procs}_{m}"
                sec = _time_records(kind, out, m, procs)
                res: dict[str, Any] = {"store": kind, "procs": procs, "records": m, "seconds": round(sec, 2),
                                       "records_per_s": round(m / sec)}  # fmt: skip
                if kind != "csv_rewrite":
                    res.update(_reads(kind, out, m))
                results.append(res)
                print(f"{kind} ({procs} process(es)): {m} records in {sec:.2f} s = {m / sec:.0f}/s")
    legacy = [r for r in results if r["store"] == "csv_rewrite" and r["procs"] == 1]
    # The rewrite is quadratic: t(n) ≈ a n²; extrapolate the largest measured point.
    big = legacy[-1]
    est = big["seconds"] * (n / big["records"]) ** 2
    results.append({"store": "csv_rewrite (extrapolated n²)", "procs": 1, "records": n, "seconds": round(est)})
    cols = ["store", "procs", "records", "seconds", "records_per_s", "gate_read_ms", "export_s"]
    print_table(results, cols)
    shutil.rmtree(root, ignore_errors=True)
    path = save_json("cohort_records", {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results})
    print(f"→ {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="e2e", help="e2e, scaling and/or records (comma-separated)")
    ap.add_argument("--slides", type=int, default=8, help="e2e: cohort size")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--height", type=int, default=3072)
    ap.add_argument("--encoder", default="texture", help="texture (built in) or resnet50_trunc (random weights)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--modes", default=None, help="local, sequential, and/or a scheduler address "
                    "(default: local,sequential for e2e, local for scaling)")  # fmt: skip
    ap.add_argument("--sizes", default="400,1000,4000", help="scaling: cohort sizes")
    ap.add_argument("--records", type=int, default=40_000, help="records: how many")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_mil_bench" / "cohort")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    for what in _modes(args.what):
        if what == "e2e":
            e2e(argparse.Namespace(**{**vars(args), "modes": args.modes or "local,sequential"}))
        elif what == "scaling":
            scaling(argparse.Namespace(**{**vars(args), "modes": args.modes or "local"}))
        elif what == "records":
            records(args)
        else:
            raise SystemExit(f"--what: unknown {what!r} (e2e, scaling, records)")


if __name__ == "__main__":
    main()
