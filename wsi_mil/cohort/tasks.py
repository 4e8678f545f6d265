"""The tasks ``wsi-mil run`` sends to Dask workers: one per slide and stage, plus training.

Tasks take only paths, strings and plain dict configs, and open slides, encoders and
models themselves (encoders and models are cached per worker process). Each returns a
:class:`~wsi_mil.harness.runner.SlideOutcome` and never raises: failures are outcomes,
recorded in the status store by the worker through :func:`~wsi_mil.harness.runner.run_step`.

Resuming: a (slide, stage) is skipped when its status row says ``done``/``empty`` *and* its
outputs are complete; a ``failed`` one is not retried unless ``retry_failed``. An output
without a status row (the worker died between writing it and recording it) is redone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsi_mil.errors import WsiMilError
from wsi_mil.harness.runner import SlideOutcome, run_step

log = logging.getLogger(__name__)

#: Upstream states after which a slide's next stage can run.
READY = ("done", "skipped")
TRAIN_ROW = "*"  # slide_id of cohort-level rows in the status store


def current_row(out: str | Path, sid: str, stage: str) -> dict[str, str] | None:
    """The status row of (``sid``, ``stage``) as it is now (one small file read, whatever the cohort)."""
    from wsi_mil.harness import status

    return status.get(out, sid, stage)


def gate(
    out: str | Path, sid: str, stage: str, retry_failed: bool, complete: Callable[[], bool]
) -> SlideOutcome | None:
    """The outcome without running (skipped / not retried), or None to run the work.

    The status row is read when the task runs, not when it was planned, so a task that
    Dask runs again (its worker died after it finished) finds its own row and skips.
    """
    prev = current_row(out, sid, stage)
    state = (prev or {}).get("state", "")
    if state in ("done", "empty") and complete():
        n = (prev or {}).get("n_patches") or ""
        return SlideOutcome(sid, stage, "skipped", n_patches=int(n) if n.isdigit() else None, detail=state)
    if state == "failed" and not retry_failed:
        return SlideOutcome(sid, stage, "not_retried", reason=(prev or {}).get("reason", ""))
    return None


def blocked(sid: str, stage: str, upstream: SlideOutcome | None, allow_empty: bool = True) -> SlideOutcome | None:
    """A ``blocked`` outcome when the slide's previous stage did not leave usable output."""
    if upstream is None:
        return None
    ok = upstream.state in (*READY, "empty") if allow_empty else upstream.state in READY
    if not allow_empty and upstream.state == "skipped" and upstream.detail == "empty":
        ok = False
    if ok:
        return None
    why = {"empty": "no patches", "not_retried": "failed earlier"}.get(upstream.state, upstream.state)
    return SlideOutcome(sid, stage, "blocked", reason=f"{upstream.stage} {why}")


def set_torch_threads(threads: int, slots_by_host: Mapping[str, int] | None = None) -> int:
    """Torch CPU threads for this task: ``threads``, or the host's cores / its task slots."""
    import torch

    n = threads
    if n <= 0:
        from wsi_mil.features.runtime import usable_cpus

        cores = usable_cpus()  # affinity and cgroup quota, not the machine's core count
        slots = 1
        try:
            from distributed import get_worker

            w = get_worker()
            host = w.address.rsplit(":", 1)[0].split("://")[-1]
            slots = (slots_by_host or {}).get(host) or w.state.nthreads
        except (ImportError, ValueError):
            pass  # not in a Dask worker: the whole process
        n = max(1, cores // max(1, slots))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def task_device(device: str) -> str:
    """The device a task uses here: ``auto`` on a Dask worker without a ``GPU`` resource is cpu.

    Outside Dask (or on a worker declaring ``GPU``), ``device`` is returned unchanged;
    ``auto`` then means CUDA when a GPU is visible.
    """
    if device != "auto":
        return device
    try:
        from distributed import get_worker

        resources = get_worker().state.total_resources
    except (ImportError, ValueError):
        return device  # not in a Dask worker
    return device if resources.get("GPU", 0) > 0 else "cpu"


_DAEMONIC = (
    "daemonic Dask worker: patches read in the task's own process (no reader processes); "
    "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False or --no-nanny"
)
_said: set[str] = set()


def reader_note() -> tuple[str, bool]:
    """Why extraction reads in the task's own process here ("" when readers can start), and
    whether this is the first time this process says it (then it is also logged).

    A daemonic process cannot start children (DataLoader readers): a Dask worker under a
    Nanny is daemonic unless ``distributed.worker.daemon`` is False.
    """
    import multiprocessing

    if not multiprocessing.current_process().daemon:
        return "", False
    first = _DAEMONIC not in _said
    if first:
        _said.add(_DAEMONIC)
        log.warning(_DAEMONIC)
    return _DAEMONIC, first


# --------------------------------------------------------------------------- tile


def tile_task(
    out: str,
    slide: Mapping[str, Any],
    tile_cfg: Mapping[str, Any],
    mpp: float | None,
    retry_failed: bool,
    overwrite: bool = False,
) -> SlideOutcome:
    """Tile one slide (``slide``: ``path``, ``slide_id``, ``mpp``); ``overwrite`` redoes one made differently."""
    from wsi_mil.config import from_mapping
    from wsi_mil.harness.inputs import SlideInput
    from wsi_mil.tiling.cohort import STAGE, tile_one
    from wsi_mil.tiling.run import TileConfig, is_tiled, patches_path, tile_inputs

    sid, outp = str(slide["slide_id"]), Path(out)
    cfg = from_mapping(TileConfig, tile_cfg, "tile")
    item = SlideInput(Path(slide["path"]), sid, slide.get("mpp"))
    given = item.mpp if item.mpp is not None else mpp

    def complete() -> bool:  # finished, and made from this slide file with these settings
        try:
            # Existence first: the slide is fingerprinted only when there is an output to compare.
            return patches_path(outp, sid).exists() and is_tiled(outp, sid, tile_inputs(cfg, item.path, given))
        except WsiMilError:  # slide unreadable: the work reports it as this slide's failure
            return False

    early = gate(outp, sid, STAGE, retry_failed, complete)
    if early is not None:
        return early

    def work() -> SlideOutcome:
        # Not overwrite: an output made differently is refused, naming what changed.
        return tile_one(item, outp, cfg, mpp=mpp, overwrite=overwrite)

    return run_step(outp, sid, STAGE, work)


# --------------------------------------------------------------------------- extract


@functools.lru_cache(maxsize=2)
def cached_runner(cfg: Any) -> Any:
    """The encoder of ``cfg`` (an ExtractConfig), built once per worker process."""
    from wsi_mil.features.registry import create_encoder
    from wsi_mil.features.runtime import Runner

    enc = create_encoder(cfg.encoder, weights=cfg.weights)
    return Runner(enc, cfg.device, cfg.precision, cfg.fold_bn, cfg.channels_last, cfg.compile)


def extract_task(
    upstream: SlideOutcome | None,
    out: str,
    sid: str,
    extract_cfg: Mapping[str, Any],
    retry_failed: bool,
    threads: int = 0,
    slots_by_host: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> SlideOutcome:
    """Extract one slide's bag once its tiling is done; ``overwrite`` redoes one made differently.

    On a worker without a ``GPU`` resource, ``device: auto`` runs on cpu (:func:`task_device`).
    On a daemonic worker, patches are read without reader processes, and the outcome's
    detail and note say so (:func:`reader_note`).
    """
    from wsi_mil.config import dump_config, from_mapping
    from wsi_mil.features.cohort import STAGE, extract_one
    from wsi_mil.features.extract import ExtractConfig, bag_inputs, is_extracted
    from wsi_mil.io.layout import Layout

    stop = blocked(sid, STAGE, upstream)
    if stop is not None:
        return stop
    outp = Path(out)
    layout = Layout(outp)
    cfg = from_mapping(ExtractConfig, extract_cfg, "extract")
    cfg = replace(cfg, device=task_device(cfg.device))

    def complete() -> bool:  # finished, and made from this patch file with this encoder and precision
        from wsi_mil.io import h5

        patches = h5.read_patches(layout.patches(sid))
        runner = cached_runner(cfg)
        return is_extracted(
            layout.bag(cfg.encoder, sid), runner.encoder.weights_id, len(patches.coords),
            bag_inputs(patches.attrs, runner),
        )

    early = gate(outp, sid, STAGE, retry_failed, complete)
    if early is not None:
        return early

    def work() -> SlideOutcome:
        set_torch_threads(threads, slots_by_host)
        runner = cached_runner(cfg)
        note, first = reader_note()
        run_cfg = replace(cfg, workers=0) if note else cfg
        desc = layout.extract_config(cfg.encoder)
        if not desc.exists():
            dump_config(desc, {"extract": cfg, "encoder": {**runner.encoder.attrs(), **runner.describe()}})
        outcome = extract_one(outp, sid, runner, run_cfg, overwrite=overwrite)
        if note:
            outcome.detail = f"{outcome.detail}; {note}" if outcome.detail else note
            if first:  # the user hears it once per worker, the status row tells it per slide
                outcome.note = outcome.note or note
        return outcome

    return run_step(outp, sid, STAGE, work)


# --------------------------------------------------------------------------- train


def train_task(
    bags: Sequence[SlideOutcome | None],
    out: str,
    labels: str,
    encoder: str,
    train_cfg: Mapping[str, Any],
    cohort_ids: Sequence[str],
    retry_failed: bool,
    threads: int = 0,
) -> SlideOutcome:
    """Train the MIL run on every labelled slide of the cohort that has a non-empty bag."""
    from wsi_mil.io.layout import Layout
    from wsi_mil.mil.config import config_from_dict

    outp = Path(out)
    cfg = config_from_dict(dict(train_cfg), "train")
    cfg = replace(cfg, device=task_device(cfg.device))
    run_dir = Layout(outp).run_dir(cfg.run_name)
    if run_dir.is_dir():  # written atomically: it exists only complete
        stale = _stale_run(run_dir, outp, labels, encoder, cfg, bags, cohort_ids)
        if stale:

            def refuse() -> SlideOutcome:
                raise WsiMilError(stale)

            return run_step(outp, TRAIN_ROW, "train", refuse)  # recorded as failed, with the reason
        return SlideOutcome(TRAIN_ROW, "train", "skipped", detail=str(run_dir), result=str(run_dir))
    prev = current_row(outp, TRAIN_ROW, "train") or {}
    if prev.get("state") == "failed" and not retry_failed:
        return SlideOutcome(TRAIN_ROW, "train", "not_retried", reason=prev.get("reason", ""))

    def work() -> SlideOutcome:
        import torch

        from wsi_mil.harness.lock import delegated
        from wsi_mil.io.layout import encoder_dirname
        from wsi_mil.mil.data import read_labels, write_labels
        from wsi_mil.mil.train import train_run

        table = read_labels(labels)
        usable, left_out = _usable(table, outp, encoder, bags, cohort_ids)
        if not usable:
            raise ValueError(f"{labels}: no labelled slide of the cohort has a feature bag")
        csv = Layout(outp).train_labels
        write_labels(csv, table, usable)  # case_id kept: folds stay grouped by patient
        from wsi_mil.features.runtime import usable_cpus

        torch.set_num_threads(threads if threads > 0 else usable_cpus())
        with delegated(outp):  # train_run takes OUT's lock, which the run that sent this task holds
            path = train_run(outp, csv, encoder_dirname(encoder), cfg, progress=False)
        note = f"{len(left_out)} labelled slide(s) without a usable bag left out of training" if left_out else ""
        return SlideOutcome(
            TRAIN_ROW, "train", "done", n_patches=len(usable), detail=str(path), note=note, result=str(path)
        )

    return run_step(outp, TRAIN_ROW, "train", work)


def _usable(
    table: Any, outp: Path, encoder: str, bags: Sequence[SlideOutcome | None], cohort_ids: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Rows of the label table to train on (in the cohort, with a non-empty bag) and the others."""
    from wsi_mil.io.layout import Layout

    upstream = {b.slide_id: b for b in bags if b is not None}
    usable, left_out = [], []
    for i, sid in enumerate(table.slide_ids):
        b = upstream.get(sid)
        ok = sid in cohort_ids and (b is None or b.state in READY) and _n_rows(Layout(outp).bag(encoder, sid)) > 0
        (usable if ok else left_out).append(i)
    return usable, left_out


def _stale_run(
    run_dir: Path,
    outp: Path,
    labels: str,
    encoder: str,
    cfg: Any,
    bags: Sequence[SlideOutcome | None],
    cohort_ids: Sequence[str],
) -> str:
    """Why an existing run folder was not made from these bags, labels and settings ("" if it was)."""
    from wsi_mil.errors import WsiMilError
    from wsi_mil.io.h5 import read_bag
    from wsi_mil.io.layout import Layout
    from wsi_mil.io.provenance import digest
    from wsi_mil.io.run_folder import read_model_spec
    from wsi_mil.mil.data import LabelTable, read_labels
    from wsi_mil.mil.train import run_inputs

    try:
        made = read_model_spec(run_dir).get("provenance", "")
        table = read_labels(labels)
        usable, _ = _usable(table, outp, encoder, bags, cohort_ids)
        sub = LabelTable(
            [table.slide_ids[i] for i in usable], table.y[usable], table.classes, [table.case_ids[i] for i in usable]
        )
        attrs = [read_bag(Layout(outp).bag(encoder, s), load_features=False).attrs for s in sub.slide_ids]
    except (OSError, ValueError, WsiMilError) as exc:
        return f"{run_dir}: cannot check how it was trained ({exc}); give the run another run_name"
    if made == digest(run_inputs(sub, attrs, cfg)):
        return ""
    return (
        f"{run_dir} was trained on other bags, labels or settings than this run would use; "
        "give train.run_name a new name (or remove the folder) to train again"
    )


def _n_rows(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["features"].shape[0])
    except (OSError, KeyError, TypeError, AttributeError, IndexError):  # damaged: counted as empty
        return 0


# --------------------------------------------------------------------------- heatmap / predict


def heatmap_task(
    upstream: SlideOutcome | None,
    trained: SlideOutcome | None,
    out: str,
    run_dir: str,
    sid: str,
    slide_path: str | None,
    options: Mapping[str, Any],
    retry_failed: bool,
    threads: int = 0,
    slots_by_host: Mapping[str, int] | None = None,
) -> SlideOutcome:
    """Diagnose one slide with the run and write its heatmaps (``OUT/heatmaps/<run>/<id>.*``)."""
    from wsi_mil.io.layout import Layout

    stage = "heatmap"
    if trained is not None and trained.state not in READY:
        return SlideOutcome(sid, stage, "blocked", reason="training did not finish")
    stop = blocked(sid, stage, upstream, allow_empty=False)
    if stop is not None:
        return stop
    outp, run = Path(out), Path(run_dir).name
    paths = Layout(outp).heatmap_paths(run, sid)
    early = gate(outp, sid, stage, retry_failed, lambda: paths["h5"].is_file() and paths["png"].is_file())
    if early is not None:
        if early.state == "skipped":
            early.result = _stored_row(paths["h5"], sid)
        return early

    def work() -> SlideOutcome:
        from wsi_mil.predict import predict_slide

        set_torch_threads(threads, slots_by_host)
        row = predict_slide(outp, run_dir, sid, slide_path, heatmap_options=dict(options))
        return SlideOutcome(
            sid, stage, "done", n_patches=int(row["n_patches"]), detail=f"{run}: {row['prediction']}", result=row
        )

    return run_step(outp, sid, stage, work)


def _stored_row(path: Path, sid: str) -> dict[str, Any] | None:
    """The prediction row kept in a heatmap file's attributes (for slides skipped on resume)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            n = int(f["coords"].shape[0]) if "coords" in f else 0
    except (OSError, KeyError, TypeError, AttributeError, IndexError):  # damaged: no stored row to report
        return None

    def plain(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else (v.item() if hasattr(v, "item") else v)

    row: dict[str, Any] = {"slide_id": sid, "prediction": plain(a.get("prediction", ""))}
    try:
        row.update({k: float(plain(v)) for k, v in a.items() if k.startswith("prob_")})
    except (TypeError, ValueError):  # an edited attribute: no stored row to report
        return None
    row["n_patches"] = n
    row["precision"] = str(plain(a.get("precision", "")))
    return row
