"""Patients: several slides per case never straddle splits; metrics per slide and per case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_mil.errors import ConfigError
from wsi_mil.io.h5 import write_bag
from wsi_mil.mil import load_train_config, train_run
from wsi_mil.mil.config import CVConfig, TrainConfig
from wsi_mil.mil.data import read_labels
from wsi_mil.mil.train import make_splits

ENC = "toyenc"
D = 16
# The shape: 24 slides in 9 cases (1 to 5 slides per case), labels per case.
CASE_SIZES = (5, 4, 3, 3, 2, 2, 2, 2, 1)


def _cases_cohort(root: Path, sizes: tuple[int, ...] = CASE_SIZES) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    n = 0
    for c, size in enumerate(sizes):
        label = ("normal", "tumor")[c % 2]
        for _ in range(size):
            N = int(rng.integers(20, 50))
            feats = rng.normal(size=(N, D)).astype(np.float32)
            if label == "tumor":
                feats[: N // 6, 0] += 4.0
            coords = np.stack([np.arange(N) * 256, np.zeros(N)], 1)
            write_bag(root / "features" / ENC / "h5_files" / f"s{n:02d}.h5", feats, coords, {"encoder": ENC})
            rows.append({"case_id": f"P{c}", "slide_id": f"s{n:02d}", "label": label})
            n += 1
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _check_grouped(folds: list[dict[str, np.ndarray]], cases: list[str]) -> None:
    """No case in two splits of a fold; every case tested exactly once."""
    g = np.asarray(cases)
    tested: dict[str, int] = {}
    for fold in folds:
        parts = [set(g[fold[s]].tolist()) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert sum(len(fold[s]) for s in ("train", "val", "test")) == len(g)
        for c in parts[2]:
            tested[c] = tested.get(c, 0) + 1
    assert tested == dict.fromkeys(set(cases), 1)


def test_folds_never_split_a_case(tmp_path: Path) -> None:
    labels = read_labels(_cases_cohort(tmp_path))
    assert labels.has_cases and len(set(labels.case_ids)) == 9
    for seed in range(5):
        cfg = TrainConfig(cv=CVConfig(folds=4, val_fraction=0.25, seed=seed))
        _check_grouped(make_splits(labels.y, cfg, "labels.csv", labels.case_ids), labels.case_ids)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=8, max_size=20),
    folds=st.integers(2, 3),
    seed=st.integers(0, 1000),
)
def test_grouped_splits_property(sizes: list[int], folds: int, seed: int) -> None:
    cases = [f"c{i}" for i, n in enumerate(sizes) for _ in range(n)]
    y = np.array([i % 2 for i, n in enumerate(sizes) for _ in range(n)])
    cfg = TrainConfig(cv=CVConfig(folds=folds, val_fraction=0.34, seed=seed))
    try:
        result = make_splits(y, cfg, "labels.csv", cases)
    except ConfigError:
        return  # too few cases for this fold count: refused with a message, never a leak
    _check_grouped(result, cases)


def test_too_few_cases_counts_cases(tmp_path: Path) -> None:
    labels = read_labels(_cases_cohort(tmp_path))  # 5 tumour / 4 normal cases, 24 slides
    cfg = TrainConfig(cv=CVConfig(folds=5))
    with pytest.raises(ConfigError, match=r"smallest class has 4 cases"):
        make_splits(labels.y, cfg, "labels.csv", labels.case_ids)


def test_without_case_id_each_slide_is_a_case(tmp_path: Path) -> None:
    csv = _cases_cohort(tmp_path)
    pd.read_csv(csv).drop(columns="case_id").to_csv(csv, index=False)
    labels = read_labels(csv)
    assert labels.case_ids == labels.slide_ids and not labels.has_cases


def test_labels_with_bom_and_empty_case(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_bytes("\ufeffcase_id,slide_id,label\nA,a1,x\nA,a2,y\n".encode())
    assert read_labels(csv).case_ids == ["A", "A"]
    csv.write_text("case_id,slide_id,label\n,a1,x\nB,a2,y\n")
    with pytest.raises(ConfigError, match="empty case_id"):
        read_labels(csv)


def test_train_run_reports_cases(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    csv = _cases_cohort(tmp_path)
    cfg = load_train_config(
        None, {"optim.epochs": 4, "optim.lr": 3e-3, "cv.folds": 4, "cv.val_fraction": 0.25,
               "model.hidden": [16], "run_name": "r"}
    )
    run = train_run(tmp_path, csv, ENC, cfg, progress=False)
    splits = pd.read_csv(run / "splits.csv")
    assert list(splits.columns[:2]) == ["case_id", "slide_id"]
    for _, s in splits.groupby("fold"):
        assert (s.groupby("case_id").split.nunique() == 1).all()  # a case sits in one split
    tested = splits[splits.split == "test"].groupby("case_id").fold.nunique()
    assert (tested == 1).all() and len(tested) == 9

    metrics = json.loads((run / "metrics.json").read_text())
    case = metrics["case"]
    assert case["n_cases"] == 9 and "mean" in case["aggregation"]
    assert case["out_of_fold"]["n"] == 9 and len(case["folds"]) == 4
    assert sum(f["n"] for f in case["folds"]) == 9
    assert metrics["out_of_fold"]["n"] == 24

    slides = pd.read_csv(run / "predictions.csv")
    cases = pd.read_csv(run / "case_predictions.csv")
    assert set(cases.case_id) == set(slides.case_id) and len(cases) == 9
    assert dict(zip(cases.case_id, cases.n_slides, strict=True)) == {f"P{i}": n for i, n in enumerate(CASE_SIZES)}
    # A case's probability is the mean of its slides' out-of-fold probabilities.
    mean = slides.groupby("case_id").prob_tumor.mean()
    np.testing.assert_allclose(cases.set_index("case_id").prob_tumor.loc[mean.index], mean, rtol=1e-6)
