"""Cohort config loading, the output lock, and resume / --retry-failed semantics (no Dask)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cohort.conftest import BIN, write_config
from wsi_mil.cohort import load_cohort_config, run_cohort
from wsi_mil.config import CONFIG_DIR
from wsi_mil.errors import ConfigError
from wsi_mil.harness.lock import OutputLockedError, output_lock
from wsi_mil.harness.status import read_status


def test_example_config_resolves_relative_paths() -> None:
    cfg = load_cohort_config(CONFIG_DIR / "cohort" / "example.yaml")
    base = (CONFIG_DIR / "cohort").resolve()
    assert cfg.out == (base / "../../cohort_out").resolve()
    assert cfg.stages == ("tile", "extract", "train", "heatmap")
    assert cfg.extract.encoder == "resnet50_trunc" and cfg.train.cv.folds == 5
    assert cfg.tile.segment.seg_mpp == 8.0  # from the preset under the section's settings


def test_sections_presets_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "slides: [s1, s2.csv]\nout: o\nstages: [extract, tile]\nmpp: 0.25\n"
        "tile: {preset: biopsy, segment: {seg_mpp: 4}}\nextract: {encoder: texture}\n"
    )
    cfg = load_cohort_config(path, {"out": "elsewhere"})
    assert cfg.slides == (tmp_path / "s1", tmp_path / "s2.csv")
    assert cfg.out == Path("elsewhere").resolve()  # flags are relative to the working folder
    assert cfg.stages == ("tile", "extract")  # always run in pipeline order
    assert cfg.tile.segment.seg_mpp == 4.0 and cfg.mpp == 0.25


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("out: o\n", "'slides' is required"),
        ("slides: s\nout: o\nstages: [tile, bake]\n", "unknown stage"),
        ("slides: s\nout: o\nstages: [train]\n", "needs 'labels'"),
        ("slides: s\nout: o\nstages: [heatmap]\n", "need 'model'"),
        ("slides: s\nout: o\nsldies: x\n", "unknown setting"),
        ("slides: s\nout: o\nstages: [tile]\ntile: {patch_sise: 3}\n", "patch_sise"),
        ("slides: s\nout: o\nstages: [tile]\ncluster: {n_workers: many}\n", "n_workers"),
    ],
)
def test_invalid_configs(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "c.yaml").write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_cohort_config(tmp_path / "c.yaml")


def test_second_run_on_the_same_folder_is_refused(cohort_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from wsi_mil.harness import output_lock\n"
         f"with output_lock({str(out)!r}, 'wsi-mil run'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cfg = load_cohort_config(write_config(cohort_dir, out, stages="tile"))
        with pytest.raises(OutputLockedError, match=rf"in use by another run \(wsi-mil run, pid {holder.pid}"):
            run_cohort(cfg, scheduler="sequential", progress=False)
        r = subprocess.run([str(BIN / "wsi-mil"), "tile", str(cohort_dir / "slides"), "--out", str(out)],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "in use by another run" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out), output_lock(out):  # free again once the holder died; re-entrant in one process
        pass
    assert not read_status(out)  # the refused runs wrote nothing


def test_resume_and_retry_failed(cohort_dir: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("tum_00.tif", "nor_01.tif"):
        (slides / name).symlink_to(cohort_dir / "slides" / name)
    (slides / "broken.tif").write_bytes(b"not a slide" * 100)
    out = tmp_path / "out"
    cfg_path = write_config(cohort_dir, out, stages="tile, extract")
    cfg_path.write_text(cfg_path.read_text().replace(str(cohort_dir / "slides"), str(slides)))
    cfg = load_cohort_config(cfg_path)
    lines: list[str] = []
    first = run_cohort(cfg, scheduler="sequential", echo=lines.append, progress=False)
    assert not first.ok and list(first.failures) == [("tile", "broken")]
    counts = first.stages["extract"].counts
    assert counts == {**dict.fromkeys(counts, 0), "done": 2, "blocked": 1}
    assert any(line.startswith("broken: tile failed: ") for line in lines)
    rows = read_status(out)
    assert len(rows) == 5 and {r["state"] for r in rows if r["slide_id"] != "broken"} == {"done"}
    stamp = {(r["slide_id"], r["stage"]): r["updated"] for r in rows}
    time.sleep(1.1)

    again = run_cohort(cfg, scheduler="sequential", echo=lines.append, progress=False)
    assert not again.ok and again.stages["tile"].counts["skipped"] == 2
    assert again.stages["tile"].counts["not_retried"] == 1 and "broken" in again.stages["tile"].earlier
    assert {(r["slide_id"], r["stage"]): r["updated"] for r in read_status(out)} == stamp  # nothing redone
    assert "add --retry-failed" in "\n".join(again.lines())

    retried = run_cohort(cfg, scheduler="sequential", retry_failed=True, echo=lines.append, progress=False)
    assert retried.stages["tile"].counts["failed"] == 1 and retried.stages["tile"].counts["skipped"] == 2
    new = {(r["slide_id"], r["stage"]): r["updated"] for r in read_status(out)}
    assert new[("broken", "tile")] != stamp[("broken", "tile")] and len(new) == 5


def test_cli_exit_code_and_summary(cohort_dir: Path, tmp_path: Path) -> None:
    cfg = write_config(cohort_dir, tmp_path / "out", stages="tile")
    cfg.write_text(cfg.read_text().replace(str(cohort_dir / "slides"), str(cohort_dir / "slides" / "tum_00.tif")))
    ok = subprocess.run([str(BIN / "wsi-mil"), "run", str(cfg), "--scheduler", "sequential", "--no-progress"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "tile         1" in ok.stdout and (tmp_path / "out" / "run_config.yaml").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("tum_00.tif", "missing.tif"))
    r = subprocess.run([str(BIN / "wsi-mil"), "run", str(bad), "--scheduler", "sequential", "--no-progress"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "missing: tile failed:" in r.stdout
