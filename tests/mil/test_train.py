"""Training end to end on real HDF5 bags written with wsi_mil.io.h5.write_bag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_mil.errors import BagError, ConfigError
from wsi_mil.mil import load_model, load_train_config, predict_bags, train_run
from wsi_mil.mil.data import read_labels

ENC = "toyenc"
D = 16


def _cfg(tmp: Path, **over: object):
    base = {
        "optim.epochs": 8,
        "optim.lr": 3e-3,
        "cv.folds": 3,
        "model.hidden": [32],
        "run_name": "r1",
    }
    base.update(over)
    return load_train_config(Path(__file__).parents[2] / "configs/train/default.yaml", base)


def test_train_run_end_to_end(tmp_path: Path, cohort) -> None:
    torch.set_num_threads(2)
    csv = cohort(tmp_path)
    run = train_run(tmp_path, csv, ENC, _cfg(tmp_path), progress=False)
    assert run == tmp_path / "models" / "r1"
    files = {p.name for p in run.iterdir()}
    assert {"config.yaml", "model.json", "metrics.json", "predictions.csv", "splits.csv"} <= files
    assert {f"fold_{k}.safetensors" for k in range(3)} <= files

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "tumor"]
    assert len(metrics["folds"]) == 3
    for key in ("accuracy", "balanced_accuracy", "auc", "f1"):
        assert 0.0 <= metrics["summary"][key]["mean"] <= 1.0
        assert key in metrics["out_of_fold"]
    assert metrics["out_of_fold"]["auc"] > 0.8  # the signal is easy

    # Selection used validation only: the selected epoch is the best by (val error, val loss).
    hist = pd.read_csv(run / "history.csv")
    for f in metrics["folds"]:
        h = hist[hist.fold == f["fold"]].sort_values(["val_error", "val_loss", "epoch"])
        assert int(h.iloc[0].epoch) == f["selected_epoch"]
    splits = pd.read_csv(run / "splits.csv")
    for k in range(3):
        s = splits[splits.fold == k]
        parts = [set(s[s.split == p].slide_id) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(set().union(*parts)) == 24

    # Out-of-fold predictions: every slide once, probabilities per class.
    pred = pd.read_csv(run / "predictions.csv")
    assert sorted(pred.slide_id) == [f"s{i:02d}" for i in range(24)]
    np.testing.assert_allclose(pred[["prob_normal", "prob_tumor"]].sum(axis=1), 1.0, atol=1e-5)

    # Reloaded checkpoints reproduce the out-of-fold predictions of their own fold.
    ens = load_model(run)
    for k, model in enumerate(ens.models):
        test_ids = pred[pred.fold == k]
        for _, row in test_ids.iterrows():
            from wsi_mil.io.h5 import read_bag

            feats = read_bag(
                tmp_path / "features" / ENC / "h5_files" / f"{row.slide_id}.h5"
            ).features
            p = model.predict(torch.from_numpy(feats)[None]).bag_probs[0, 1].item()
            assert p == pytest.approx(row.prob_tumor, abs=1e-5)

    paths = sorted((tmp_path / "features" / ENC / "h5_files").glob("*.h5"))
    df = predict_bags(ens, paths)
    assert list(df.columns) == ["slide_id", "prediction", "prob_normal", "prob_tumor"]
    assert (df.prediction == pred.set_index("slide_id").loc[df.slide_id].label.values).mean() > 0.8
    one = ens.predict(torch.from_numpy(np.zeros((1, 5, D), np.float32)))
    assert one.attention.shape == (1, 5) and one.instance_probs.shape == (1, 5, 2)

    with pytest.raises(ConfigError, match="already exists"):
        train_run(tmp_path, csv, ENC, _cfg(tmp_path), progress=False)


def test_multiclass_baseline_and_consistency(tmp_path: Path, cohort) -> None:
    csv = cohort(tmp_path, n=18, classes=("a", "b", "c"))
    cfg = _cfg(
        tmp_path, **{"optim.epochs": 3, "optim.omega": 1.0, "optim.batch_size": 4, "run_name": "mc"}
    )
    run = train_run(tmp_path, csv, ENC, cfg, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["a", "b", "c"]
    hist = pd.read_csv(run / "history.csv")
    assert (hist.train_consistency >= 0).all() and hist.train_consistency.iloc[-1] > 0
    cfg = _cfg(tmp_path, **{"optim.epochs": 2, "model.name": "gated_attention", "run_name": "g"})
    assert (train_run(tmp_path, csv, ENC, cfg, progress=False) / "fold_2.safetensors").is_file()


def test_input_errors_are_one_line(tmp_path: Path, cohort) -> None:
    csv = cohort(tmp_path, n=6)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,diagnosis\ns00,a\n")
    with pytest.raises(ConfigError, match=r"bad.csv: labels CSV needs columns slide_id,label"):
        read_labels(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("slide_id,label\ns00,a\nnope,b\n")
    with pytest.raises(BagError, match="nope"):
        train_run(tmp_path, missing, ENC, _cfg(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=r"cv\.folds"):
        train_run(tmp_path, csv, ENC, _cfg(tmp_path, **{"cv.folds": 5}), progress=False)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) optim\.nope .*valid: lr, "):
        load_train_config(None, {"optim.nope": 1})
