"""``wsi-mil evaluate`` on a real run: the trained cohort's out-of-fold heatmaps against the generator's masks.

Here, not in tests/evaluate, to reuse the session's trained run (``tests/predict/conftest.py``)
instead of training a second one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.predict.conftest import ENCODER, RUN, Trained
from wsi_mil.cli import app
from wsi_mil.demo import label_of
from wsi_mil.evaluate import write_synthetic_annotations
from wsi_mil.features.extract import bag_path
from wsi_mil.heatmaps import HeatmapOptions
from wsi_mil.heatmaps.write import make_heatmap_data
from wsi_mil.io import h5
from wsi_mil.mil.inference import FoldEnsemble, load_model, predict_bag
from wsi_mil.synthetic.evaluate import localisation


def test_evaluate_scores_a_trained_runs_heatmaps_against_the_generators_masks(trained: Trained, tmp_path: Path) -> None:
    # Each training slide's heatmap file from the fold model that never trained on it,
    # written as `wsi-mil heatmap` writes it (the .h5 only: the renderings are not scored).
    ens = load_model(trained.run_dir)
    oof = pd.read_csv(trained.run_dir / "predictions.csv").set_index("slide_id")
    hm = tmp_path / "heatmaps" / RUN
    for slide in trained.train:
        sid = slide.stem
        model = FoldEnsemble([ens.models[int(oof.loc[sid, "fold"])]], ens.classes, ens.encoder)
        bag = h5.read_bag(bag_path(trained.out, ENCODER, sid))
        patches = h5.read_patches(trained.out / "patches" / f"{sid}.h5")
        pred = predict_bag(model, bag.features)
        data = make_heatmap_data(
            sid, RUN, bag.coords, patches.patch_size_level0, pred.attention[0].numpy(),
            pred.instance_probs[0].numpy(), ens.classes, tuple(patches.attrs["slide_dimensions"]),
            float(patches.attrs["mpp"]), HeatmapOptions(),
        )  # fmt: skip
        h5.write_heatmap_data(hm / f"{sid}.h5", data)
    ann = tmp_path / "annotations"
    written = write_synthetic_annotations(trained.train, ann)
    assert sorted(p.stem for p in written) == sorted(p.stem for p in trained.train if label_of(p) == "tumour")

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--heatmaps", str(hm), "--annotations", str(ann), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"attention", "prob_normal", "prob_tumour"}
    table = pd.read_csv(out / "per_slide.csv").set_index("slide_id")
    assert sorted(table.index[table["positive"]]) == sorted(p.stem for p in written)

    # The same files scored by the synthetic-truth helper (the generator's raster truth).
    loc = localisation(sorted(hm.glob("*.h5")), sorted(trained.train), "tumour")
    assert summary["prob_tumour"]["patch_auc_pooled"] == pytest.approx(loc.prob_auc, abs=0.01)
    assert summary["attention"]["patch_auc"] == pytest.approx(loc.attention_auc, abs=0.01)
    assert int(table["n_pos"].sum()) == loc.n_tumour and int(table["n_neg"].sum()) == loc.n_normal
    # Out of fold on easy synthetic tumour: localised well, lesions found.
    assert summary["prob_tumour"]["patch_auc"] >= 0.85, summary
    assert summary["prob_tumour"]["froc"] >= 0.5, summary


runner = CliRunner()
