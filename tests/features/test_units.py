"""Pure pieces of stage 2: supertile grouping, the streaming bag writer, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_mil.errors import ConfigError
from wsi_mil.features.extract import ExtractConfig, is_extracted
from wsi_mil.features.reader import make_groups
from wsi_mil.features.writer import BagWriter
from wsi_mil.io import h5
from wsi_mil.io.layout import encoder_dirname


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_groups_partition_the_rows(k: int, nx: int, ny: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(nx) * 256, np.arange(ny) * 256)
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    coords = coords[rng.random(len(coords)) < 0.7]
    groups = make_groups(coords, 256, k)
    rows = np.concatenate(groups) if groups else np.empty(0, int)
    assert sorted(rows.tolist()) == list(range(len(coords)))
    for g in groups:
        span = coords[g].max(0) - coords[g].min(0)
        assert (span <= 256 * (k - 1)).all() and len(g) <= k * k


def test_writer_orders_rows_and_drops_failures(tmp_path: Path) -> None:
    coords = np.arange(20).repeat(2).reshape(-1, 2) * 256
    feats = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    path = tmp_path / "bag.h5"
    with BagWriter(path, coords, 3) as w:
        for rows in (np.array([5, 1, 3]), np.array([0, 2, 4, 6, 7]), np.arange(8, 20)):
            keep = rows[~np.isin(rows, [3, 11])]
            w.write(keep, feats[keep])
        w.mark_failed(np.array([3, 11]))
        assert w.finish({"encoder": "x"}) == 18
    bag = h5.read_bag(path)
    kept = np.setdiff1d(np.arange(20), [3, 11])
    np.testing.assert_array_equal(bag.features, feats[kept])
    np.testing.assert_array_equal(bag.coords, coords[kept])
    assert is_extracted(path) and bag.attrs["complete"] == 1


def test_encoder_dirname() -> None:
    assert encoder_dirname("hf-hub:MahmoodLab/UNI") == "hf-hub_MahmoodLab_UNI"
    assert encoder_dirname("resnet50_trunc") == "resnet50_trunc"


def test_cli_extract(tiled: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from wsi_mil.cli import app

    out = tmp_path / "out"
    shutil.copytree(tiled / "patches", out / "patches")
    runner = CliRunner()
    res = runner.invoke(
        app, ["extract", "--out", str(out), "--encoder", "texture", "--workers", "0", "--pt"]
    )
    assert res.exit_code == 0, res.output
    assert "2 done" in res.output
    assert (out / "features" / "texture" / "h5_files" / "tum.h5").is_file()
    assert (out / "features" / "texture" / "pt_files" / "tum.pt").is_file()
    res = runner.invoke(app, ["extract", "--out", str(out), "--encoder", "nope"])
    assert res.exit_code == 1 and "unknown encoder 'nope'" in res.output
    res = runner.invoke(app, ["extract", "--out", str(tmp_path / "empty"), "--encoder", "texture"])
    assert res.exit_code == 1 and "no patch files" in res.output


def test_slide_without_patches_gives_an_empty_bag(tiled: Path, tmp_path: Path) -> None:
    from wsi_mil.features.cohort import extract_cohort

    pf = h5.read_patches(tiled / "patches" / "nor.h5")
    out = tmp_path / "out"
    h5.write_patches(out / "patches" / "nor.h5", np.empty((0, 2), np.int64), pf.attrs)
    summary = extract_cohort(out, "texture", overrides={"workers": 0}, progress=False)
    assert summary.empty == ["nor"] and not summary.failed
    bag = h5.read_bag(out / "features" / "texture" / "h5_files" / "nor.h5")
    assert bag.features.shape == (0, summary.dim) and bag.coords.shape == (0, 2)
    assert extract_cohort(out, "texture", progress=False).skipped == ["nor"]


def test_supertile_auto_follows_the_backend() -> None:
    assert ExtractConfig().supertile_for("openslide") == 1  # OpenSlide: per-patch reads
    assert ExtractConfig().supertile_for("tiffslide") == 4  # auto that opened with tiffslide
    assert ExtractConfig(backend="tiffslide", supertile=2).supertile_for("tiffslide") == 2
    with pytest.raises(ConfigError, match="supertile"):
        ExtractConfig(supertile=-1)
