"""Stage 2 on several devices: one process per device, slides from one shared queue.

``wsi-mil extract --devices cuda:0,cuda:1`` starts one *spawned* process per device (never
forked: the parent may hold a CUDA context). Each sees only its own GPU —
``CUDA_VISIBLE_DEVICES`` set to that one index before anything touches CUDA, so it runs on
``cuda`` (its device 0) — and a CPU entry sees none (``CUDA_VISIBLE_DEVICES=""``). The
processes take slide ids from one queue as they finish, so a fast device simply takes more
slides; each process runs the usual :class:`~wsi_mil.features.lookahead.Extractor` (the
next slide taken from the queue and its readers started at the current slide's first
batch) and records each slide's status row itself. The parent holds OUT's lock for the
whole run (the processes write on its behalf, :func:`~wsi_mil.harness.lock.delegated`),
reports the outcomes, and writes ``status.csv`` at the end. A process that dies takes only
the slide it held with it: that slide is reported failed, the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue as queue_mod
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.errors import ConfigError, WsiMilError

if TYPE_CHECKING:
    from wsi_mil.features.extract import ExtractConfig
    from wsi_mil.harness.runner import SlideOutcome

_DEVICE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")
#: Seconds between checks that the device processes are alive while waiting for results.
POLL_S = 0.5


def parse_devices(spec: str | Sequence[str]) -> list[str]:
    """``"cuda:0,cuda:1"`` → ``["cuda:0", "cuda:1"]``; entries are ``cpu`` or ``cuda[:N]``.

    Raises
    ------
    ConfigError
        An entry is neither, CPU and GPU entries are mixed (their bags would differ in
        precision), or a GPU is named that this machine does not have.

    Examples
    --------
    >>> parse_devices("cpu, cpu")
    ['cpu', 'cpu']
    >>> parse_devices("cuda")  # doctest: +SKIP
    ['cuda:0']
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    devs = []
    for raw in items:
        d = str(raw).strip()
        m = _DEVICE.match(d)
        if m is None:
            raise ConfigError(f"--devices: {d!r} is not a device (give cpu, cuda:0, cuda:1, ... separated by commas)")
        devs.append("cpu" if d == "cpu" else f"cuda:{m.group(2) or 0}")
    if not devs:
        raise ConfigError("--devices: no device given")
    if len({d.split(":")[0] for d in devs}) > 1:
        raise ConfigError(
            f"--devices: {','.join(devs)} mixes cpu and cuda, whose bags differ in precision; give one kind"
        )
    gpus = sorted({int(d.split(":")[1]) for d in devs if d != "cpu"})
    if gpus:
        import torch

        count = torch.cuda.device_count()  # asks the driver; creates no CUDA context
        if gpus[-1] >= count:
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f" (CUDA_VISIBLE_DEVICES={env})" if env is not None else ""
            raise ConfigError(f"--devices: cuda:{gpus[-1]} asked for but {count} GPU(s) are visible here{seen}")
    return devs


def visible_devices(device: str) -> tuple[str, str]:
    """``(CUDA_VISIBLE_DEVICES, torch device)`` of a device process.

    The index is of the GPUs this process sees, so an inherited ``CUDA_VISIBLE_DEVICES``
    (a SLURM allocation) is mapped through, not bypassed.

    Examples
    --------
    >>> visible_devices("cpu")
    ('', 'cpu')
    """
    if device == "cpu":
        return "", "cpu"
    from wsi_mil.features.runtime import physical_gpu

    return physical_gpu(int(device.split(":")[1])), "cuda"


def _threads_per_process(devices: Sequence[str]) -> int:
    """Torch threads of each CPU device process: the usable CPUs shared between them."""
    from wsi_mil.features.extract import usable_cpus

    n_cpu = sum(d == "cpu" for d in devices)
    return max(1, usable_cpus() // max(1, n_cpu))


def run_on_devices(
    out: Path,
    slide_ids: Sequence[str],
    cfg: ExtractConfig,
    devices: Sequence[str],
    *,
    overwrite: bool = False,
    on_outcome: Callable[[SlideOutcome], None],
    echo: Callable[[str], None] = print,
    dims: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Extract ``slide_ids`` with one spawned process per entry of ``devices``.

    Parameters
    ----------
    out : Path
        Cohort folder; the caller holds its lock.
    slide_ids : sequence of str
        The slides; each is taken by exactly one process.
    cfg : ExtractConfig
        Settings (``device`` is replaced by each process's own).
    devices : sequence of str
        From :func:`parse_devices`.
    on_outcome : callable
        Receives every slide's outcome, in the order they finish.
    echo : callable
        Receives one line per device once its encoders are ready.
    dims : dict, optional
        Filled with each encoder's output width.

    Returns
    -------
    list of dict
        One per process that started: ``device``, ``visible`` (its
        ``CUDA_VISIBLE_DEVICES``), ``gpus_seen`` (GPUs torch saw there) and ``what``.

    Raises
    ------
    WsiMilError
        A device process could not build its encoders (the message is its error).
    """
    import multiprocessing

    from wsi_mil.harness import status
    from wsi_mil.harness.runner import SlideOutcome

    ctx = multiprocessing.get_context("spawn")
    tasks: Any = ctx.Queue()
    results: Any = ctx.Queue()
    for sid in slide_ids:
        tasks.put(sid)
    for _ in devices:
        tasks.put(None)  # one end mark per process
    threads = _threads_per_process(devices)
    fields = dataclasses.asdict(cfg)
    procs = []
    for i, dev in enumerate(devices):
        args = (str(out), i, dev, fields, overwrite, threads, tasks, results)
        p = ctx.Process(target=_device_main, args=args, name=f"wsi-mil extract {dev}", daemon=False)
        p.start()
        procs.append(p)
    pending = set(slide_ids)
    held: dict[int, set[str]] = {i: set() for i in range(len(procs))}  # taken, not yet reported
    finished = False
    ready: list[dict[str, Any]] = []

    def fail(sid: str, reason: str) -> None:
        pending.discard(sid)
        status.record(out, sid, "extract", "failed", reason=reason)
        on_outcome(SlideOutcome(sid, "extract", "failed", reason=reason))

    def settle(kind: str, i: int, payload: Any) -> None:
        if kind == "fatal":
            raise WsiMilError(str(payload))
        if kind == "ready":
            if dims is not None:
                dims.update(payload.pop("dims"))
            ready.append({"device": devices[i], **payload})
            echo(f"extract: {devices[i]} ready: {payload['what']}")
        elif kind == "took":
            held[i].add(payload)
        elif kind == "outcome":
            held[i].discard(payload.slide_id)
            pending.discard(payload.slide_id)
            on_outcome(payload)

    try:
        while pending:
            try:
                settle(*results.get(timeout=POLL_S))
                continue
            except queue_mod.Empty:
                pass
            if not any(p.is_alive() for p in procs):
                with contextlib.suppress(queue_mod.Empty):
                    while True:  # what the last process sent before it ended
                        settle(*results.get(timeout=POLL_S))
            for i, p in enumerate(procs):
                if not p.is_alive() and held[i]:  # died holding slides: only those are lost
                    for sid in sorted(held[i]):
                        fail(sid, f"the {devices[i]} process died (exit code {p.exitcode}) while it held this slide")
                    held[i].clear()
            if not any(p.is_alive() for p in procs):
                for sid in sorted(pending):
                    fail(sid, "no device process left to extract it")
        finished = True
    finally:
        for p in procs:
            p.join(timeout=30 if finished else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        status.export_status(out)  # the processes recorded their rows; the table follows
    return ready


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no orphan writing on)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _device_main(
    out: str,
    index: int,
    device: str,
    fields: dict[str, Any],
    overwrite: bool,
    threads: int,
    tasks: Any,
    results: Any,
) -> None:
    """Entry point of one device process (spawned): build the encoders, then take slides."""
    visible, local = visible_devices(device)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before anything initialises CUDA
    _die_with_parent()
    from wsi_mil.features.cohort import make_runner, write_settings
    from wsi_mil.features.decoding import check_decode
    from wsi_mil.features.extract import ExtractConfig
    from wsi_mil.features.lookahead import Extractor
    from wsi_mil.harness.lock import delegated

    try:
        import torch

        if local == "cpu":
            torch.set_num_threads(threads)
        cfg = dataclasses.replace(ExtractConfig(**fields), device=local)
        runners = [make_runner(cfg, n) for n in cfg.encoders]
        check_decode(cfg.decode, runners[0].device)
        with delegated(out):
            write_settings(Path(out), cfg, runners)
    except Exception as exc:  # a bad encoder or weights: the parent stops the run with it
        results.put(("fatal", index, " ".join(str(exc).split()) or type(exc).__name__))
        return
    what = ", ".join(f"{r.encoder.name} ({r.encoder.dim}-d)" for r in runners)
    results.put(("ready", index, {
        "dims": {r.encoder.name: r.encoder.dim for r in runners},
        "visible": os.environ["CUDA_VISIBLE_DEVICES"],
        "gpus_seen": torch.cuda.device_count(),
        "what": f"{what} on {runners[0].device.type} {runners[0].precision}",
    }))  # fmt: skip

    def take() -> Any:
        while (sid := tasks.get()) is not None:
            results.put(("took", index, sid))
            yield sid

    with delegated(out):
        Extractor(out, runners, cfg, overwrite=overwrite).run(take(), lambda o: results.put(("outcome", index, o)))
