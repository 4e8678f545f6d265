"""Stage 4 over many slides: ``wsi-mil predict`` (new slides) and ``wsi-mil heatmap`` (stored bags)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import WsiMilError
from wsi_mil.harness.lock import locks_output
from wsi_mil.harness.runner import SlideOutcome, StageSummary, run_slides
from wsi_mil.io.layout import Layout
from wsi_mil.io.run_folder import load_settings, read_trained
from wsi_mil.predict.settings import RUNTIME_FIELDS
from wsi_mil.predict.slide import cached_model, predict_slide, resolve_heatmap_options, write_predictions_csv

#: The status store's stage name of ``wsi-mil predict`` and ``wsi-mil heatmap`` alike.
STAGE = "predict"


@dataclass
class PredictSummary(StageSummary):
    """Outcome of stage 4 over a cohort: a :class:`~wsi_mil.harness.runner.StageSummary` and its table.

    Attributes
    ----------
    rows : list of dict
        One row per slide: prediction and probabilities, or ``status`` failed and ``error``.
    failed : dict
        Slide id → reason, for every stage (tile, extract, predict).
    csv : Path or None
        The predictions (``predict``) or index (``heatmap``) CSV.
    case_csv : Path or None
        ``case_predictions.csv`` when the slide CSV had a ``case_id`` column (``predict``).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    csv: Path | None = None
    case_csv: Path | None = None


def _quiet(_: str) -> None:
    pass


def _predict_slides(
    out: Path,
    run_dir: Path,
    slide_ids: list[str],
    paths: Mapping[str, Path],
    options: Any,
    summary: PredictSummary,
    echo: Callable[[str], None],
    progress: bool,
) -> None:
    """:func:`predict_slide` for each slide through the harness; each outcome becomes a row."""
    model = cached_model(str(run_dir.resolve()))

    def work(sid: str) -> SlideOutcome:
        row = predict_slide(out, run_dir, sid, paths.get(sid), heatmap_options=options, model=model)
        detail = f"{run_dir.name}: {row['prediction']}"
        return SlideOutcome(sid, STAGE, "done", n_patches=row["n_patches"], detail=detail, result=row)

    run_slides(out, STAGE, slide_ids, work, summary, echo=echo, progress=progress, label="predict + heatmaps")
    for sid in slide_ids:
        if sid in summary.failed:
            summary.rows.append({"slide_id": sid, "status": "failed", "error": summary.failed[sid]})
        else:
            summary.rows.append({**summary.results[sid], "status": "ok", "error": ""})


def _check_score(options: Any, run_dir: Path) -> None:
    """Refuse a heatmap score the model has no class for, before any slide is processed."""
    import numpy as np

    from wsi_mil.heatmaps.scores import select_score
    from wsi_mil.predict.slide import cached_model

    classes = list(cached_model(str(run_dir.resolve())).classes)
    try:
        select_score(options.score, np.zeros(1), np.zeros((1, len(classes))), classes)
    except WsiMilError as exc:
        raise type(exc)(f"{run_dir}: {exc}") from exc


def check_precision(device: str, precision: str, settings: Any) -> str:
    """The precision new bags are made in: the training bags' own, refused where it cannot run.

    A run trained on bf16/fp16 bags (a GPU) cannot be matched by a CPU, where extraction is
    exact fp32; its features differ, so predicting there is refused before any slide is tiled.
    """
    from wsi_mil.errors import ConfigError
    from wsi_mil.features.runtime import resolve_device, resolve_precision

    dev = resolve_device(device)  # an unusable device is its own one-line error
    try:
        return resolve_precision(precision, dev)
    except ConfigError as exc:
        raise ConfigError(
            f"{settings.path}: {settings.run} was trained on {precision} bags, which this machine cannot "
            f"make ({exc}); predict where a GPU is (device cuda), or retrain on fp32 bags"
        ) from exc


def _write_case_predictions(
    rows: list[dict[str, Any]], cases: Mapping[str, str], run_dir: Path, path: Path
) -> Path:
    """Add ``case_id`` to each slide row and write the per-case diagnosis (mean of its slides).

    Failed slides get their case id but do not count towards their case; a case none of
    whose slides was diagnosed is absent from the case table.
    """
    import numpy as np

    from wsi_mil.io.atomic import atomic_path
    from wsi_mil.mil.train import case_table
    from wsi_mil.predict.slide import cached_model

    classes = list(cached_model(str(run_dir.resolve())).classes)
    for r in rows:
        r["case_id"] = cases.get(r["slide_id"], r["slide_id"])
    ok = [r for r in rows if r.get("status") == "ok"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in ok]).reshape(len(ok), len(classes))
    df = case_table([r["case_id"] for r in ok], None, probs, classes)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def merge_index(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The rows of an existing index whose slides are not in ``rows``, then ``rows``."""
    import csv

    if not path.is_file():
        return rows
    new = {r["slide_id"] for r in rows}
    with path.open(newline="", encoding="utf-8") as fh:
        kept = [dict(r) for r in csv.DictReader(fh) if r["slide_id"] not in new]
    return [*kept, *rows]


def mark_trained_on(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """Set ``trained_on`` per row: the same slide (id *and* file content) is in the run's ``splits.csv``.

    A slide is identified by its id and its content fingerprint
    (:func:`~wsi_mil.io.provenance.slide_fingerprint`), so a different file that happens
    to share a training slide's name is not in-sample; where either side has no
    fingerprint (runs or bags from older versions) the id alone decides. Returns those ids.
    """
    from wsi_mil.io.provenance import SLIDE_FINGERPRINT

    trained = read_trained(run_dir)
    for row in rows:
        sid, mine = row["slide_id"], str(row.get(SLIDE_FINGERPRINT) or "")
        theirs = trained.get(sid)
        row["trained_on"] = theirs is not None and (not theirs or not mine or theirs == mine)
    return [r["slide_id"] for r in rows if r["trained_on"]]


@locks_output("wsi-mil predict")
def predict_cohort(
    slides: list[str | Path],
    run_dir: str | Path,
    out: str | Path,
    *,
    mpp: float | None = None,
    heatmap_config: str | Path | None = None,
    heatmap_overrides: Mapping[str, Any] | None = None,
    extract_overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = _quiet,
    progress: bool = True,
) -> PredictSummary:
    """Diagnose new slides: tile and extract them as the model's bags were made, then predict.

    Parameters
    ----------
    slides : list
        Files, folders and CSVs (see :func:`~wsi_mil.harness.inputs.collect_slides`).
    run_dir : path-like
        ``OUT/models/<run>`` of a trained run (its ``pipeline.yaml`` gives the settings).
    out : path-like
        Output folder: ``patches/``, ``features/``, ``heatmaps/<run>/`` and
        ``predictions.csv`` (one row per slide, failed slides with their reason).
    mpp : float, optional
        Level-0 µm/px for slides without it in their metadata.
    heatmap_config, heatmap_overrides : optional
        Heatmap preset/file and flag values (``configs/heatmap/``).
    extract_overrides : mapping, optional
        Speed settings of extraction only (device, batch_size, workers,
        backend, compile); the encoder and its weights always come from the model.
    overwrite : bool
        Redo slides already tiled and extracted in ``out``.

    Examples
    --------
    >>> s = predict_cohort(["new_slides/"], "cohort/models/run1", "diagnosis")  # doctest: +SKIP
    >>> s.csv  # doctest: +SKIP
    PosixPath('diagnosis/predictions.csv')
    """
    from wsi_mil.config import load_config
    from wsi_mil.features import extract_cohort
    from wsi_mil.features.extract import ExtractConfig
    from wsi_mil.harness.inputs import collect_slides
    from wsi_mil.tiling.cohort import check_mpp, tile_cohort

    check_mpp(mpp)
    run_dir, out = Path(run_dir), Path(out)
    settings = load_settings(run_dir)
    cached_model(str(run_dir.resolve()))  # a damaged run is refused before any slide is tiled
    options = resolve_heatmap_options(heatmap_config, heatmap_overrides)
    _check_score(options, run_dir)
    bad = sorted(k for k, v in (extract_overrides or {}).items() if v is not None and k not in RUNTIME_FIELDS)
    if bad:
        raise WsiMilError(f"{settings.path}: {', '.join(bad)} come from the model and cannot be changed at predict")
    # The extraction flags are checked now, not after every slide has been tiled.
    ext_cfg = load_config(ExtractConfig, "extract", settings.path, dict(extract_overrides or {}))
    check_precision(ext_cfg.device, ext_cfg.precision, settings)
    inputs = collect_slides(list(slides))
    if not inputs:
        raise WsiMilError(f"no slides found in {', '.join(map(str, slides))}")
    echo(f"predict: {len(inputs)} slide(s) with {settings.run} ({settings.encoder}); settings from {settings.path}")
    tiled = tile_cohort(
        list(slides), out, config=settings.path, mpp=mpp, overwrite=overwrite, echo=echo, progress=progress
    )
    summary = PredictSummary(failed=dict(tiled.failed))
    for sid in tiled.empty:
        summary.failed[sid] = "no tissue found: zero patches"
    ready = [i.slide_id for i in inputs if i.slide_id not in summary.failed]
    if ready:
        ext = extract_cohort(
            out,
            settings.encoder,
            weights=settings.weights,
            config=settings.path,
            overrides=dict(extract_overrides or {}),
            slide_ids=ready,
            overwrite=overwrite,
            echo=echo,
            progress=progress,
        )
        summary.failed.update(ext.failed)
        for sid in ext.empty:
            summary.failed[sid] = "no readable patches"
    summary.rows = [{"slide_id": s, "status": "failed", "error": r} for s, r in summary.failed.items()]
    paths = {i.slide_id: i.path for i in inputs}
    ids = [i.slide_id for i in inputs if i.slide_id not in summary.failed]
    _predict_slides(out, run_dir, ids, paths, options, summary, echo, progress)
    seen = mark_trained_on(summary.rows, run_dir)
    if seen:
        echo(
            f"warning: {len(seen)} slide(s) were in the training cohort of {settings.run} "
            f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}): their probabilities are in-sample"
        )
    cases = {i.slide_id: i.case_id for i in inputs if i.case_id}
    if cases:
        summary.case_csv = _write_case_predictions(summary.rows, cases, run_dir, Layout(out).case_predictions)
    summary.csv = write_predictions_csv(summary.rows, Layout(out).predictions)
    ok = len(summary.rows) - len(summary.failed)
    echo(
        f"predict: {ok} slide(s) diagnosed, {len(summary.failed)} failed → {summary.csv}; "
        f"heatmaps in {Layout(out).heatmap_dir(settings.run)}"
    )
    return summary


@locks_output("wsi-mil heatmap", create=False)
def heatmap_cohort(
    out: str | Path,
    run_dir: str | Path,
    *,
    slide_ids: list[str] | None = None,
    heatmap_config: str | Path | None = None,
    heatmap_overrides: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = _quiet,
    progress: bool = True,
) -> PredictSummary:
    """Heatmaps of slides whose bags are stored in ``OUT`` (e.g. the training cohort).

    Writes ``OUT/heatmaps/<run>/<id>.*`` and ``OUT/heatmaps/<run>/index.csv``; the index
    marks slides the run was trained on (``trained_on``): their ensemble probabilities are
    not an honest estimate — ``models/<run>/predictions.csv`` holds the out-of-fold ones.

    Examples
    --------
    >>> heatmap_cohort("cohort", "cohort/models/run1", heatmap_overrides={"zarr": True})  # doctest: +SKIP
    """
    out, run_dir = Path(out), Path(run_dir)
    layout = Layout(out)
    settings = load_settings(run_dir)
    cached_model(str(run_dir.resolve()))  # a damaged run is refused before any slide is read
    options = resolve_heatmap_options(heatmap_config, heatmap_overrides)
    _check_score(options, run_dir)
    bag_dir = layout.bags_dir(settings.encoder)
    ids = slide_ids if slide_ids is not None else sorted(p.stem for p in bag_dir.glob("*.h5"))
    if not ids:
        raise WsiMilError(f"{bag_dir}: no feature bags; run `wsi-mil extract --out {out}` first")
    echo(f"heatmap: {len(ids)} slide(s) with {settings.run}")
    summary = PredictSummary()
    _predict_slides(out, run_dir, ids, {}, options, summary, echo, progress)
    hm_dir = layout.heatmap_dir(settings.run)
    hm_dir.mkdir(parents=True, exist_ok=True)
    # Rendering a subset updates its rows; the index keeps every slide rendered before.
    rows = merge_index(summary.rows, layout.heatmap_index(settings.run))
    mark_trained_on(rows, run_dir)
    summary.csv = write_predictions_csv(rows, layout.heatmap_index(settings.run))
    echo(f"heatmap: {len(summary.rows) - len(summary.failed)} done, {len(summary.failed)} failed → {hm_dir}")
    return summary
