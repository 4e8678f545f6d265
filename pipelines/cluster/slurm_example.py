"""Run a cohort on a SLURM cluster: dask-jobqueue starts CPU and GPU workers as SLURM jobs.

    pip install 'wsi-mil[slurm]'
    python pipelines/cluster/slurm_example.py cohort.yaml [--jobs 8 --gpu-jobs 2] [--cluster slurm_example.yaml]

This is ``wsi-mil run cohort.yaml --scheduler ADDRESS`` with the workers as SLURM jobs.
The CPU jobs tile slides and render heatmaps; the GPU jobs declare the Dask resource
``GPU=1`` so extraction (``extract.device: auto`` or ``cuda``) and training go to them.
Every job must see the same file system paths as this process (slides, OUT, the Python
environment). This process is the Dask client: it holds ``OUT/.wsi-mil.lock`` and prints
the summary; run it on a login node inside ``tmux``/``screen``, or as a small SLURM job of
its own. Re-running the same command resumes: finished slides are skipped.
Exit code 0 only when every slide went through every stage.

Without a cluster, ``pipelines/cluster/local_slurm.sh start`` makes this machine one
(tests/cohort/test_slurm.py runs this script on it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def gpu_job_script(scheduler: str, settings: dict[str, Any]) -> str:
    """A SLURM batch script for one GPU worker (``--resources GPU=1``) joining ``scheduler``."""
    from dask_jobqueue.slurm import SLURMJob

    s = dict(settings)
    s["worker_extra_args"] = [*s.get("worker_extra_args", []), "--resources", "GPU=1"]
    # Extraction forks slide readers, which a daemonic worker process may not do.
    s["job_script_prologue"] = [*s.get("job_script_prologue", []), "export DASK_DISTRIBUTED__WORKER__DAEMON=False"]
    return SLURMJob(scheduler=scheduler, name="wsi-mil-gpu-$SLURM_JOB_ID", **s).job_script()


def wait_for_workers(client: Any, gpu: bool, timeout: float) -> None:
    """Wait until a worker has joined and, when GPU jobs were submitted, a ``GPU=1`` worker.

    The run routes extraction by the workers present when it starts, so it must not start
    before a GPU worker is there; more jobs may join later (the queue decides when).
    """
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        if workers and (not gpu or any("GPU" in (w.get("resources") or {}) for w in workers)):
            return
        if time.monotonic() > deadline:
            kind = "a GPU worker" if workers else "a worker"
            raise TimeoutError(f"no {kind} joined within {timeout:.0f} s; see squeue and the jobs' logs")
        time.sleep(1)


def main() -> None:
    import yaml
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from wsi_mil.cohort import load_cohort_config, run_cohort
    from wsi_mil.errors import WsiMilError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="cohort config (configs/cohort/example.yaml)")
    ap.add_argument("--cluster", type=Path, default=Path(__file__).with_name("slurm_example.yaml"))
    ap.add_argument("--jobs", type=int, default=4, help="CPU jobs")
    ap.add_argument("--gpu-jobs", type=int, default=1, help="GPU jobs (0: extraction on CPU jobs)")
    ap.add_argument("--out", type=Path, help="output folder (overrides the config's)")
    ap.add_argument("--stages", help="comma-separated subset of tile,extract,train,heatmap,predict")
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--wait", type=float, default=3600, help="seconds to wait for the first workers (the queue)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    args = ap.parse_args()

    spec = yaml.safe_load(args.cluster.read_text())
    try:
        cfg = load_cohort_config(args.config, {"out": args.out, "stages": args.stages})
    except WsiMilError as exc:
        sys.exit(f"error: {exc}")
    # The CPU jobs come from dask-jobqueue, which also runs the scheduler in this process;
    # the GPU jobs are the same kind of job script with the GPU resource, submitted to it.
    cluster = SLURMCluster(**spec["cpu"])
    cluster.scale(jobs=args.jobs)
    gpu_ids: list[str] = []
    try:
        script = gpu_job_script(cluster.scheduler_address, spec["gpu"])
        for _ in range(args.gpu_jobs):
            res = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, check=True)
            gpu_ids.append(res.stdout.strip().split(";")[0])
        print(f"SLURM jobs: {args.jobs} CPU (dask-jobqueue), {args.gpu_jobs} GPU {' '.join(gpu_ids)}".rstrip())
        with Client(cluster) as client:
            wait_for_workers(client, gpu=bool(gpu_ids), timeout=args.wait)
            summary = run_cohort(
                cfg, scheduler=cluster.scheduler_address, retry_failed=args.retry_failed, progress=args.progress
            )
    except (WsiMilError, TimeoutError) as exc:
        sys.exit(f"error: {exc}")
    except subprocess.CalledProcessError as exc:
        sys.exit(f"error: sbatch failed: {exc.stderr.strip()}")
    finally:
        if gpu_ids:
            subprocess.run(["scancel", *gpu_ids], check=False)
        cluster.close()
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    main()
