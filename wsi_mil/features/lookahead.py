"""Slides one after another without starving the model: the next slide's readers start early.

:class:`Extractor` runs the slides of one process (the whole cohort, or what one device's
process takes from a shared queue). When the first batch of slide *i* reaches the model it
prepares slide *i + 1* — reads its patch file, checks what is still to do, opens its
pyramid — and starts its readers, which then read and prefetch while slide *i*'s
remaining batches run. A slide that needs nothing (every bag complete) or cannot be
prepared is passed over and the next one taken; its outcome (``skipped``, or the error)
is reported in its turn, so failures stay isolated per slide exactly as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.features.pipeline import SlideReader, Target, Timeline, encode_slide
from wsi_mil.harness.runner import SlideOutcome, run_step
from wsi_mil.io.layout import Layout

if TYPE_CHECKING:
    from wsi_mil.features.extract import ExtractConfig, ExtractResult
    from wsi_mil.features.runtime import Runner
    from wsi_mil.io.h5 import PatchFile

STAGE = "extract"


def plan_slide(
    out: Path, sid: str, runners: Sequence[Runner], cfg: ExtractConfig, overwrite: bool = False
) -> tuple[list[Target], PatchFile]:
    """Which encoders still need a bag of slide ``sid``; and its patch file, read once.

    A complete bag is reused only if made from this patch file with this encoder, weights
    and precision (and its ``.pt`` exists when asked for); one made differently is refused,
    naming what changed.

    Raises
    ------
    StaleOutputError
        A complete bag was made differently (pass ``overwrite``).
    """
    from wsi_mil.features.extract import bag_inputs, is_extracted
    from wsi_mil.io import h5
    from wsi_mil.io.provenance import check

    layout = Layout(out)
    patches = h5.read_patches(layout.patches(sid))  # read once: row count and provenance
    n_tiled = len(patches.coords)
    targets = []
    for runner in runners:
        name = runner.encoder.name
        bag, pt = layout.bag(name, sid), layout.pt(name, sid)
        if not overwrite and is_extracted(bag):
            attrs = h5.read_bag(bag, load_features=False).attrs
            check(sid, bag, attrs, bag_inputs(patches.attrs, runner))
            if (not cfg.pt or pt.exists()) and is_extracted(bag, runner.encoder.weights_id, n_tiled):
                continue
        targets.append(Target(runner, bag, pt if cfg.pt else None))
    return targets, patches


@dataclass
class _Job:
    """One slide of the run: what to write, its reader, or why it cannot run."""

    sid: str
    targets: list[Target] = field(default_factory=list)
    reader: SlideReader | None = None
    error: BaseException | None = None


class Extractor:
    """Run stage 2 over slides in one process, starting each slide's readers early.

    Parameters
    ----------
    out : path-like
        Cohort folder.
    runners : sequence of Runner
        The encoders, all on one device; each patch is read once for all of them.
    cfg : ExtractConfig
        Reading settings.
    overwrite : bool
        Redo slides that already have complete bags.
    progress : bool
        A bar over each slide's patches.
    lookahead : bool
        Start the next slide's readers at the current slide's first batch (False: only
        when its turn comes; the benchmark compares the two).

    Examples
    --------
    >>> ex = Extractor("out", [Runner(create_encoder("texture"))], ExtractConfig("texture"))  # doctest: +SKIP
    >>> ex.run(["a", "b"], print)  # doctest: +SKIP
    >>> ex.timeline.events[:2]  # doctest: +SKIP
    [(0.41, 'open', 'a'), (0.52, 'first', 'a')]
    """

    def __init__(
        self,
        out: str | Path,
        runners: Sequence[Runner],
        cfg: ExtractConfig,
        *,
        overwrite: bool = False,
        progress: bool = False,
        lookahead: bool = True,
    ) -> None:
        self.out, self.runners, self.cfg = Path(out), list(runners), cfg
        self.overwrite, self.progress, self.lookahead = overwrite, progress, lookahead
        self.timeline = Timeline()
        self._ids: Iterator[str] = iter(())
        self._ahead: deque[_Job] = deque()

    def run(self, slide_ids: Iterable[str], on_outcome: Callable[[SlideOutcome], None]) -> None:
        """Extract every slide of ``slide_ids`` (taken one at a time), reporting each outcome."""
        self._ids = iter(slide_ids)
        try:
            while True:
                job = self._ahead.popleft() if self._ahead else self._take()
                if job is None:
                    return
                on_outcome(run_step(self.out, job.sid, STAGE, lambda job=job: self._work(job)))
        finally:
            while self._ahead:
                job = self._ahead.popleft()
                if job.reader is not None:
                    job.reader.close()

    def _take(self) -> _Job | None:
        sid = next(self._ids, None)
        if sid is None:
            return None
        job = _Job(sid)
        try:
            job.targets, patches = plan_slide(self.out, sid, self.runners, self.cfg, self.overwrite)
            if job.targets:
                runners = [t.runner for t in job.targets]
                pfile = Layout(self.out).patches(sid)
                job.reader = SlideReader(pfile, runners, self.cfg, patches=patches)
        except Exception as exc:  # reported in the slide's own turn, as its failure
            job.error = exc
        return job

    def _start(self, job: _Job) -> None:
        assert job.reader is not None
        try:
            job.reader.start()
        except Exception as exc:
            job.reader.close()
            job.reader, job.error = None, exc
            return
        self.timeline.mark("open", job.sid)

    def _prefetch(self) -> None:
        """Start the readers of the next slide that has work (called at a first batch)."""
        if not self.lookahead or any(j.reader is not None for j in self._ahead):
            return
        while (job := self._take()) is not None:
            self._ahead.append(job)
            if job.reader is not None:
                self._start(job)
                return

    def _work(self, job: _Job) -> SlideOutcome:
        if job.error is not None:
            raise job.error
        if job.reader is None:
            return SlideOutcome(job.sid, STAGE, "skipped")
        if not job.reader.started:
            self._start(job)
            if job.error is not None:
                raise job.error
        reader, job.reader = job.reader, None
        with slide_bar(job.sid, reader.n, self.progress) as tick:
            res = encode_slide(
                reader, job.targets, progress=tick, timeline=self.timeline, on_first_batch=self._prefetch
            )
        return outcome(res)


def outcome(res: ExtractResult) -> SlideOutcome:
    """The status row of one extracted slide (throughput, encoders, gap before it)."""
    detail = f"{res.patches_per_s:.1f} patches/s; {','.join(res.encoders)}; gap {res.gap_s:.2f} s"
    note = ""
    if res.n_unreadable:
        detail += f"; {res.n_unreadable} unreadable patches dropped"
        note = f"{res.n_unreadable} unreadable patch(es) dropped from the bag"
    return SlideOutcome(
        res.slide_id,
        STAGE,
        res.state,
        reason="" if res.state == "done" else "no patches to extract",
        n_patches=res.n_patches,
        seconds=res.seconds,
        detail=detail,
        note=note,
        result=res,
    )


class slide_bar:  # noqa: N801 - used like a function
    """A transient rich progress bar over one slide's patches (a no-op when disabled)."""

    def __init__(self, sid: str, total: int, enabled: bool) -> None:
        self.sid, self.total, self.enabled = sid, total, enabled and total > 0
        self._p: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.start()
        task = self._p.add_task(f"extract {self.sid}", total=self.total)
        return lambda done: self._p.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()
