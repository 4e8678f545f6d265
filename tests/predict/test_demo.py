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
