"""Benchmark the viewer under load: 50 clients fetching slide and overlay tiles on loopback.

    .venv/bin/python pipelines/benchmarks/viewer_load.py [--slides 12 --clients 50 --seconds 30 --max-open 3]

A synthetic cohort (``--slides`` slides of 4096 × 3072 px, tiled, with heatmaps of made-up
scores) is served by ``wsi-mil view`` in a child process (so an abort there shows as its
exit code) with ``--max-open`` far below the number of slides: the open-slide LRU evicts
all the time, which is what crashed OpenSlide before handles were reference-counted
(issue 15). Each workload gets a fresh server:

- ``browse``: each client opens a random slide (its overview tiles, shared by all clients)
  and looks at four random 4 × 3-tile viewports at the finest levels, slide and overlay;
- ``cold``: any tile of any slide, uniformly: nearly every request a cache miss.

Clients are keep-alive connections, back to back (no think time), bounded by
``--seconds`` and ``--max-requests``. Reported: requests, 5xx, dropped connections,
latency percentiles, and whether the server still answers afterwards. Prints a table and
writes results/viewer_load.json.
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

from wsi_mil.viewer import _load as load

TARGET_P99_MS = 200.0


def run_workload(out: Path, name: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """One fresh server, one workload; the figures and what became of the server."""
    port = load.free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ["--backend", args.backend, "--max-open", str(args.max_open)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    proc = load.start_server(load.server_command(out, port, *extra), base, log)
    try:
        slides = load.pyramids(base)
        workload = load.browsing(slides) if name == "browse" else load.uniform(slides)
        res = load.run_load(port, workload, args.clients, args.seconds, args.max_requests, seed=args.seed)
        alive = proc.poll() is None
        answers = alive and load.get(f"{base}/api/slides")[0] == 200
    finally:
        code = load.stop_server(proc)
    text = log.read_text(errors="replace")
    return {
        "workload": name,
        **res.summary(),
        "slides": len(slides),
        "alive_after": alive,
        "answers_after": answers,
        "exit_code": code,
        "aborted": "Bail out!" in text or "assertion failed" in text or (code is not None and code < 0),
        "server_log_tail": text[-500:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--max-open", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="server worker threads (default: the viewer's)")
    ap.add_argument("--backend", default="openslide")
    ap.add_argument("--workloads", default="browse,cold")
    ap.add_argument("--cohort", type=Path, default=None, help="reuse (or build here) the synthetic cohort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="viewer_load", help="results/<name>.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.cohort or Path(tmp)
        out = root / "out"
        t0 = time.perf_counter()
        if not (out / "predictions.csv").is_file():
            load.build_cohort(root, args.slides, seed=args.seed)
        print(f"cohort: {args.slides} slides in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [run_workload(out, w, args, Path(tmp) / f"server_{w}.log") for w in args.workloads.split(",")]

    columns = ["workload", "clients", "requests", "per_second", "4xx", "5xx", "dropped"]
    print_table(rows, [*columns, "p50_ms", "p95_ms", "p99_ms", "max_ms", "answers_after", "exit_code"])
    for r in rows:
        ok = r["5xx"] == 0 and r["dropped"] == 0 and r["answers_after"] and not r["aborted"]
        print(f"{r['workload']}: {'held' if ok else 'FAILED'}; p99 {r['p99_ms']} ms (target < {TARGET_P99_MS:.0f})")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = save_json(args.name, {"config": config, "target_p99_ms": TARGET_P99_MS, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
