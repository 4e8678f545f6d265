"""One per-slide executor for every stage: time the work, isolate failures, record status.

``tile_cohort``, ``extract_cohort``, ``predict_cohort``, ``heatmap_cohort`` and the Dask
tasks of ``wsi-mil run`` all call :func:`run_step` for one slide and stage; the sequential
commands loop with :func:`run_slides`. A stage supplies only the work itself, returning a
:class:`SlideOutcome`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wsi_mil.errors import WsiMilError
from wsi_mil.harness import status

#: Outcome states. ``done``/``empty``/``failed`` are written to status.csv; ``skipped``
#: (complete from an earlier run), ``not_retried`` (failed earlier, no --retry-failed) and
#: ``blocked`` (an earlier stage of the slide did not finish) are only reported.
RECORDED = ("done", "empty", "failed")


@dataclass
class SlideOutcome:
    """What one stage did to one slide.

    Parameters
    ----------
    slide_id, stage : str
        Which slide (``"*"`` for cohort-level stages such as ``train``) and stage.
    state : str
        ``done``, ``empty``, ``failed``, ``skipped``, ``not_retried`` or ``blocked``.
    reason : str
        Why it failed or was empty (one line).
    n_patches : int, optional
        Patches tiled / encoded / diagnosed.
    seconds : float
        Wall time of the work (0: measured by :func:`run_step`).
    detail : str
        Free text kept in status.csv (timings, throughput).
    note : str
        A line for the user (printed by the cohort loop), e.g. a warning.
    result : object
        The stage's own result (``TileResult``, ``ExtractResult``, a prediction row, ...).
    """

    slide_id: str
    stage: str
    state: str
    reason: str = ""
    n_patches: int | None = None
    seconds: float = 0.0
    detail: str = ""
    note: str = ""
    result: Any = None


def failure_reason(exc: BaseException) -> str:
    """One line naming the cause: a ``SlideError``'s reason, a ``WsiMilError``'s message, or type + text."""
    reason = getattr(exc, "reason", None) or (
        str(exc) if isinstance(exc, WsiMilError) else f"{type(exc).__name__}: {exc}"
    )
    return " ".join(str(reason).split())


def run_step(
    out: str | Path,
    slide_id: str,
    stage: str,
    work: Callable[[], SlideOutcome],
    *,
    record: bool = True,
) -> SlideOutcome:
    """Run one slide's work for one stage; any exception becomes a ``failed`` outcome.

    Parameters
    ----------
    out : path-like
        Cohort folder whose ``status.csv`` receives the row.
    slide_id, stage : str
        Row key in status.csv.
    work : callable
        Does the work and returns the outcome (or raises).
    record : bool
        Write ``done``/``empty``/``failed`` outcomes to ``OUT/status.csv``.

    Examples
    --------
    >>> run_step("out", "a", "tile", lambda: SlideOutcome("a", "tile", "done"))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    try:
        outcome = work()
    except Exception as exc:  # a bad slide, or an unexpected bug, must not stop the cohort
        outcome = SlideOutcome(slide_id, stage, "failed", reason=failure_reason(exc))
    if not outcome.seconds:
        outcome.seconds = time.perf_counter() - t0
    if record and outcome.state in RECORDED:
        status.record(
            out,
            slide_id,
            stage,
            outcome.state,
            reason=outcome.reason,
            n_patches=outcome.n_patches,
            seconds=outcome.seconds,
            detail=outcome.detail,
        )
    return outcome


class Summary(Protocol):
    """Anything with the per-state lists of a stage summary."""

    done: list[str]
    empty: list[str]
    skipped: list[str]
    failed: dict[str, str]
    results: dict[str, Any]


@dataclass
class StageSummary:
    """Outcome of one stage over a cohort."""

    done: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def add_outcome(summary: Summary, outcome: SlideOutcome) -> None:
    """File ``outcome`` under its state in ``summary``."""
    sid = outcome.slide_id
    if outcome.state == "failed":
        summary.failed[sid] = outcome.reason
        return
    if outcome.state in ("done", "empty"):
        (summary.done if outcome.state == "done" else summary.empty).append(sid)
        if outcome.result is not None:
            summary.results[sid] = outcome.result
    elif outcome.state == "skipped":
        summary.skipped.append(sid)


def report(outcome: SlideOutcome, echo: Callable[[str], None]) -> None:
    """Print a failed outcome's reason, and any note."""
    if outcome.state == "failed":
        echo(f"{outcome.slide_id}: failed: {outcome.reason}")
    if outcome.note:
        echo(f"{outcome.slide_id}: {outcome.note}")


def run_slides(
    out: str | Path,
    stage: str,
    slide_ids: Sequence[str],
    work: Callable[[str], SlideOutcome],
    summary: Summary,
    *,
    echo: Callable[[str], None],
    progress: bool = True,
    label: str | None = None,
) -> Summary:
    """Run ``work(slide_id)`` for every slide in this process, one after another.

    Parameters
    ----------
    out : path-like
        Cohort folder (status.csv).
    stage : str
        Stage name recorded in status.csv.
    slide_ids : sequence of str
        The slides, in order.
    work : callable
        ``work(slide_id) -> SlideOutcome``; may raise.
    summary : StageSummary-like
        Receives every outcome.
    echo : callable
        Receives failures and notes.
    progress : bool
        Show a per-slide progress bar.
    label : str, optional
        Progress bar text (default: the stage name).
    """
    for sid in track(list(slide_ids), label or stage, progress):
        outcome = run_step(out, sid, stage, lambda sid=sid: work(sid))
        add_outcome(summary, outcome)
        report(outcome, echo)
    return summary


def track(items: list[Any], label: str, enabled: bool) -> Iterable[Any]:
    """A transient rich progress bar over ``items`` (plain iteration when off or < 2 items)."""
    if not enabled or len(items) < 2:
        return items
    from rich.progress import track as rich_track

    return rich_track(items, description=label, transient=True)
