"""What the viewer reads from ``OUT``: the slides, their labels, predictions and heatmap data.

Everything is looked up by slide id; a request never names a file. The set of slides is
fixed when :class:`ViewerData` is built (from ``heatmaps/<run>/``, ``patches/``,
``status.csv`` and the predictions CSV), so an unknown id is simply not there.

What ``OUT`` says is not trusted blindly. Every id read from it (file stems, CSV rows,
the labels CSV) is checked with :func:`wsi_mil.io.ids.id_problem`; a refused one is
skipped with one warning line (:attr:`ViewerData.warnings`) and the viewer starts on the
rest. A slide file is the one ``patches/<id>.h5`` recorded (``slide_path``), served only
while its content still matches the recorded ``slide_fingerprint`` (checked each time the
slide is opened); a ``slide_path``/``path`` column of a CSV never chooses the file. A slide
without a patch file may only be ``OUT/slides/<id>.*`` that resolves inside ``OUT``.
"""

from __future__ import annotations

import csv
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import WsiMilError
from wsi_mil.io import h5
from wsi_mil.io.h5 import HeatmapData
from wsi_mil.io.ids import id_problem
from wsi_mil.io.layout import Layout
from wsi_mil.io.provenance import SLIDE_FINGERPRINT
from wsi_mil.io.run_folder import CONFIG_FILE, PREDICTIONS_FILE

#: The score key of attention; class k has the key ``prob<k>``.
ATTENTION = "attention"


class ViewerError(WsiMilError):
    """The viewer cannot start on this output folder (missing files or assets)."""


@dataclass
class SlideRecord:
    """One slide the viewer can show.

    Attributes
    ----------
    slide_id : str
        The slide's id.
    path : Path or None
        The slide file: the one ``patches/<id>.h5`` recorded (``slide_path``), else
        ``OUT/slides/<id>.*`` for a slide without a tiling (None when there is neither).
    fingerprint : str or None
        The recorded ``slide_fingerprint`` the file must still have to be served.
    slide_error : str or None
        Why the slide file is not served (a missing or unchecked record), for the page.
    label : str or None
        Ground-truth label from the run's labels CSV (or its predictions CSV).
    prediction : str or None
        Predicted class.
    probs : dict of str to float
        Slide-level class probabilities, by class name.
    n_patches : int or None
        Patches of the slide's tiling (or its predictions row).
    heatmap : Path or None
        ``heatmaps/<run>/<id>.h5`` when present.
    mask : Path or None
        ``masks/<id>.geojson`` (tissue contours) when present.
    prediction_source : str or None
        ``predict`` (new slide), ``out-of-fold`` (cross-validation) or ``in-sample``
        (a slide the model was trained on: not an honest estimate).
    """

    slide_id: str
    path: Path | None = None
    fingerprint: str | None = None
    slide_error: str | None = None
    label: str | None = None
    prediction: str | None = None
    probs: dict[str, float] = field(default_factory=dict)
    n_patches: int | None = None
    heatmap: Path | None = None
    mask: Path | None = None
    prediction_source: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready row of the slide list."""
        return {
            "slide_id": self.slide_id,
            "label": self.label,
            "prediction": self.prediction,
            "prediction_source": self.prediction_source,
            "probs": self.probs,
            "n_patches": self.n_patches,
            "has_slide": self.path is not None,
            "has_heatmap": self.heatmap is not None,
            "has_tissue": self.mask is not None,
        }


def list_runs(out: Path) -> list[str]:
    """Runs with heatmaps (``OUT/heatmaps/<run>/`` holding ``*.h5``), newest first."""
    root = Layout(out).heatmaps_root
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if d.is_dir() and any(d.glob("*.h5"))]
    return [d.name for d in sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)]


def _read_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV file, or none when it is absent or unreadable (the viewer tolerates it)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return [(reader.line_num, row) for row in reader]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path``, links resolved, lies inside ``folder`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(folder)
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _labels_csv(out: Path, run: str | None) -> Path | None:
    """The labels CSV named in ``models/<run>/config.yaml`` (resolved against ``OUT``'s parent too)."""
    if run is None:
        return None
    cfg = Layout(out).run_dir(run) / CONFIG_FILE
    if not cfg.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("labels_csv")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not value:
        return None
    path = Path(value)
    for candidate in (path, out / path, out.parent / path):
        if candidate.is_file():
            return candidate
    return None


class ViewerData:
    """The slides of one output folder and one heatmap run, read once at start.

    Parameters
    ----------
    out : path-like
        The cohort output folder (``OUT``).
    run : str, optional
        Heatmap run (``OUT/heatmaps/<run>``); default: the only one, else the newest.

    Examples
    --------
    >>> data = ViewerData("demo_out")  # doctest: +SKIP
    >>> [s.slide_id for s in data.slides.values()]  # doctest: +SKIP
    """

    def __init__(self, out: str | Path, run: str | None = None) -> None:
        self.out = Path(out).resolve()
        if not self.out.is_dir():
            raise ViewerError(f"{self.out}: no such output folder; give the OUT folder of 'wsi-mil tile'")
        runs = list_runs(self.out)
        if run is not None and run not in runs:
            found = ", ".join(runs) or "none"
            raise ViewerError(f"{Layout(self.out).heatmap_dir(run)}: no heatmaps for run {run!r} (runs found: {found})")
        self.runs = runs
        self.run = run if run is not None else (runs[0] if runs else None)
        self.slides: dict[str, SlideRecord] = {}
        self._lock = threading.Lock()
        self._heatmaps: dict[str, HeatmapData] = {}
        #: One line per refused id or ignored path column (the viewer starts on the rest).
        self.warnings: list[str] = []
        self._csv_paths: list[tuple[str, str, str]] = []  # (file:line, id, slide_path given)
        self._collect()
        if not self.slides:
            raise ViewerError(f"{self.out}: no slides found (no status.csv, patches/, heatmaps/ or predictions.csv)")

    # -- discovery ---------------------------------------------------------------------
    def _safe(self, sid: str, where: str) -> bool:
        """True for an id that names no other file; a refused one is skipped with a warning."""
        problem = id_problem(sid)
        if problem is not None:
            self.warnings.append(f"{where}: slide id {sid!r} skipped: it {problem}")
        return problem is None

    def _record(self, sid: str) -> SlideRecord:
        if sid not in self.slides:
            self.slides[sid] = SlideRecord(sid)
        return self.slides[sid]

    def _collect(self) -> None:
        layout = Layout(self.out)
        if self.run is not None:
            for f in sorted(layout.heatmap_dir(self.run).glob("*.h5")):
                if self._safe(f.stem, str(f)):
                    self._record(f.stem).heatmap = f
        for line, row in _read_csv(layout.status_csv):
            if row.get("slide_id") and self._safe(row["slide_id"], f"{layout.status_csv}:{line}"):
                self._record(row["slide_id"])
        tiled: set[str] = set()
        for f in sorted(layout.patches_dir.glob("*.h5")):
            if not self._safe(f.stem, str(f)):
                continue
            rec = self._record(f.stem)
            try:
                patches = h5.read_patches(f)
            except WsiMilError as exc:
                rec.slide_error = str(exc)
                tiled.add(rec.slide_id)
                continue
            tiled.add(rec.slide_id)
            if rec.n_patches is None:
                rec.n_patches = len(patches.coords)
            self._recorded_slide(rec, f, patches.attrs)
        self._predictions()
        self._labels()
        slides_dir = layout.slides_dir
        for sid, rec in self.slides.items():
            mask = layout.mask(sid)
            rec.mask = mask if mask.is_file() else None
            if sid not in tiled:  # no tiling record: only OUT/slides/<id>.*, inside OUT
                inside = (p for p in sorted(slides_dir.glob(f"{sid}.*")) if p.is_file() and _inside(p, self.out))
                rec.path = next(inside, None)
        for where, sid, given in self._csv_paths:
            rec = self.slides[sid]
            if rec.path is None or not _same_file(Path(given), rec.path):
                shown = rec.path if rec.path is not None else "none"
                self.warnings.append(
                    f"{where}: slide_path {given!r} of {sid!r} ignored: a slide is served from the file "
                    f"its tiling recorded ({shown})"
                )

    def _recorded_slide(self, rec: SlideRecord, patches_file: Path, attrs: Any) -> None:
        """The slide file ``patches/<id>.h5`` recorded, if it is still there (its content is checked on open)."""
        path, fingerprint = attrs.get("slide_path"), attrs.get(SLIDE_FINGERPRINT)
        if not path:
            rec.slide_error = f"{patches_file} records no slide_path; re-run 'wsi-mil tile' on the slide"
        elif not fingerprint:
            rec.slide_error = (
                f"{patches_file} records no {SLIDE_FINGERPRINT} (tiled by an older wsi-mil), so {path} cannot "
                "be checked; re-run 'wsi-mil tile' on the slide"
            )
        elif not Path(str(path)).is_file() and not Path(str(path)).is_dir():
            rec.slide_error = f"{path} (recorded by {patches_file}): slide file not found"
        else:
            rec.path, rec.fingerprint = Path(str(path)), str(fingerprint)

    def _predictions(self) -> None:
        """Slide predictions, best source last so that it wins.

        ``heatmaps/<run>/index.csv`` (ensemble on slides the run may have trained on:
        in-sample), then ``models/<run>/predictions.csv`` (out-of-fold), then
        ``OUT/predictions.csv`` (``wsi-mil predict`` on new slides).
        """
        layout = Layout(self.out)
        sources = [(layout.predictions, "predict")]
        if self.run is not None:
            sources[:0] = [
                (layout.heatmap_index(self.run), "in-sample"),
                (layout.run_dir(self.run) / PREDICTIONS_FILE, "out-of-fold"),
            ]
        for csv_path, source in sources:
            for line, row in _read_csv(csv_path):
                self._prediction_row(row, source, f"{csv_path}:{line}")

    def _prediction_row(self, row: dict[str, str], source: str, where: str) -> None:
        sid = row.get("slide_id")
        if not sid or not self._safe(sid, where):
            return
        rec = self._record(sid)
        for key in ("slide_path", "path"):  # may agree with the tiling's record; never chooses the file
            if row.get(key):
                self._csv_paths.append((where, sid, row[key]))
        if row.get("label"):
            rec.label = row["label"]
        n = _float(row.get("n_patches"))
        if n is not None and n > 0:
            rec.n_patches = int(n)
        if not row.get("prediction") or row.get("status", "ok") not in ("ok", ""):
            return  # a failed slide: keep what a better source said
        probs = {k[5:]: _float(v) for k, v in row.items() if k and k.startswith("prob_")}
        rec.prediction = row["prediction"]
        rec.probs = {k: v for k, v in probs.items() if v is not None}
        rec.prediction_source = source

    def _labels(self) -> None:
        """Labels of the run's labels CSV (``slide_id,label`` or CLAM's ``case_id,slide_id,label``)."""
        path = _labels_csv(self.out, self.run)
        for line, row in _read_csv(path) if path else []:
            sid, label = row.get("slide_id"), row.get("label")
            if not sid or not self._safe(sid, f"{path}:{line}"):
                continue
            if sid in self.slides and label not in (None, ""):
                self.slides[sid].label = label

    # -- per-slide data ----------------------------------------------------------------
    def get(self, slide_id: str) -> SlideRecord | None:
        """The slide's record, or None for an id this folder does not hold."""
        return self.slides.get(slide_id)

    def heatmap(self, slide_id: str) -> HeatmapData | None:
        """The slide's heatmap data (read once, then cached), or None without one."""
        rec = self.slides.get(slide_id)
        if rec is None or rec.heatmap is None:
            return None
        with self._lock:  # read each file once, even when tiles ask for it in parallel
            if slide_id not in self._heatmaps:
                self._heatmaps[slide_id] = h5.read_heatmap_data(rec.heatmap)
            return self._heatmaps[slide_id]


def score_keys(data: HeatmapData) -> list[dict[str, str]]:
    """The scores a heatmap can show: attention, then each class probability."""
    keys = [{"key": ATTENTION, "label": "attention (normalised per slide)"}]
    keys += [{"key": f"prob{k}", "label": f"P({name})"} for k, name in enumerate(data.class_names)]
    return keys


def score_values(data: HeatmapData, key: str) -> np.ndarray | None:
    """(N,) values in [0, 1] of a score key (normalised attention or a class probability)."""
    if key == ATTENTION:
        return np.asarray(data.attention_norm, np.float32)
    if key.startswith("prob") and key[4:].isdigit() and int(key[4:]) < len(data.class_names):
        return np.asarray(data.instance_probs[:, int(key[4:])], np.float32)
    return None


def patch_scores(data: HeatmapData, index: int) -> dict[str, Any]:
    """JSON-ready scores of patch ``index``: position, attention and class probabilities."""
    x, y = (int(v) for v in data.coords[index])
    return {
        "index": int(index),
        "x": x,
        "y": y,
        "size": data.patch_size_level0,
        "attention": float(data.attention[index]),
        "attention_norm": float(data.attention_norm[index]),
        "probs": {name: float(data.instance_probs[index, k]) for k, name in enumerate(data.class_names)},
    }


def patch_at(data: HeatmapData, x: float, y: float) -> int | None:
    """Index of the patch covering level-0 ``(x, y)`` (the nearest centre where patches overlap).

    Examples
    --------
    >>> d = HeatmapData(np.array([[0, 0], [256, 0]]), np.ones(2), np.ones(2), np.ones((2, 1)), ["a"],
    ...                 {"patch_size_level0": 256})
    >>> patch_at(d, 300, 10), patch_at(d, 600, 10)
    (1, None)
    """
    p = data.patch_size_level0
    c = data.coords
    inside = np.flatnonzero((c[:, 0] <= x) & (x < c[:, 0] + p) & (c[:, 1] <= y) & (y < c[:, 1] + p))
    if not len(inside):
        return None
    centres = c[inside] + p / 2.0
    return int(inside[np.argmin(((centres - (x, y)) ** 2).sum(1))])


def top_patches(data: HeatmapData, key: str, k: int) -> list[dict[str, Any]] | None:
    """The ``k`` patches with the highest score ``key`` (None for an unknown key), best first."""
    values = score_values(data, key)
    if values is None:
        return None
    if key == ATTENTION:  # rank by raw attention: the normalised one may tie at 1
        values = np.asarray(data.attention, np.float32)
    order = np.argsort(-values, kind="stable")[: max(0, k)]
    return [patch_scores(data, int(i)) for i in order]
