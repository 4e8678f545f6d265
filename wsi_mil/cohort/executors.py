"""Where ``wsi-mil run`` executes its task graph: this process, an existing Dask cluster, or
an embedded ``LocalCluster`` (one process per core, plus one ``GPU=1`` worker per GPU).

The embedded cluster's workers are not daemonic (``distributed.worker.daemon: False``), so
an extraction task can start its reader processes there; its CPU workers see no GPU
(``CUDA_VISIBLE_DEVICES=""``) and each GPU worker sees only its own.
"""

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
        self._config: Any = None

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
            import dask

            # Read by each Nanny whenever it (re)starts its worker: kept for the cluster's life.
            self._config = dask.config.set({"distributed.worker.daemon": False})
            cluster = _local_cluster(self.cfg)
            self._close.append(cluster)
            client = Client(cluster)
            self._close.insert(0, client)
            n = len(cluster.worker_spec)
            client.wait_for_workers(n, timeout=120)
            dash = f", dashboard {client.dashboard_link}" if self.cfg.cluster.dashboard else ""
            self.echo(f"Dask LocalCluster: {n} worker process(es){dash}")
        ex = DaskExecutor(client)
        if not ex.gpu_workers and client.scheduler_info()["workers"]:
            for stage, device in cuda_stages(self.cfg):
                self.__exit__()
                raise ConfigError(
                    f"{self.cfg.source}: {stage}.device is {device} but no Dask worker declares a GPU "
                    "resource (no GPU visible here, or cluster.gpu_workers 0); start GPU workers with "
                    f"`dask worker ... --resources GPU=1`, or set {stage}.device to auto or cpu"
                )
        return ex

    def __exit__(self, *exc: object) -> None:
        for obj in self._close:
            with contextlib.suppress(Exception):  # closing must not hide the run's own error
                obj.close()
        self._close = []
        if self._config is not None:
            self._config.__exit__(None, None, None)
            self._config = None


def cuda_stages(cfg: CohortConfig) -> list[tuple[str, str]]:
    """(stage, device) of the stages this run sends to CUDA explicitly (``cuda``, ``cuda:N``).

    Such a task needs a worker declaring ``GPU=1``; without one it would wait forever.
    """
    wanted = [("extract", cfg.extract.device), ("train", cfg.train.device)]
    return [(st, dev) for st, dev in wanted if st in cfg.stages and str(dev).startswith("cuda")]


def _local_cluster(cfg: CohortConfig) -> Any:
    """One worker process per usable core (1 thread each), plus one ``GPU=1`` worker per GPU.

    CPU workers get ``CUDA_VISIBLE_DEVICES=""``; GPU worker ``g`` gets the ``g``-th device
    this process sees (:func:`gpu_env`).
    """
    import logging

    from distributed import LocalCluster, Nanny

    from wsi_mil.features.runtime import usable_cpus

    c = cfg.cluster
    cores = usable_cpus()
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
        env={"CUDA_VISIBLE_DEVICES": ""},  # CPU workers never see a GPU
    )
    if n_gpu:
        base = dict(cluster.new_spec["options"])
        for g in range(n_gpu):
            cluster.worker_spec[f"gpu-{g}"] = {
                "cls": Nanny,
                "options": {**base, "resources": {"GPU": 1}, "env": gpu_env(g)},
            }
        cluster.scale(len(cluster.worker_spec))
    return cluster


def gpu_env(g: int, visible: str | None = None) -> dict[str, str]:
    """Environment of GPU worker ``g``: the ``g``-th device of ``CUDA_VISIBLE_DEVICES``.

    Under a scheduler that already restricts this process (``CUDA_VISIBLE_DEVICES=2,3``),
    worker 0 gets device 2, not 0.

    Examples
    --------
    >>> gpu_env(1, "2,3"), gpu_env(1, "")
    ({'CUDA_VISIBLE_DEVICES': '3'}, {'CUDA_VISIBLE_DEVICES': '1'})
    """
    from wsi_mil.features.runtime import physical_gpu

    return {"CUDA_VISIBLE_DEVICES": physical_gpu(g, visible)}


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
