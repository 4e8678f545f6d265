"""Selection used the validation fold only — checked from the saved weights, and by changing the test fold.

Two checks that can fail, unlike re-deriving ``selected_epoch`` from the ``history.csv``
that produced it:

1. **The saved weights are the selected epoch's.** Each ``fold_<k>.safetensors``,
   reloaded and applied to fold k's validation slides (from ``splits.csv``), gives the
   validation error and loss that ``history.csv`` records at the selected epoch. Saving
   another epoch's weights (the last, say) would give another validation loss.
2. **The test fold steers nothing.** Permuting the labels of fold k's test slides (the
   permutation is chosen so that labels really move) and training fold k again gives
   bitwise the same weights, history and selected epoch. If selection looked at the test
   fold, the permuted labels would change its errors and so, in general, the epoch chosen
   — which the test shows by running the same check with a deliberately leaky split
   whose validation part *is* the test fold: there the selected epochs do change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from wsi_mil.io.h5 import read_bag
from wsi_mil.mil import load_model, load_train_config, train_run
from wsi_mil.mil.cv import make_splits, train_fold
from wsi_mil.mil.data import bag_paths, read_labels
from wsi_mil.mil.fit import validation_scores
from wsi_mil.mil.inference import predict_bag

ENC = "toyenc"


def _cfg():
    return load_train_config(
        "default",
        {"optim.epochs": 6, "optim.lr": 3e-3, "cv.folds": 3, "cv.val_fraction": 0.34, "model.hidden": [16],
         "run_name": "sel"},
    )


def _permute_test_labels(y: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``y`` with the test slides' labels permuted among themselves so that labels move."""
    order = test[np.argsort(y[test], kind="stable")]  # the test slides sorted by label
    out = y.copy()
    out[order] = y[order][::-1]  # reversed: the classes swap wherever the fold is balanced
    assert (out[test] != y[test]).any() and sorted(out[test]) == sorted(y[test])
    return out


def test_selection_uses_validation_only(tmp_path: Path, cohort, one_thread) -> None:
    csv = cohort(tmp_path, n=12)
    cfg = _cfg()
    run = train_run(tmp_path, csv, ENC, cfg, progress=False)
    labels = read_labels(csv)
    paths = bag_paths(tmp_path / "features" / ENC / "h5_files", labels.slide_ids)
    folds = make_splits(labels.y, cfg, str(csv), labels.case_ids)  # the folds train_run made
    metrics = pd.read_json(run / "metrics.json", typ="series")
    hist = pd.read_csv(run / "history.csv")
    splits = pd.read_csv(run / "splits.csv")
    ens = load_model(run)
    index = {s: i for i, s in enumerate(labels.slide_ids)}

    # 1. The saved weights reproduce the history at the selected epoch, on the validation fold.
    for k, f in enumerate(metrics["folds"]):
        val = splits[(splits.fold == k) & (splits.split == "val")].slide_id.map(index).to_numpy()
        assert sorted(val) == sorted(folds[k]["val"])
        probs = np.concatenate([predict_bag(ens.models[k], read_bag(paths[i]).features).bag_probs.numpy() for i in val])
        err, loss = validation_scores(probs, labels.y[val])
        at = hist[(hist.fold == k) & (hist.epoch == f["selected_epoch"])].iloc[0]
        assert err == at.val_error
        assert abs(loss - at.val_loss) < 1e-5
        others = hist[(hist.fold == k) & (hist.epoch != f["selected_epoch"])]
        assert (abs(others.val_loss - loss) > 1e-5).all()  # no other epoch's weights would pass

    # 2. Permuting the test fold's labels changes neither the weights nor the selected epoch.
    device = torch.device("cpu")
    permuted = [_permute_test_labels(labels.y, split["test"]) for split in folds]
    for k, split in enumerate(folds):
        again = train_fold(k, split, paths, permuted[k], cfg, 16, 2, device)
        saved = load_file(str(run / f"fold_{k}.safetensors"))
        assert again.state.keys() == saved.keys()
        assert all(torch.equal(again.state[n], saved[n]) for n in saved)
        assert again.selected_epoch == metrics["folds"][k]["selected_epoch"]
        recorded = hist[hist.fold == k].drop(columns="fold").reset_index(drop=True)
        np.testing.assert_allclose(pd.DataFrame(again.history)[recorded.columns].to_numpy(), recorded.to_numpy(),
                                   rtol=1e-12)

    # The same check on a split that selects on the test fold notices (the fold loop stops
    # at the first fold where it does; all seeded, so the same fold every run).
    for k, split in enumerate(folds):
        leaky = {"train": split["train"], "val": split["test"], "test": split["test"]}
        a = train_fold(k, leaky, paths, labels.y, cfg, 16, 2, device)
        b = train_fold(k, leaky, paths, permuted[k], cfg, 16, 2, device)
        if a.selected_epoch != b.selected_epoch:
            assert not all(torch.equal(a.state[n], b.state[n]) for n in a.state)
            break
    else:
        raise AssertionError("selecting on the test fold went unnoticed: the check cannot fail")
