"""``wsi-mil demo``: a synthetic cohort through every stage, scored against its ground truth.

Slides alternate tumour / normal. The last ``n_heldout`` are held out: the model never sees
them (nor their labels) until ``predict`` diagnoses them, so the slide-level AUC and the
localisation AUCs printed at the end are honest estimates on new slides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.io.atomic import write_text_atomic
from wsi_mil.io.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

RUN = "demo"
ENCODER = "texture"


def _changed(out: Path, params: dict[str, dict[str, Any]]) -> tuple[bool, bool]:
    """(cohort changed, split changed) against ``OUT/demo.json``; unknown counts as changed.

    ``OUT/demo.json`` records what the demo in OUT was made with; a re-run with other
    parameters regenerates or retrains.
    """
    path = Layout(out).demo_params
    try:
        prev = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        prev = None
    if prev is None:  # fresh, or made by an older version: nothing of it can be trusted
        return True, True
    cohort = prev.get("cohort") != params["cohort"]
    return cohort, cohort or prev.get("split") != params["split"]


def make_cohort(
    folder: str | Path,
    n_slides: int,
    seed: int = 0,
    size: tuple[int, int] = (6144, 4608),
    rewrite: bool = False,
) -> list[Path]:
    """Write ``n_slides`` synthetic slides, alternating tumour / normal; return their paths.

    Existing files are kept unless ``rewrite``, which also removes demo slides beyond ``n_slides``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    names = {f"{'tumour' if i % 2 == 0 else 'normal'}_{i:03d}.tif" for i in range(n_slides)}
    if rewrite:
        for old in folder.glob("*_[0-9][0-9][0-9].tif"):
            if old.name not in names:
                old.unlink()
    for i in range(n_slides):
        tumour = i % 2 == 0
        p = folder / f"{'tumour' if tumour else 'normal'}_{i:03d}.tif"
        if rewrite or not p.exists():
            pen = ("green",) if i % 3 == 0 else ()
            write_synthetic_slide(
                p,
                SyntheticSpec(width=size[0], height=size[1], tumour=tumour, pen=pen, n_tissue=2 + i % 2, seed=seed + i),
            )
        paths.append(p)
    return paths


def label_of(path: Path) -> str:
    """Class of a demo slide, from its name."""
    return path.stem.split("_")[0]


@dataclass
class DemoResult:
    """What the demo measured (also written to ``OUT/demo_metrics.json``)."""

    n_train: int
    n_heldout: int
    cv_auc: float
    heldout_auc: float
    heldout_accuracy: float
    prob_localisation_auc: float  # pooled over all held-out slides (a slide-level signal helps it)
    attention_localisation_auc: float  # within each held-out tumour slide, averaged
    seconds: dict[str, float] = field(default_factory=dict)
    prob_localisation_auc_within: float = float("nan")  # the headline: within each held-out tumour slide


def run_demo(
    out: str | Path,
    n_slides: int = 24,
    n_heldout: int = 8,
    *,
    epochs: int = 30,
    folds: int = 4,
    slide_size: tuple[int, int] = (6144, 4608),
    seed: int = 0,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Generate a synthetic cohort in ``OUT/slides`` and run tile → extract → train → predict → heatmaps.

    Parameters
    ----------
    out : path-like
        Output folder. Re-running with the same parameters resumes (slides, tiles, bags and
        the trained run are reused); ``OUT/demo.json`` records them, and other cohort
        parameters (``n_slides``, ``seed``, ``slide_size``) regenerate the slides and redo
        every stage, other split parameters (``n_heldout``, ``folds``, ``epochs``) retrain.
    n_slides, n_heldout : int
        Slides in the cohort, and how many of them (the last ones) are held out.
    epochs, folds : int
        Training epochs per fold and cross-validation folds.
    slide_size : tuple of int
        Level-0 width and height of the synthetic slides.
    seed : int
        Seed of the synthetic slides.

    Raises
    ------
    WsiMilError
        A held-out slide is in the model's training splits (never expected; refused
        rather than reported as new).
    """
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from wsi_mil.features import extract_cohort
    from wsi_mil.io.run_folder import is_trained, read_metrics, read_trained
    from wsi_mil.mil import load_train_config, train_run
    from wsi_mil.predict import heatmap_cohort, predict_cohort
    from wsi_mil.synthetic.evaluate import localisation
    from wsi_mil.tiling.cohort import tile_cohort

    if not 2 <= n_heldout <= n_slides - 2 * folds:
        raise ConfigError(f"demo: need 2 ≤ n_heldout ≤ n_slides − 2·folds, got {n_heldout} of {n_slides}")
    load_train_config("default", {"cv.folds": folds, "optim.epochs": epochs})  # refused before any slide is drawn
    out = Path(out)
    layout = Layout(out)
    params = {
        "cohort": {"n_slides": n_slides, "seed": seed, "slide_size": list(slide_size)},
        "split": {"n_heldout": n_heldout, "folds": folds, "epochs": epochs},
    }
    new_cohort, new_split = _changed(out, params)
    clock: dict[str, float] = {}
    t = time.perf_counter()
    echo(f"writing {n_slides} synthetic slides to {layout.slides_dir} ...")
    slides = make_cohort(layout.slides_dir, n_slides, seed=seed, size=slide_size, rewrite=new_cohort)
    train, held = slides[:-n_heldout], slides[-n_heldout:]
    clock["slides"] = time.perf_counter() - t
    run_dir = layout.run_dir(RUN)
    if new_split:  # the demo's own run and heatmaps: made for another cohort or split
        import shutil

        for stale in (run_dir, layout.heatmap_dir(RUN)):
            if stale.exists():
                echo(f"demo parameters changed: removing {stale}")
                shutil.rmtree(stale)

    t = time.perf_counter()
    tile_cohort(list(train), out, overwrite=new_cohort, echo=echo, progress=progress)
    clock["tile"] = time.perf_counter() - t
    t = time.perf_counter()
    extract_cohort(out, ENCODER, slide_ids=[p.stem for p in train], overwrite=new_cohort, echo=echo, progress=progress)
    clock["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = layout.demo_labels
    pd.DataFrame({"slide_id": [p.stem for p in train], "label": [label_of(p) for p in train]}).to_csv(
        labels, index=False
    )
    if not is_trained(run_dir):
        # A validation split needs one slide per class: small cohorts get a larger share.
        val = min(0.45, max(0.2, 2.0 / (len(train) * (folds - 1) / folds)))
        overrides = {"run_name": RUN, "cv.folds": folds, "cv.val_fraction": val, "optim.epochs": epochs}
        cfg = load_train_config("default", overrides)
        train_run(out, labels, ENCODER, cfg, progress=progress)
    metrics = read_metrics(run_dir)
    cv_auc = float(metrics["out_of_fold"]["auc"])
    echo(f"train: {folds}-fold CV on {len(train)} slides, out-of-fold AUC {cv_auc:.3f} → {run_dir}")
    clock["train"] = time.perf_counter() - t

    trained = set(read_trained(run_dir))
    leaked = sorted(trained & {p.stem for p in held})
    if leaked:
        raise WsiMilError(f"{run_dir}: held-out slide(s) {', '.join(leaked)} are in its training splits; remove it")

    t = time.perf_counter()
    pred = predict_cohort(list(held), run_dir, out, overwrite=new_cohort, echo=echo, progress=progress)
    clock["predict"] = time.perf_counter() - t
    t = time.perf_counter()
    heatmap_cohort(out, run_dir, slide_ids=[p.stem for p in train], echo=echo, progress=progress)
    clock["heatmaps_train"] = time.perf_counter() - t

    rows = pd.read_csv(pred.csv).set_index("slide_id")
    ok = [p for p in held if p.stem in rows.index and rows.loc[p.stem, "status"] == "ok"]
    y = np.array([label_of(p) == "tumour" for p in ok])
    p_tum = rows.loc[[p.stem for p in ok], "prob_tumour"].to_numpy(float)
    acc = float(np.mean((p_tum >= 0.5) == y)) if ok else float("nan")
    auc = float(roc_auc_score(y, p_tum)) if 0 < y.sum() < len(y) else float("nan")
    loc = localisation([layout.heatmap_paths(RUN, p.stem)["h5"] for p in ok], ok, "tumour")
    result = DemoResult(
        len(train), len(held), cv_auc, auc, acc, loc.prob_auc, loc.attention_auc, clock, loc.prob_auc_within
    )
    write_text_atomic(layout.demo_metrics, json.dumps(asdict(result), indent=2))
    write_text_atomic(layout.demo_params, json.dumps(params, indent=2))  # last: only a finished demo counts

    total = sum(clock.values())
    echo("")
    echo(f"held-out slides ({len(held)}, never seen in training): slide AUC {auc:.3f}, accuracy {acc:.3f}")
    echo(
        f"localisation within the {loc.n_tumour_slides} held-out tumour slides (ground-truth tumour masks, "
        f"{loc.n_tumour} tumour / {loc.n_normal_in_tumour_slides} normal patches): tumour probability AUC "
        f"{loc.prob_auc_within:.3f}, attention AUC {loc.attention_auc:.3f}; pooled over all held-out slides "
        f"({loc.n_normal} normal patches, most on normal slides): tumour probability AUC {loc.prob_auc:.3f}"
    )
    echo("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in clock.items()) + f"; total {total:.0f}s")
    echo(f"outputs in {out}:")
    echo(f"  predictions       {pred.csv}")
    echo(f"  model             {run_dir} (metrics.json, out-of-fold predictions.csv)")
    echo(f"  heatmaps          {layout.heatmap_dir(RUN)} (<id>.png overlay, .tiff pyramid for QuPath, .geojson)")
    echo(f"  patches, bags     {layout.patches_dir}, {layout.bags_dir(ENCODER)}")
    echo(f"  status            {layout.status_csv}; metrics {layout.demo_metrics}")
    echo(
        f"view slides, heatmaps and patch scores in the browser: wsi-mil view {out}   (then open http://127.0.0.1:8765/)"
    )
    return result
