"""Reproduce Shi et al. (AAAI 2020) on MUSK1, MUSK2, ELEPHANT and digit bags.

Usage (from the repository root)::

    .venv/bin/python -m pipelines.reproduce            # full run (hours on 2 cores)
    .venv/bin/python -m pipelines.reproduce --quick    # smoke test, < 1 minute
    .venv/bin/python -m pipelines.reproduce --report   # rebuild docs from saved runs

The jobs and their protocols: :mod:`pipelines.reproduce.jobs`; the digit bags:
:mod:`pipelines.reproduce.digits`; the tables: :mod:`pipelines.reproduce.report`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pipelines.reproduce.jobs import ROOT, Settings, benchmark_job, default_jobs


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and digit-bag jobs, then write docs/reproduction.md."""
    from pipelines.reproduce.digits import digits_experiment
    from pipelines.reproduce.report import write_report

    ap = argparse.ArgumentParser(
        prog="python -m pipelines.reproduce", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--report", action="store_true", help="only rebuild the report")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes (1 thread each)")
    ap.add_argument("--device", default="cpu", help="where jobs train: cpu or cuda[:N]")
    ap.add_argument("--results", type=Path, default=None, help="where job files go")
    ap.add_argument("--docs", type=Path, default=None, help="where the report goes")
    ap.add_argument("--only", choices=("benchmarks", "digits"), default=None)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of 10-fold CV, as published")
    ap.add_argument("--honest-repeats", type=int, default=1, help="repeats, honest protocol")
    ap.add_argument(
        "--jobs",
        default=None,
        help="explicit jobs 'dataset:arch:protocol:repeats,...' (protocol: published, "
        "published_z, honest; repeats N: repeats 0..N-1, only those not saved yet are "
        "trained); default: all, in priority order",
    )
    args = ap.parse_args(argv)
    quick = args.quick
    results = args.results or ROOT / "pipelines" / "results" / ("quick" if quick else "full")
    docs = args.docs or (results if quick else ROOT / "docs")
    results.mkdir(parents=True, exist_ok=True)
    s = Settings(epochs=3, folds=3, inner_folds=2) if quick else Settings()
    if args.device != "cpu" and not args.report:
        import torch

        try:
            ok = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
        except RuntimeError as e:
            raise SystemExit(f"--device {args.device}: {e}") from e
        if not ok:
            raise SystemExit(f"--device {args.device}: no CUDA device here; use cpu")
    t0 = time.time()
    if not args.report:
        # CUDA cannot be used in a forked child once initialised: spawn workers for a GPU.
        ctx = multiprocessing.get_context("spawn" if args.device != "cpu" else None)
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
            jobs = [] if args.only == "digits" else default_jobs(quick, args.repeats, args.honest_repeats)
            if args.jobs:
                jobs = [(d, a, p, int(r)) for d, a, p, r in (j.split(":") for j in args.jobs.split(","))]
            futs = [pool.submit(benchmark_job, d, a, p, r, s, results, args.device) for d, a, p, r in jobs[:1]]
            if args.only != "benchmarks":  # second in the queue: one worker takes it early
                futs.append(pool.submit(digits_experiment, results, quick))
            futs += [pool.submit(benchmark_job, d, a, p, r, s, results, args.device) for d, a, p, r in jobs[1:]]
            for f in futs:
                print(f.result(), flush=True)
    write_report(results, docs, quick=quick)
    print(f"done in {time.time() - t0:.0f} s; report in {docs}")
