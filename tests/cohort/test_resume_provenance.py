"""``wsi-mil run`` resumes only what was made the same way, and keeps patients together."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.cohort.conftest import N_SLIDES, write_config
from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.harness.status import read_status


def _states(out: Path, stage: str) -> dict[str, str]:
    return {r["slide_id"]: r["state"] for r in read_status(out) if r["stage"] == stage}


def test_resume_refuses_changed_settings_and_keeps_cases(cohort_dir: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(cohort_dir / "labels.csv")
    labels.insert(0, "case_id", [f"P{i // 2}" for i in range(len(labels))])  # two slides per patient
    csv = tmp_path / "labels_cases.csv"
    labels.to_csv(csv, index=False)
    out = tmp_path / "out"
    cfg_path = write_config(cohort_dir, out, "tile, extract, train")
    text = cfg_path.read_text().replace(f"labels: {cohort_dir / 'labels.csv'}", f"labels: {csv}")
    cfg_path.write_text(text)

    first = run_cohort(load_cohort_config(cfg_path), scheduler="sequential", echo=lambda _: None, progress=False)
    assert first.ok
    train_labels = pd.read_csv(out / "train_labels.csv")
    assert list(train_labels.columns) == ["case_id", "slide_id", "label"]
    splits = pd.read_csv(out / "models" / "r1" / "splits.csv")
    for _, fold in splits.groupby("fold"):
        assert (fold.groupby("case_id").split.nunique() == 1).all()

    again = run_cohort(load_cohort_config(cfg_path), scheduler="sequential", echo=lambda _: None, progress=False)
    assert again.ok and again.stages["tile"].counts["skipped"] == N_SLIDES
    assert again.stages["train"].counts["skipped"] == 1

    # Other tile settings: every slide refused, naming the change; nothing already made is lost.
    cfg_path.write_text(text + "tile: {patch_size: 128}\n")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "patches").glob("*.h5")}
    changed = run_cohort(load_cohort_config(cfg_path), scheduler="sequential", echo=lambda _: None, progress=False)
    assert not changed.ok
    assert set(_states(out, "tile").values()) == {"failed"}
    reasons = {r["reason"] for r in read_status(out) if r["stage"] == "tile"}
    assert all("tile.patch_size: 256 → 128" in r and "--overwrite" in r for r in reasons)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "patches").glob("*.h5")} == before

    # The same run with overwrite redoes tiles and bags (the old model then no longer matches).
    redo = run_cohort(
        load_cohort_config(cfg_path), scheduler="sequential", overwrite=True, echo=lambda _: None, progress=False
    )
    assert set(_states(out, "tile").values()) == {"done"} and set(_states(out, "extract").values()) == {"done"}
    assert redo.stages["train"].counts["failed"] == 1
    assert "trained on other bags" in _states_reason(out)


def _states_reason(out: Path) -> str:
    return next(r["reason"] for r in read_status(out) if r["stage"] == "train")
