"""One slide through one or several encoders: each patch read and decoded once, one bag each.

A :class:`SlideReader` is a slide made ready to stream: its patch file read, its pyramid
known, and — once :meth:`SlideReader.start` is called — its reader processes running and
prefetching. Starting is separate from encoding so that the cohort loop can start the next
slide's readers while the current slide's last batches run (:mod:`wsi_mil.features.lookahead`).

Several encoders share one read. All of them read the finest pyramid level any of them
needs; when their input sizes differ the readers hand over the patch as read at that level
and each encoder's copy is resized from it *in the reader processes*, with the same filter
a single-encoder run uses — so where the encoders choose the same level (224 and 160 px
from a 256 px patch, say) every bag is bitwise the one a single-encoder run writes.
:func:`encode_slide` writes one bag per encoder, each in its own temporary file renamed
when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_mil.errors import SlideError
from wsi_mil.features.decoding import MultiSizeStream, resize_on_device, resolve_decode

if TYPE_CHECKING:
    from wsi_mil.features.extract import ExtractConfig, ExtractResult
    from wsi_mil.features.reader import ReadPlan
    from wsi_mil.features.runtime import Runner
    from wsi_mil.io.h5 import PatchFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One encoder's output for one slide: the runner and where its bag (and ``.pt``) go."""

    runner: Runner
    bag: Path
    pt: Path | None = None


@dataclass
class Timeline:
    """Events of one process's extraction run, in seconds since it began.

    ``events`` holds ``(seconds, event, slide_id)`` with events ``open`` (the slide's readers
    started), ``first`` (its first batch reached the model), ``last`` (the model finished
    its last batch); ``model_idle_since`` is the clock time the model last finished a batch.
    """

    t0: float = field(default_factory=time.perf_counter)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    model_idle_since: float | None = None

    def mark(self, event: str, slide_id: str, t: float | None = None) -> float:
        """Record ``event`` of ``slide_id`` at clock time ``t`` (now by default)."""
        t = time.perf_counter() if t is None else t
        self.events.append((t - self.t0, event, slide_id))
        return t


class SlideReader:
    """One slide ready to stream patches for ``runners`` (all on one device).

    Parameters
    ----------
    patch_file : path-like
        ``OUT/patches/<id>.h5``.
    runners : sequence of Runner
        The encoders the patches are for; the read serves all of them.
    cfg : ExtractConfig
        Reading settings (backend, workers, supertile, batch_size, decode).
    slide_path : path-like, optional
        The slide, if not where tiling found it.
    patches : PatchFile, optional
        ``patch_file`` already read.

    Raises
    ------
    SlideError
        The slide file is missing or cannot be opened.
    """

    def __init__(
        self,
        patch_file: str | Path,
        runners: Sequence[Runner],
        cfg: ExtractConfig,
        slide_path: str | Path | None = None,
        patches: PatchFile | None = None,
    ) -> None:
        from wsi_mil.features.reader import ReadPlan
        from wsi_mil.io import h5
        from wsi_mil.slide import open_slide
        from wsi_mil.tiling.grid import best_level

        pf = patches if patches is not None else h5.read_patches(patch_file)
        self.pf, self.cfg = pf, cfg
        self.sid = str(pf.attrs.get(h5.ATTR_NAME) or Path(patch_file).stem)
        src = Path(slide_path or pf.attrs.get("slide_path") or "")
        if not src.exists():  # a file, or a DICOM WSI's folder
            raise SlideError(self.sid, f"slide file {src} not found (moved since tiling?)")
        # Open once here for the pyramid only; closed before the readers start, so no
        # reader inherits this handle. With backend "auto" the readers use the backend
        # that opened the slide here, so the supertile default fits the reader used.
        with open_slide(src, backend=cfg.backend) as slide:
            downsamples, self.backend_used = slide.level_downsamples, slide.backend_name
        size0 = pf.patch_size_level0
        self.sizes = tuple(sorted({r.encoder.preprocess.input_size for r in runners}))
        # The finest level any encoder needs serves them all.
        self.level = min(best_level(downsamples, size0 / s) for s in self.sizes)
        ds = float(downsamples[self.level])
        raw = max(1, round(size0 / ds))
        size = self.sizes[0] if len(self.sizes) == 1 else raw
        self.plan: ReadPlan = ReadPlan(str(src), self.backend_used, None, self.level, ds, size0, size)
        self.supertile = cfg.supertile_for(self.backend_used)
        self.device = runners[0].device
        self.decode = resolve_decode(cfg.decode, self.device, self.sid, str(src), self.level)
        self._it: Iterator[Any] | None = None
        self._loader: Any = None

    @property
    def n(self) -> int:
        """Patches tiled."""
        return len(self.pf.coords)

    @property
    def started(self) -> bool:
        """Whether the readers run (:meth:`start` was called)."""
        return self._it is not None

    def start(self) -> None:
        """Start the readers: worker processes begin reading and prefetching batches."""
        if self._it is not None:
            return
        if self.n == 0:
            self._it = iter(())
            return
        if self.decode == "gpu":
            from wsi_mil.features.gpu_decode import GpuJpegStream

            self._it = iter(GpuJpegStream(self.plan, self.pf.coords, self.cfg.batch_size, self.device))
            return
        from wsi_mil.features.extract import resolve_workers
        from wsi_mil.features.reader import PatchStream, make_groups, make_loader

        groups = make_groups(self.pf.coords, self.pf.patch_size_level0, self.supertile)
        stream: Any = PatchStream(self.plan, self.pf.coords, groups, self.cfg.batch_size)
        if len(self.sizes) > 1:
            stream = MultiSizeStream(stream, self.sizes)
        cuda = self.device.type == "cuda"
        self._loader = make_loader(stream, resolve_workers(self.cfg.workers, cuda), pin_memory=cuda)
        self._it = iter(self._loader)

    def batches(self) -> Iterator[tuple[dict[int, Any], np.ndarray, np.ndarray]]:
        """``({input size: images}, rows, failed)`` per batch; starts the readers if needed."""
        self.start()
        assert self._it is not None
        for images, rows, failed in self._it:
            if not isinstance(images, dict):
                images = {self.sizes[0]: images}
            elif self.decode == "gpu":  # a GPU batch at the read size: resize on the device
                images = {s: resize_on_device(images, s) for s in self.sizes}
            yield images, _numpy(rows), _numpy(failed)

    def attrs_for(self, runner: Runner) -> dict[str, Any]:
        """The bag attributes of ``runner``'s bag, but for the counts known at the end."""
        from wsi_mil.features.extract import bag_inputs
        from wsi_mil.io.provenance import PROVENANCE, stamp

        enc = runner.encoder
        return {
            **self.pf.attrs,
            **enc.attrs(),
            **runner.describe(),
            "backend": self.cfg.backend,
            "backend_used": self.backend_used,
            "read_level": self.level,
            "read_size": self.plan.size_at_level,
            "supertile": self.supertile,
            "decode": self.decode,
            "n_patches_tiled": self.n,
            "patches_provenance": str(self.pf.attrs.get(PROVENANCE, "")),
            **stamp(bag_inputs(self.pf.attrs, runner)),
        }

    def close(self) -> None:
        """Stop the readers (a DataLoader's worker processes) if they run."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()


def _numpy(t: Any) -> np.ndarray:
    return t.cpu().numpy() if hasattr(t, "numpy") else np.asarray(t, dtype=np.int64)


def encode_slide(
    reader: SlideReader,
    targets: Sequence[Target],
    *,
    progress: Callable[[int], None] | None = None,
    timeline: Timeline | None = None,
    on_first_batch: Callable[[], None] | None = None,
) -> ExtractResult:
    """Encode one slide's patches with every target's encoder; one bag each, atomically.

    Parameters
    ----------
    reader : SlideReader
        The slide (started or not; it is closed at the end).
    targets : sequence of Target
        Encoders (on ``reader``'s device) and their output paths.
    progress : callable, optional
        Called with the number of patches done after each batch.
    timeline : Timeline, optional
        Receives ``first`` and ``last`` events; the gap before the first batch is counted
        from ``timeline.model_idle_since`` (the previous slide's last batch) when set.
    on_first_batch : callable, optional
        Called once, when the first batch has arrived (the cohort loop starts the next
        slide's readers there).

    Raises
    ------
    SlideError
        More than ``cfg.max_unreadable`` of the slide is unreadable.

    Examples
    --------
    >>> r = Runner(create_encoder("texture"))  # doctest: +SKIP
    >>> encode_slide(SlideReader("out/patches/a.h5", [r], cfg), [Target(r, Path("a.h5"))])  # doctest: +SKIP
    """
    from wsi_mil.features.extract import ExtractResult, write_pt
    from wsi_mil.features.writer import BagWriter
    from wsi_mil.io.atomic import atomic_path

    tl = timeline if timeline is not None else Timeline()
    t0 = time.perf_counter()
    cfg, sid, n = reader.cfg, reader.sid, reader.n
    limit = int(math.floor(cfg.max_unreadable * n))
    gap = wait = 0.0
    last_done: float | None = None
    try:
        with contextlib.ExitStack() as stack:
            writers = []
            for t in targets:
                tmp = stack.enter_context(atomic_path(t.bag))
                writers.append(stack.enter_context(BagWriter(tmp, reader.pf.coords, t.runner.encoder.dim)))
            done = 0
            asked = time.perf_counter()
            for images, rows, failed in reader.batches():
                got = time.perf_counter()
                wait += got - asked
                if last_done is None:  # the first batch
                    idle = tl.model_idle_since
                    gap = got - (idle if idle is not None else t0)
                    tl.mark("first", sid, got)
                    if on_first_batch is not None:
                        on_first_batch()
                if len(failed):
                    for w in writers:
                        w.mark_failed(failed)
                    if writers[0].n_failed > limit:
                        raise SlideError(
                            sid,
                            f"{writers[0].n_failed} of {n} patches unreadable (more than "
                            f"{cfg.max_unreadable:.0%}); the slide file is damaged",
                        )
                if len(rows):
                    for t, w in zip(targets, writers, strict=True):
                        w.write(rows, t.runner(images[t.runner.encoder.preprocess.input_size]))
                last_done = time.perf_counter()
                done += len(rows) + len(failed)
                if progress is not None:
                    progress(done)
                asked = time.perf_counter()
            if last_done is not None:
                tl.mark("last", sid, last_done)
                tl.model_idle_since = last_done
            n_failed = writers[0].n_failed if writers else 0
            kept = n - n_failed
            for t, w in zip(targets, writers, strict=True):
                attrs = reader.attrs_for(t.runner)
                attrs.update(n_patches=kept, n_unreadable=n_failed, unreadable_share=n_failed / n if n else 0.0)
                kept = w.finish(attrs)
    finally:
        reader.close()
    if n_failed:
        log.warning("%s: %d of %d patches unreadable, dropped from the bag", sid, n_failed, n)
    for t in targets:
        if t.pt is not None:
            write_pt(t.bag, t.pt)
    dt = time.perf_counter() - t0
    return ExtractResult(
        sid,
        "done" if kept else "empty",
        kept,
        n_failed,
        dt,
        kept / dt if dt else 0.0,
        encoders=tuple(t.runner.encoder.name for t in targets),
        gap_s=gap,
        wait_s=wait,
    )
