"""``wsi-mil run``: every stage over a cohort, one task per slide, on Dask; resumable.

:func:`run_cohort` plans a task graph — per slide ``tile → extract → heatmap``, and one
``train`` task that waits for every bag — and runs it on an embedded ``LocalCluster``, an
existing Dask scheduler, or (``scheduler="sequential"``) in this process. Workers record
each (slide, stage) in the status store (``OUT/.status``, see :mod:`wsi_mil.harness.status`);
this process holds the output folder's lock, prints progress and a summary, writes the
cohort-level CSVs and ``OUT/status.csv``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.cohort.config import CohortConfig
from wsi_mil.cohort.executors import Job, open_executor
from wsi_mil.errors import WsiMilError
from wsi_mil.harness import status
from wsi_mil.harness.runner import SlideOutcome
from wsi_mil.io.layout import Layout

COUNTED = ("done", "empty", "skipped", "failed", "not_retried", "blocked")


@dataclass
class StageReport:
    """What one stage did in a run: counts per state, failures, and time."""

    stage: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    failed: dict[str, str] = field(default_factory=dict)
    earlier: set[str] = field(default_factory=set)  # failed in an earlier run, not retried
    task_seconds: float = 0.0  # summed over tasks that ran (done, empty, failed)
    first_start: float | None = None
    last_end: float | None = None
    n_patches: int = 0

    def add(self, o: SlideOutcome, t_end: float) -> None:
        self.counts[o.state] = self.counts.get(o.state, 0) + 1
        if o.state in ("failed", "not_retried"):
            self.failed[o.slide_id] = o.reason
            if o.state == "not_retried":
                self.earlier.add(o.slide_id)
        if o.state in ("done", "empty", "failed"):
            self.task_seconds += o.seconds
            self.first_start = min(self.first_start or t_end, t_end - o.seconds)
            self.last_end = max(self.last_end or t_end, t_end)
        if o.state == "done" and o.n_patches:
            self.n_patches += o.n_patches

    @property
    def wall_seconds(self) -> float:
        """From the stage's first task start to its last task end (0 if nothing ran)."""
        return 0.0 if self.first_start is None else float((self.last_end or 0) - self.first_start)


@dataclass
class RunSummary:
    """Outcome of :func:`run_cohort`.

    Attributes
    ----------
    out : Path
        The cohort folder.
    stages : dict
        :class:`StageReport` per stage run.
    run_dir : Path or None
        The model run used or trained.
    seconds : float
        Wall time of the whole run.
    n_slides : int
        Slides in the cohort.
    """

    out: Path
    stages: dict[str, StageReport] = field(default_factory=dict)
    run_dir: Path | None = None
    seconds: float = 0.0
    n_slides: int = 0
    outcomes: list[SlideOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no slide failed (now or in an earlier run without --retry-failed)."""
        return not any(r.failed for r in self.stages.values())

    @property
    def failures(self) -> dict[tuple[str, str], str]:
        """``(stage, slide_id) → reason`` of every failure."""
        return {(s, sid): why for s, r in self.stages.items() for sid, why in r.failed.items()}

    def lines(self) -> list[str]:
        """The summary table and failures, as lines of text."""
        cols = ("done", 5), ("empty", 5), ("skipped", 7), ("failed", 6), ("blocked", 7), ("task s", 8), ("wall s", 8)
        head = f"{'stage':<8} " + " ".join(f"{c:>{w}}" for c, w in cols)
        rows = [head, "-" * len(head)]
        for name, r in self.stages.items():
            c = r.counts
            rows.append(
                f"{name:<8} {c['done']:>5} {c['empty']:>5} {c['skipped']:>7} {c['failed'] + c['not_retried']:>6} "
                f"{c['blocked']:>7} {r.task_seconds:>8.1f} {r.wall_seconds:>8.1f}"
            )
        rows.append(f"{self.n_slides} slide(s) in {self.seconds:.1f} s → {self.out}")
        for (stage, sid), why in sorted(self.failures.items()):
            earlier = " (in an earlier run)" if sid in self.stages[stage].earlier else ""
            rows.append(f"  {sid}: {stage} failed{earlier}: {why}")
        if any(r.counts["not_retried"] for r in self.stages.values()):
            rows.append("  slides that failed in an earlier run were not retried; add --retry-failed to retry them")
        return rows


def clean_partials(out: Path) -> int:
    """Remove the ``.*.partial`` files under ``out`` whose writer is dead (a killed worker's).

    Partials of live processes — a concurrent ``train`` or ``heatmap`` on this host, a
    worker on another host — stay; see :func:`~wsi_mil.io.atomic.remove_orphan_partials`.
    """
    from wsi_mil.io.atomic import remove_orphan_partials

    return remove_orphan_partials(out)


#: Seconds between two exports of status.csv while a run goes on (for people watching it).
EXPORT_EVERY_S = 120.0


def run_cohort(
    cfg: CohortConfig,
    *,
    scheduler: str | None = None,
    retry_failed: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> RunSummary:
    """Run the configured stages over the cohort; resume what an earlier run left.

    Parameters
    ----------
    cfg : CohortConfig
        From :func:`~wsi_mil.cohort.config.load_cohort_config`.
    scheduler : str, optional
        Overrides ``cfg.scheduler``: a Dask address, a scheduler ``.json`` file, or
        ``"sequential"``; None with no ``cfg.scheduler``: an embedded LocalCluster.
    retry_failed : bool
        Also redo (slide, stage) pairs that failed in an earlier run.
    overwrite : bool
        Redo tiles and bags made with other settings or from another slide file (else they
        fail, naming what changed); implies ``retry_failed`` for those stages.
    echo : callable
        Receives progress lines, failures and the summary.
    progress : bool
        Show progress bars (one per stage).

    Returns
    -------
    RunSummary
        Counts, failures and timings per stage; ``summary.ok`` is False if any slide failed.

    Raises
    ------
    OutputLockedError
        Another run holds ``cfg.out``.

    Examples
    --------
    >>> cfg = load_cohort_config("configs/cohort/example.yaml")  # doctest: +SKIP
    >>> summary = run_cohort(cfg, scheduler="tcp://10.0.0.5:8786")  # doctest: +SKIP
    >>> summary.ok  # doctest: +SKIP
    """
    from wsi_mil.config import dump_config
    from wsi_mil.harness.inputs import collect_slides
    from wsi_mil.harness.lock import output_lock

    t0 = time.perf_counter()
    out = Path(cfg.out)
    inputs = collect_slides(list(cfg.slides))
    if not inputs:
        raise WsiMilError(f"{cfg.source}: no slides found in {', '.join(map(str, cfg.slides))}")
    where = scheduler or cfg.scheduler
    with output_lock(out, "wsi-mil run", clean=False):
        n_clean = clean_partials(out)
        if n_clean:
            echo(f"removed {n_clean} incomplete file(s) left by an interrupted run")
        dump_config(Layout(out).run_config, cfg.to_dict())
        if "tile" in cfg.stages:
            dump_config(Layout(out).tile_config, {"tile": cfg.tile})
        summary = RunSummary(out, n_slides=len(inputs))
        summary.run_dir = _run_dir(cfg)
        try:
            with open_executor(cfg, where, echo) as ex:
                jobs = _plan(cfg, inputs, retry_failed, ex.gpu_workers, ex.slots_by_host, overwrite)
                for name in _stage_names(cfg):
                    summary.stages[name] = StageReport(name)
                by_key = {j.key: j for j in jobs}
                exported = time.monotonic()
                with _bars(summary.stages, jobs, progress) as tick:
                    for key, outcome in ex.run(jobs):
                        job = by_key[key]
                        summary.stages[job.stage].add(outcome, time.perf_counter())
                        summary.outcomes.append(outcome)
                        if outcome.state == "failed":
                            echo(f"{outcome.slide_id}: {job.stage} failed: {outcome.reason}")
                        elif outcome.note:
                            echo(f"{outcome.slide_id}: {outcome.note}")
                        tick(job.stage)
                        if time.monotonic() - exported > EXPORT_EVERY_S:
                            status.export_status(out)
                            exported = time.monotonic()
                ex.clean_partials(str(out))  # killed workers' partials on the other hosts
            if any(s in cfg.stages for s in ("heatmap", "predict")) and summary.run_dir is not None:
                _write_tables(cfg, summary, echo)
            clean_partials(out)
        finally:  # workers recorded into the store: the readable table, even after an error
            status.export_status(out)
    summary.seconds = time.perf_counter() - t0
    for line in summary.lines():
        echo(line)
    return summary


def _stage_names(cfg: CohortConfig) -> list[str]:
    names = [s for s in ("tile", "extract", "train") if s in cfg.stages]
    if any(s in cfg.stages for s in ("heatmap", "predict")):
        names.append("heatmap")
    return names


def _run_dir(cfg: CohortConfig) -> Path | None:
    if "train" in cfg.stages:
        return Layout(cfg.out).run_dir(_run_name(cfg))
    return Path(cfg.model) if cfg.model else None


def _run_name(cfg: CohortConfig) -> str:
    from wsi_mil.io.layout import encoder_dirname

    return cfg.train.run_name or f"{encoder_dirname(cfg.extract.encoder)}_{cfg.train.model.name}"


def _plan(
    cfg: CohortConfig,
    inputs: list[Any],
    retry: bool,
    gpu_workers: bool,
    slots: Mapping[str, int],
    overwrite: bool = False,
) -> list[Job]:
    """The task graph, in an order that is also a valid sequential order."""
    import dataclasses

    from wsi_mil.cohort import tasks
    from wsi_mil.config import to_dict

    run = uuid.uuid4().hex[:8]
    threads = cfg.cluster.torch_threads
    jobs: list[Job] = []
    tile_key: dict[str, str | None] = {}
    ext_key: dict[str, str | None] = {}
    ext_gpu = _wants_gpu(cfg.extract.device, gpu_workers)
    for item in inputs:
        sid = item.slide_id
        tile_key[sid] = None
        if "tile" in cfg.stages:
            slide = {"path": str(item.path), "slide_id": sid, "mpp": item.mpp}
            tile_key[sid] = f"tile-{sid}-{run}"
            jobs.append(
                Job(
                    tile_key[sid],
                    "tile",
                    sid,
                    tasks.tile_task,
                    [],
                    (str(cfg.out), slide, to_dict(cfg.tile), cfg.mpp, retry or overwrite, overwrite),
                )
            )
    for item in inputs:
        sid = item.slide_id
        ext_key[sid] = None
        if "extract" in cfg.stages:
            ext_key[sid] = f"extract-{sid}-{run}"
            jobs.append(
                Job(
                    ext_key[sid],
                    "extract",
                    sid,
                    tasks.extract_task,
                    [tile_key[sid]],
                    (str(cfg.out), sid, to_dict(cfg.extract), retry or overwrite, threads, dict(slots), overwrite),
                    {"GPU": 1} if ext_gpu else None,
                )
            )
    train_key = None
    if "train" in cfg.stages:
        train_cfg = dataclasses.replace(cfg.train, run_name=_run_name(cfg))
        train_key = f"train-{run}"
        jobs.append(
            Job(
                train_key,
                "train",
                tasks.TRAIN_ROW,
                tasks.train_task,
                [[k for k in ext_key.values() if k]],
                (
                    str(cfg.out),
                    str(cfg.labels),
                    cfg.extract.encoder,
                    train_cfg.to_dict(),
                    [i.slide_id for i in inputs],
                    retry,
                    threads,
                ),
                {"GPU": 1} if _wants_gpu(cfg.train.device, gpu_workers) else None,
            )
        )
    if any(s in cfg.stages for s in ("heatmap", "predict")):
        run_dir = str(_run_dir(cfg))
        for item in inputs:
            sid = item.slide_id
            jobs.append(
                Job(
                    f"heatmap-{sid}-{run}",
                    "heatmap",
                    sid,
                    tasks.heatmap_task,
                    [ext_key[sid], train_key],
                    (str(cfg.out), run_dir, sid, str(item.path), to_dict(cfg.heatmap), retry, threads, dict(slots)),
                )
            )
    return jobs


def _wants_gpu(device: str, gpu_workers: bool) -> bool:
    return device.startswith("cuda") or (device == "auto" and gpu_workers)


class _bars:  # noqa: N801 - used like a function
    """One rich progress bar per stage (a no-op when disabled)."""

    def __init__(self, stages: Mapping[str, StageReport], jobs: list[Job], enabled: bool) -> None:
        self.totals = {s: sum(j.stage == s for j in jobs) for s in stages}
        self.enabled = enabled
        self._p: Any = None
        self._ids: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda stage: None
        from rich.progress import Progress

        self._p = Progress()
        self._p.start()
        self._ids = {s: self._p.add_task(s, total=n) for s, n in self.totals.items()}
        return lambda stage: self._p.update(self._ids[stage], advance=1)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


# --------------------------------------------------------------------------- cohort tables


def _write_tables(cfg: CohortConfig, summary: RunSummary, echo: Callable[[str], None]) -> None:
    """``OUT/heatmaps/<run>/index.csv`` (every slide) and, for ``predict``, ``OUT/predictions.csv``."""
    from wsi_mil.predict import write_predictions_csv
    from wsi_mil.predict.cohort import mark_trained_on, merge_index

    run_dir = summary.run_dir
    if run_dir is None:
        return
    index = Layout(cfg.out).heatmap_index(run_dir.name)
    new: list[dict[str, Any]] = []
    for o in summary.outcomes:
        if o.stage != "heatmap":
            continue
        if o.state in ("done", "skipped") and isinstance(o.result, Mapping):
            new.append({**o.result, "status": "ok", "error": ""})
        elif o.state in ("failed", "not_retried", "blocked"):
            new.append({"slide_id": o.slide_id, "status": "failed", "error": o.reason or o.state})
    rows = merge_index(new, index)
    if not rows:
        return
    mark_trained_on(rows, run_dir)
    write_predictions_csv(rows, index)
    if "predict" in cfg.stages:
        unseen = [r for r in rows if not r["trained_on"]]
        path = write_predictions_csv(unseen, Layout(cfg.out).predictions)
        echo(f"predictions of {len(unseen)} slide(s) the model did not train on → {path}")
