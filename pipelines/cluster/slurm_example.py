"""Run a cohort on a SLURM cluster: dask-jobqueue starts CPU and GPU workers as SLURM jobs.

    pip install 'wsi-mil[slurm]'
    python pipelines/cluster/slurm_example.py cohort.yaml [--jobs 8 --gpu-jobs 2] [--cluster slurm_example.yaml]

The CPU jobs tile slides and render heatmaps; the GPU jobs declare the Dask resource
``GPU=1`` so extraction (``extract.device: auto`` or ``cuda``) and training go to them.
Every job must see the same file system paths as this process (slides, OUT). This
process is the Dask client: it holds ``OUT/.wsi-mil.lock`` and prints the summary; run
it on a login node inside ``tmux``/``screen``, or as a small SLURM job of its own.
Re-running the same command resumes: finished slides are skipped.
"""

from __future__ import annotations

import argparse
import sys
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


def main() -> None:
    import subprocess

    import yaml
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from wsi_mil.cohort import load_cohort_config, run_cohort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="cohort config (configs/cohort/example.yaml)")
    ap.add_argument("--cluster", type=Path, default=Path(__file__).with_name("slurm_example.yaml"))
    ap.add_argument("--jobs", type=int, default=4, help="CPU jobs")
    ap.add_argument("--gpu-jobs", type=int, default=1, help="GPU jobs (0: extraction on CPU jobs)")
    ap.add_argument("--retry-failed", action="store_true")
    args = ap.parse_args()

    spec = yaml.safe_load(args.cluster.read_text())
    cfg = load_cohort_config(args.config)
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
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=3600)  # the queue may be slow
            summary = run_cohort(cfg, scheduler=cluster.scheduler_address, retry_failed=args.retry_failed)
    finally:
        if gpu_ids:
            subprocess.run(["scancel", *gpu_ids], check=False)
        cluster.close()
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    main()
