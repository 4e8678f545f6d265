"""``wsi-mil demo`` end to end on a smaller cohort: every stage, metrics, and the view hint."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from wsi_mil.demo import RUN, run_demo

SMALL = {"n_slides": 10, "n_heldout": 2, "epochs": 5, "folds": 2, "slide_size": (3072, 2304)}


def test_demo_runs_every_stage(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path, **SMALL, echo=lines.append, progress=False)
    assert (result.n_train, result.n_heldout) == (8, 2)
    saved = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert saved["heldout_auc"] == result.heldout_auc
    assert set(saved["seconds"]) == {"slides", "tile", "extract", "train", "predict", "heatmaps_train"}
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert sorted(pred["slide_id"]) == ["normal_009", "tumour_008"]
    assert (pred["status"] == "ok").all()
    hm = tmp_path / "heatmaps" / RUN
    assert len(list(hm.glob("*.tiff"))) == 10  # 2 held-out (predict) + 8 training (heatmap)
    assert (tmp_path / "models" / RUN / "pipeline.yaml").is_file()
    assert any(f"wsi-mil view {tmp_path}" in line for line in lines)

    # Re-running reuses the trained run and the slides.
    again = run_demo(tmp_path, **SMALL, echo=lines.append, progress=False)
    assert again.cv_auc == result.cv_auc

    # Another split: retrained, and the held-out metrics cover only slides the model never saw.
    more = run_demo(tmp_path, **{**SMALL, "n_heldout": 4}, echo=lines.append, progress=False)
    assert (more.n_train, more.n_heldout) == (6, 4)
    splits = pd.read_csv(tmp_path / "models" / RUN / "splits.csv")
    assert set(splits.slide_id) == {f"{'tumour' if i % 2 == 0 else 'normal'}_{i:03d}" for i in range(6)}
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert sorted(pred["slide_id"]) == ["normal_007", "normal_009", "tumour_006", "tumour_008"]
    assert not pred["trained_on"].any()
    assert json.loads((tmp_path / "demo.json").read_text())["split"]["n_heldout"] == 4


def test_demo_regenerates_slides_when_the_cohort_changes(tmp_path: Path) -> None:
    from wsi_mil.io.provenance import slide_fingerprint

    small = {**SMALL, "n_slides": 8, "epochs": 2}
    run_demo(tmp_path, **small, echo=lambda _: None, progress=False)
    slide = tmp_path / "slides" / "tumour_000.tif"
    before = slide_fingerprint(slide)
    run_demo(tmp_path, **small, seed=7, echo=lambda _: None, progress=False)
    assert slide_fingerprint(slide) != before  # regenerated with the new seed
    from wsi_mil.io.h5 import read_patches
    from wsi_mil.io.provenance import SLIDE_FINGERPRINT

    assert read_patches(tmp_path / "patches" / "tumour_000.h5").attrs[SLIDE_FINGERPRINT] == slide_fingerprint(slide)
    assert json.loads((tmp_path / "demo.json").read_text())["cohort"]["seed"] == 7
