"""`wsi-mil tile` as a user runs it: inputs, skipping, bad slides, exit codes, status."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.harness.status import read_status
from wsi_mil.io.h5 import read_patches


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsi_mil.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, tumour_slide) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    notes = d / "notes.tif"
    notes.write_text("not a slide at all")
    trunc = d / "truncated.tif"
    trunc.write_bytes(tumour_slide[0].read_bytes()[:20_000])
    return {"missing": d / "missing.svs", "notes": notes, "truncated": trunc}


def test_bad_slides_are_reported_and_the_rest_complete(tmp_path: Path, tumour_slide, blank_slide, tiny_slide,
                                                       bad_inputs: dict[str, Path]) -> None:
    out = tmp_path / "out"
    r = run_cli("tile", tumour_slide[0], blank_slide, tiny_slide, *bad_inputs.values(), "--out", out)
    assert r.returncode == 1
    lines = r.stdout.splitlines() + r.stderr.splitlines()
    assert "Traceback" not in r.stdout + r.stderr
    for sid, word in [("missing", "does not exist"), ("notes", "not a slide"), ("truncated", "truncated"),
                      ("tiny_e", "smaller than one patch")]:
        hits = [ln for ln in lines if ln.startswith(f"{sid}: failed:")]
        assert len(hits) == 1 and word in hits[0], (sid, lines)
    assert any(ln.startswith("blank_d: no tissue") for ln in lines)
    rows = {r["slide_id"]: r for r in read_status(out)}
    assert rows["tumour_a"]["state"] == "done" and int(rows["tumour_a"]["n_patches"]) > 50
    assert rows["blank_d"]["state"] == "empty" and rows["blank_d"]["n_patches"] == "0"
    assert len(read_patches(out / "patches" / "blank_d.h5").coords) == 0
    for sid in ("missing", "notes", "truncated", "tiny_e"):
        assert rows[sid]["state"] == "failed" and rows[sid]["reason"]
        assert not (out / "patches" / f"{sid}.h5").exists()
    assert not list(out.rglob("*.partial"))


def test_skip_done_overwrite_and_folder_input(tmp_path: Path, tumour_slide) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    os.symlink(tumour_slide[0], src / "tumour_a.tif")
    (src / "readme.txt").write_text("ignored: not a slide extension")
    out = tmp_path / "out"
    assert run_cli("tile", src, "--out", out).returncode == 0
    h5 = out / "patches" / "tumour_a.h5"
    first = h5.stat().st_mtime_ns
    r = run_cli("tile", src, "--out", out)
    assert r.returncode == 0 and "1 already done" in r.stdout and h5.stat().st_mtime_ns == first
    r = run_cli("tile", src, "--out", out, "--overwrite", "--patch-size", "128")
    assert r.returncode == 0 and h5.stat().st_mtime_ns != first
    assert read_patches(h5).attrs["target_patch_size"] == 128
    assert "patch_size: 128" in (out / "tile_config.yaml").read_text()


def test_mpp_from_csv_and_flag(tmp_path: Path, no_mpp_slide: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("tile", no_mpp_slide, "--out", out)
    assert r.returncode == 1 and "nompp_c: failed:" in r.stdout and "--mpp" in r.stdout
    r = run_cli("tile", no_mpp_slide, "--out", out, "--mpp", "0.5")
    assert r.returncode == 0
    a = read_patches(out / "patches" / "nompp_c.h5").attrs
    assert (a["mpp"], a["mpp_source"]) == (0.5, "cli")
    table = tmp_path / "slides.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path", "mpp"], [no_mpp_slide, "0.25"]])
    r = run_cli("tile", table, "--out", out, "--overwrite", "--mpp", "0.5")
    assert r.returncode == 0
    a = read_patches(out / "patches" / "nompp_c.h5").attrs
    assert (a["mpp"], a["mpp_source"], a["patch_size_level0"]) == (0.25, "csv", 512)


def test_config_errors_are_one_line(tmp_path: Path, tumour_slide) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("patch_sise: 256\n")
    r = run_cli("tile", tumour_slide[0], "--out", tmp_path / "o", "--config", str(bad))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "patch_sise" in r.stderr and "bad.yaml" in r.stderr
    r = run_cli("tile", tumour_slide[0], "--out", tmp_path / "o", "--config", "nosuchpreset")
    assert r.returncode == 1 and "biopsy" in r.stderr  # lists the presets


def test_biopsy_preset_applies(tmp_path: Path, tumour_slide) -> None:
    r = run_cli("tile", tumour_slide[0], "--out", tmp_path, "--config", "biopsy")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "tile_config.yaml").read_text()
    assert "min_tissue: 0.1" in text and "seg_mpp: 4.0" in text


def test_help_has_examples() -> None:
    r = run_cli("tile", "--help")
    assert r.returncode == 0 and "Example" in r.stdout
