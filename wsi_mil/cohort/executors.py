"""Where ``wsi-mil run`` executes its task graph: this process, an existing Dask cluster, or
an embedded ``LocalCluster`` (one process per core, plus one ``GPU=1`` worker per GPU)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from wsi_mil.cohort.config import CohortConfig
from wsi_mil.errors import ConfigError
from wsi_mil.harness import status
from wsi_mil.harness.runner import SlideOutcome, failure_reason


@dataclass
class Job:
    """One task of the plan: ``fn(*upstream outcomes, *args)`` on a worker with ``resources``."""

    key: str
    stage: str
    slide_id: str
    fn: Callable[..., SlideOutcome]
    deps: list[str | list[str] | None]  # keys of upstream jobs, passed first (a list for train)
    args: tuple[Any, ...]
    resources: dict[str, int] | None = None


class Sequential:
    """Runs the jobs in this process, in plan order (no Dask)."""

    gpu_workers = False
    slots_by_host: dict[str, int] = {}  # noqa: RUF012 - read only

    def clean_partials(self, out: str) -> int:
        """Nothing to do: this process's host is cleaned by the run itself."""
        return 0

    def run(self, jobs: list[Job]) -> Iterator[tuple[str, SlideOutcome]]:
        done: dict[str, SlideOutcome] = {}
        for job in jobs:
            deps = [[done[k] for k in d] if isinstance(d, list) else (done[d] if d else None) for d in job.deps]
            done[job.key] = job.fn(*deps, *job.args)
            yield job.key, done[job.key]


class DaskExecutor:
    """Submits the jobs to a Dask cluster; upstream outcomes travel as futures."""

    def __init__(self, client: Any) -> None:
        self.client = client
        info = client.scheduler_info()["workers"]
        self.gpu_workers = any("GPU" in (w.get("resources") or {}) for w in info.values())
        self.slots_by_host: dict[str, int] = {}
        for w in info.values():
            self.slots_by_host[w["host"]] = self.slots_by_host.get(w["host"], 0) + int(w["nthreads"])

    def run(self, jobs: list[Job]) -> Iterator[tuple[str, SlideOutcome]]:
        from distributed import as_completed

        futures: dict[str, Any] = {}
        for job in jobs:
            deps = [[futures[k] for k in d] if isinstance(d, list) else (futures[d] if d else None) for d in job.deps]
            futures[job.key] = self.client.submit(
                job.fn, *deps, *job.args, key=job.key, pure=False, resources=job.resources
            )
        errored: set[str] = set()
        by_future = {f.key: j for j, f in zip(jobs, futures.values(), strict=True)}
        for fut in as_completed(list(futures.values())):
            job = by_future[fut.key]
            try:
                # Waits when the worker holding a finished result died since: Dask recomputes it.
                outcome = fut.result()
            except (Exception, asyncio.CancelledError) as exc:
                error: BaseException = exc
            else:
                yield job.key, outcome
                continue
            # The task raised outside its own guard, or its worker died too often (KilledWorker).
            errored.add(job.key)
            upstream = [k for d in job.deps for k in (d if isinstance(d, list) else [d]) if k]
            if any(k in errored for k in upstream):
                yield job.key, SlideOutcome(job.slide_id, job.stage, "blocked", reason="an earlier stage crashed")
                continue
            reason = failure_reason(error)
            status.record(self._out(job), job.slide_id, job.stage, "failed", reason=reason)
            yield job.key, SlideOutcome(job.slide_id, job.stage, "failed", reason=reason)

    def clean_partials(self, out: str) -> int:
        """Remove dead writers' partials on each worker host other than this one.

        Only a process on the writer's host can tell whether its pid still runs, so one
        worker per other host looks (:func:`~wsi_mil.io.atomic.remove_orphan_partials`).
        Returns how many were removed; never fails the run.
        """
        from wsi_mil.io.atomic import host_tag, remove_orphan_partials

        try:
            tags = self.client.run(host_tag)  # {worker address: its host}
            one: dict[str, str] = {}
            for addr, tag in tags.items():
                if tag != host_tag():
                    one.setdefault(tag, addr)
            if not one:
                return 0
            removed = self.client.run(remove_orphan_partials, out, workers=list(one.values()))
            return int(sum(removed.values()))
        except Exception:  # a worker gone meanwhile: the next run looks again
            return 0

    @staticmethod
    def _out(job: Job) -> str:
        return str(job.args[0])


class open_executor:  # noqa: N801 - used like a function
    """Context manager yielding an executor: sequential, an existing cluster, or a LocalCluster."""

    def __init__(self, cfg: CohortConfig, where: str | None, echo: Callable[[str], None]) -> None:
        self.cfg, self.where, self.echo = cfg, where, echo
        self._close: list[Any] = []

    def __enter__(self) -> Sequential | DaskExecutor:
        if self.where == "sequential":
            self.echo("running in this process (scheduler: sequential)")
            return Sequential()
        from distributed import Client

        if self.where:
            try:
                if self.where.endswith(".json"):
                    client = Client(scheduler_file=self.where, timeout="20s")
                else:
                    client = Client(self.where, timeout="20s")
            except OSError as exc:
                raise ConfigError(f"cannot reach the Dask scheduler at {self.where} ({exc})") from exc
            self._close.append(client)
            n = len(client.scheduler_info()["workers"])
            self.echo(f"Dask scheduler {self.where}: {n} worker(s)")
        else:
            cluster = _local_cluster(self.cfg)
            self._close.append(cluster)
            client = Client(cluster)
            self._close.insert(0, client)
            n = len(cluster.worker_spec)
            client.wait_for_workers(n, timeout=120)
            dash = f", dashboard {client.dashboard_link}" if self.cfg.cluster.dashboard else ""
            self.echo(f"Dask LocalCluster: {n} worker process(es){dash}")
        ex = DaskExecutor(client)
        needs_gpu = self.cfg.extract.device.startswith("cuda") and "extract" in self.cfg.stages
        if needs_gpu and not ex.gpu_workers and client.scheduler_info()["workers"]:
            raise ConfigError(
                f"{self.cfg.source}: extract.device is {self.cfg.extract.device} but no Dask worker declares a "
                "GPU resource; start GPU workers with `dask worker ... --resources GPU=1`"
            )
        return ex

    def __exit__(self, *exc: object) -> None:
        for obj in self._close:
            with contextlib.suppress(Exception):  # closing must not hide the run's own error
                obj.close()


def _local_cluster(cfg: CohortConfig) -> Any:
    """One worker process per core (1 thread each), plus one ``GPU=1`` worker per GPU."""
    import logging
    import os

    from distributed import LocalCluster, Nanny

    c = cfg.cluster
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_gpu = c.gpu_workers
    if n_gpu < 0:
        n_gpu = _visible_gpus() if _gpu_stage(cfg) else 0
    n_cpu = c.n_workers or max(1, cores - n_gpu)
    cluster = LocalCluster(
        n_workers=n_cpu,
        threads_per_worker=c.threads_per_worker,
        processes=True,
        memory_limit=c.memory_limit,
        dashboard_address=":0" if c.dashboard else None,
        silence_logs=logging.ERROR,
    )
    if n_gpu:
        base = dict(cluster.new_spec["options"])
        for g in range(n_gpu):
            cluster.worker_spec[f"gpu-{g}"] = {
                "cls": Nanny,
                "options": {**base, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(g)}},
            }
        cluster.scale(len(cluster.worker_spec))
    return cluster


def _gpu_stage(cfg: CohortConfig) -> bool:
    return ("extract" in cfg.stages and cfg.extract.device != "cpu") or (
        "train" in cfg.stages and cfg.train.device != "cpu"
    )


def _visible_gpus() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # no usable CUDA runtime
        return 0
