"""``wsi-mil evaluate``: heatmaps of a run scored against per-slide annotations.

Everything is read and scored first; only then are the outputs written, each atomically,
so a malformed annotation or heatmap file leaves EVAL as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.evaluate.annotations import AnnotationError, index_annotations, read_annotation
from wsi_mil.evaluate.metrics import (
    DETECTION_RADIUS,
    SlideDetections,
    average_precision,
    detect,
    dice,
    froc_score,
    roc_auc,
    score_detections,
)
from wsi_mil.evaluate.truth import POSITIVE_SHARE, lesion_map, patch_fractions, patch_labels
from wsi_mil.io.h5 import HeatmapData

ATTENTION = "attention"


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``wsi-mil evaluate`` (``configs/evaluate/default.yaml``).

    Attributes
    ----------
    classes : tuple of str
        Annotation classes (GeoJSON ``classification.name``, XML ``PartOfGroup``) that are
        positive; empty = every annotation (XML: every group but the exclusions).
    threshold : float
        Dice threshold, and the operating point of the per-slide lesion counts: class
        probabilities as they are, attention divided by its slide's maximum.
    mask_mpp : float or None
        µm/px of mask images (else their sidecar ``<id>.json``, else the slide's aspect).
    positive_share : float
        Share of a patch inside the annotation that makes it positive.
    detection_radius : int
        Least distance between two detections (local maxima), in patches.
    """

    classes: tuple[str, ...] = ()
    threshold: float = 0.5
    mask_mpp: float | None = None
    positive_share: float = POSITIVE_SHARE
    detection_radius: int = DETECTION_RADIUS

    def validate(self) -> None:
        """Refuse values out of range (called by the config loader)."""
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.mask_mpp is not None and not (math.isfinite(self.mask_mpp) and self.mask_mpp > 0):
            raise ConfigError(f"mask_mpp must be a positive number, got {self.mask_mpp}")
        if not 0.0 < self.positive_share <= 1.0:
            raise ConfigError(f"positive_share must be in (0, 1], got {self.positive_share}")
        if self.detection_radius < 1:
            raise ConfigError(f"detection_radius must be at least 1 patch, got {self.detection_radius}")


def load_evaluate_config(
    config: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> EvaluateConfig:
    """Preset or YAML file (``configs/evaluate/``), then flag ``overrides`` (None = not given)."""
    from wsi_mil.config import load_config

    return load_config(EvaluateConfig, "evaluate", config, overrides)


@dataclass
class SlideResult:
    """One slide's truth and per-score results."""

    slide_id: str
    annotation: str
    n_patches: int
    labels: np.ndarray  # (N,) 1 / 0 / -1
    n_lesions: int
    n_itc: int
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) in [0, 1]
    detections: dict[str, SlideDetections] = field(default_factory=dict)
    trained_on: bool | None = None  # in the run's training splits (from the run's tables), None = unknown

    @property
    def positive(self) -> bool:
        """True when the slide has a positive patch (the slides ``patch_auc`` and dice average over)."""
        return bool((self.labels == 1).any())


@dataclass
class Evaluation:
    """Everything ``wsi-mil evaluate`` writes: per-slide results and the summary."""

    slides: list[SlideResult]
    score_names: list[str]
    summary: dict[str, dict[str, float]]
    config: EvaluateConfig
    heatmaps: Path
    annotations: Path


def score_values(data: HeatmapData) -> dict[str, np.ndarray]:
    """The scores of a heatmap file, named as in it, each in [0, 1].

    ``attention`` is divided by the slide's highest attention (attention is a distribution
    over one slide's patches; its maximum is what one slide can say); ``prob_<class>`` is the
    instance probability of that class as stored.
    """
    att = np.asarray(data.attention, np.float64)
    top = float(att.max(initial=0.0))
    out = {ATTENTION: att / top if top > 0 else np.zeros_like(att)}
    for k, c in enumerate(data.class_names):
        out[f"prob_{c}"] = np.asarray(data.instance_probs[:, k], np.float64)
    return out


def list_heatmaps(folder: str | os.PathLike[str], slide_ids: Sequence[str] | None = None) -> list[Path]:
    """The ``<id>.h5`` heatmap files of a run's folder, sorted; only ``slide_ids`` when given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WsiMilError(f"{folder}: no such heatmap folder (expected OUT/heatmaps/<run>)")
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if slide_ids is not None:
        have = {p.stem: p for p in files}
        missing = [s for s in slide_ids if s not in have]
        if missing:
            raise WsiMilError(f"{folder}: no heatmap file for slide(s) {', '.join(missing)}")
        files = [have[s] for s in dict.fromkeys(slide_ids)]
    if not files:
        raise WsiMilError(f"{folder}: no heatmap files (<slide_id>.h5); run wsi-mil heatmap or predict first")
    return files


def trained_on(heatmaps: str | os.PathLike[str]) -> dict[str, bool]:
    """Which slides were in the run's training splits, as its tables say (``trained_on`` of
    ``OUT/heatmaps/<run>/index.csv`` and ``OUT/predictions.csv``); unreadable tables say nothing."""
    import pandas as pd

    from wsi_mil.io.layout import Layout

    heatmaps = Path(heatmaps)
    known: dict[str, bool] = {}
    for table in (Layout(heatmaps.parent.parent).predictions, heatmaps / "index.csv"):
        try:
            df = pd.read_csv(table, usecols=["slide_id", "trained_on"], dtype={"slide_id": str})
        except (OSError, ValueError):
            continue
        known.update(
            {str(s): str(t).strip().lower() == "true" for s, t in zip(df["slide_id"], df["trained_on"], strict=True)}
        )
    return known


def evaluate_slide(
    data: HeatmapData, annotation_path: Path | None, slide_id: str, cfg: EvaluateConfig
) -> tuple[SlideResult, tuple[str, ...]]:
    """Truth, scores and detections of one slide; also the classes its annotation file holds."""
    from wsi_mil.io import h5

    try:
        width, height = (int(v) for v in data.attrs[h5.ATTR_SLIDE_DIMENSIONS])
        mpp = float(data.attrs[h5.ATTR_MPP])
        size = data.patch_size_level0
    except (KeyError, TypeError, ValueError) as exc:
        raise WsiMilError(
            f"{slide_id}: heatmap file lacks the slide geometry (slide_dimensions, mpp, patch_size_level0: {exc})"
        ) from exc
    ann = read_annotation(annotation_path, slide_id, mpp, (width, height), cfg.classes, cfg.mask_mpp)
    labels = patch_labels(patch_fractions(ann, data.coords, size), cfg.positive_share)
    lesions = lesion_map(ann, mpp)
    result = SlideResult(
        slide_id, annotation_path.name if annotation_path else "", len(labels), labels,
        len(lesions.lesions), len(lesions.itc),
    )  # fmt: skip
    for name, values in score_values(data).items():
        result.scores[name] = values
        points, det_scores = detect(data.coords, values, size, cfg.detection_radius)
        result.detections[name] = score_detections(points, det_scores, lesions)
    return result, ann.classes


def summarise(slides: Sequence[SlideResult], names: Sequence[str], threshold: float) -> dict[str, dict[str, float]]:
    """``{score: {patch_auc, patch_auc_pooled, average_precision, froc, dice}}`` (see docs/evaluate.md)."""
    summary = {}
    for name in names:
        within = [roc_auc(s.labels[s.labels >= 0], s.scores[name][s.labels >= 0]) for s in slides if s.positive]
        within = [a for a in within if not math.isnan(a)]
        y = np.concatenate([s.labels[s.labels >= 0] for s in slides])
        v = np.concatenate([s.scores[name][s.labels >= 0] for s in slides])
        dices = [dice(s.labels[s.labels >= 0], s.scores[name][s.labels >= 0], threshold) for s in slides if s.positive]
        summary[name] = {
            "patch_auc": float(np.mean(within)) if within else math.nan,
            "patch_auc_pooled": roc_auc(y, v),
            "average_precision": average_precision(y, v),
            "froc": froc_score([s.detections[name] for s in slides]),
            "dice": float(np.mean(dices)) if dices else math.nan,
        }
    return summary


def evaluate_run(
    heatmaps: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    config: EvaluateConfig | None = None,
    echo: Callable[[str], None] | None = None,
    slide_ids: Sequence[str] | None = None,
) -> Evaluation:
    """Score every heatmap file of a run against the annotation folder (nothing is written).

    Parameters
    ----------
    heatmaps : path-like
        ``OUT/heatmaps/<run>`` (its ``<id>.h5`` files).
    annotations : path-like
        Folder of ``<id>.geojson`` / ``<id>.xml`` / ``<id>.png`` / ``<id>.tif``; a slide
        without a file is negative.
    config : EvaluateConfig, optional
        Settings (default: ``configs/evaluate/default.yaml``).
    echo : callable, optional
        Where notes go (annotation files of no heatmapped slide, slides the run trained on).
    slide_ids : sequence of str, optional
        Only these slides (default: every heatmap file).

    Raises
    ------
    WsiMilError
        One line naming the file: a malformed annotation or heatmap file, classes found in
        no file, heatmap files of different classes.

    Examples
    --------
    >>> ev = evaluate_run("out/heatmaps/run1", "annotations")  # doctest: +SKIP
    >>> ev.summary["prob_tumour"]["patch_auc"]  # doctest: +SKIP
    0.97
    """
    from wsi_mil.io.h5 import read_heatmap_data

    cfg = config or load_evaluate_config()
    heatmaps, annotations = Path(heatmaps), Path(annotations)
    files = list_heatmaps(heatmaps, slide_ids)
    seen = trained_on(heatmaps)
    index = index_annotations(annotations)
    slides: list[SlideResult] = []
    names: list[str] | None = None
    found: set[str] = set()
    for path in files:
        data = read_heatmap_data(path)
        sid = path.stem
        try:
            result, classes = evaluate_slide(data, index.get(sid), sid, cfg)
        except AnnotationError:
            raise
        except WsiMilError as exc:
            raise WsiMilError(f"{path}: {exc}") from exc
        found.update(classes)
        if names is None:
            names = list(result.scores)
        elif list(result.scores) != names:
            raise WsiMilError(f"{path}: scores {list(result.scores)} differ from the other slides' {names}; "
                              "evaluate one run's heatmaps at a time")  # fmt: skip
        result.trained_on = seen.get(sid)
        slides.append(result)
    vector = [
        p for s, p in index.items() if p.suffix.lower() in (".geojson", ".xml") and any(r.slide_id == s for r in slides)
    ]
    missing = [c for c in cfg.classes if c not in found]
    if vector and missing:
        raise AnnotationError(f"{annotations}: no annotation of class {', '.join(map(repr, missing))} in any file "
                              f"(classes found: {', '.join(sorted(found)) or 'none'})")  # fmt: skip
    unused = sorted(set(index) - {s.slide_id for s in slides})
    if unused and echo is not None:
        echo(f"note: {len(unused)} annotation file(s) have no heatmap in {heatmaps} (first: {index[unused[0]].name})")
    in_sample = [s.slide_id for s in slides if s.trained_on]
    if in_sample and echo is not None:
        echo(f"note: {len(in_sample)} of {len(slides)} slides were in the run's training splits (in-sample; "
             f"first: {in_sample[0]}); --slides chooses the held-out ones")  # fmt: skip
    assert names is not None  # list_heatmaps returned at least one file
    return Evaluation(slides, names, summarise(slides, names, cfg.threshold), cfg, heatmaps, annotations)


def evaluate(
    heatmaps: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: EvaluateConfig | None = None,
    echo: Callable[[str], None] | None = None,
    slide_ids: Sequence[str] | None = None,
) -> Evaluation:
    """:func:`evaluate_run`, then write ``EVAL/summary.json``, ``per_slide.csv``, ``roc.png``, ``froc.png``.

    See :func:`evaluate_run` for the parameters; ``out`` is the EVAL folder.
    """
    from wsi_mil.evaluate.report import write_report

    ev = evaluate_run(heatmaps, annotations, config, echo, slide_ids)
    write_report(out, ev)
    return ev
