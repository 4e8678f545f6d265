"""Stage 2 end to end on tiny synthetic slides with the built-in ``texture`` encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.features.cohort import extract_cohort
from wsi_mil.features.extract import bag_path, is_extracted, pt_path
from wsi_mil.features.runtime import Runner
from wsi_mil.harness.status import read_status
from wsi_mil.io import h5


def _run(out: Path, **overrides: object) -> object:
    kw = {"workers": 0, "batch_size": 16, **overrides}
    return extract_cohort(out, "texture", overrides=kw, progress=False)


def test_bags_follow_the_layout(out: Path) -> None:
    summary = _run(out, workers=2)
    assert sorted(summary.done) == ["nor", "tum"] and not summary.failed
    for sid in ("nor", "tum"):
        bag = h5.read_bag(bag_path(out, "texture", sid))
        patches = h5.read_patches(out / "patches" / f"{sid}.h5")
        assert bag.features.dtype == np.float32 and bag.features.ndim == 2
        assert bag.features.shape == (len(patches.coords), summary.dim)
        assert np.isfinite(bag.features).all()
        np.testing.assert_array_equal(bag.coords, patches.coords)
        a = bag.attrs
        assert a["encoder"] == "texture" and a["encoder_weights"] == "builtin:texture-v1"
        assert a["preprocess_input_size"] == 224 and len(a["preprocess_mean"]) == 3
        assert a["patch_size_level0"] == 256 and a["target_mpp"] == 0.5 and a["n_unreadable"] == 0
    rows = {r["slide_id"]: r for r in read_status(out) if r["stage"] == "extract"}
    assert rows["tum"]["state"] == "done" and int(rows["tum"]["n_patches"]) > 0
    assert (out / "features" / "texture" / "extract_config.yaml").is_file()


def test_same_slide_twice_is_identical_whatever_the_reading(out: Path, tmp_path: Path) -> None:
    other = tmp_path / "again"
    shutil.copytree(out / "patches", other / "patches")
    _run(out, workers=2, supertile=4)
    _run(other, workers=0, supertile=1)  # per-patch reads in the main process
    for sid in ("nor", "tum"):
        a = h5.read_bag(bag_path(out, "texture", sid)).features
        b = h5.read_bag(bag_path(other, "texture", sid)).features
        np.testing.assert_array_equal(a, b)


def test_backends_agree(out: Path, tmp_path: Path) -> None:
    other = tmp_path / "ts"
    shutil.copytree(out / "patches", other / "patches")
    _run(out, backend="openslide")
    _run(other, backend="tiffslide")
    a = h5.read_bag(bag_path(out, "texture", "tum")).features
    b = h5.read_bag(bag_path(other, "texture", "tum")).features
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    # supertile left at auto (0): per-patch reads with OpenSlide, 4 × 4 with tiffslide.
    assert h5.read_bag(bag_path(out, "texture", "tum")).attrs["supertile"] == 1
    assert h5.read_bag(bag_path(other, "texture", "tum")).attrs["supertile"] == 4


def test_resume_skips_complete_bags(out: Path) -> None:
    _run(out)
    bag = bag_path(out, "texture", "tum")
    stamp = bag.stat().st_mtime_ns
    summary = _run(out)
    assert sorted(summary.skipped) == ["nor", "tum"] and not summary.done
    assert bag.stat().st_mtime_ns == stamp
    assert sorted(_run(out, pt=False).skipped) == ["nor", "tum"]


def test_crash_mid_slide_leaves_nothing_complete(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = Runner.__call__

    def flaky(self: Runner, images: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, images)

    monkeypatch.setattr(Runner, "__call__", flaky)
    summary = _run(out, batch_size=4, workers=0)
    first = sorted(["nor", "tum"])[0]
    assert first in summary.failed and "simulated crash" in summary.failed[first]
    folder = bag_path(out, "texture", first).parent
    assert not bag_path(out, "texture", first).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{first}")]  # temp file removed
    monkeypatch.setattr(Runner, "__call__", real)
    assert first in _run(out).done  # the next run redoes it


def test_incomplete_file_is_not_taken_as_done(out: Path) -> None:
    import h5py

    _run(out)
    bag = bag_path(out, "texture", "nor")
    with h5py.File(bag, "a") as f:
        del f.attrs["complete"]  # as if a writer died before its last step
    assert not is_extracted(bag)
    assert _run(out).done == ["nor"]


def test_pt_files(out: Path) -> None:
    import torch

    _run(out, pt=True)
    t = torch.load(pt_path(out, "texture", "tum"), weights_only=True)
    np.testing.assert_array_equal(t.numpy(), h5.read_bag(bag_path(out, "texture", "tum")).features)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupted_tiles(damaged: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "out"
    shutil.copytree(damaged / "patches", out / "patches")
    summary = _run(out, backend=backend, workers=2)
    assert sorted(summary.done) == ["few", "good"]
    assert "many" in summary.failed and "unreadable" in summary.failed["many"]
    bag = h5.read_bag(bag_path(out, "texture", "few"))
    tiled = h5.read_patches(out / "patches" / "few.h5").coords
    assert bag.attrs["n_unreadable"] == 1 and len(bag.coords) == len(tiled) - 1
    assert np.isfinite(bag.features).all()
    kept = {tuple(c) for c in bag.coords.tolist()}
    lost = [c for c in tiled.tolist() if tuple(c) not in kept]
    assert len(lost) == 1
    assert [tuple(c) for c in bag.coords.tolist()] == [
        tuple(c) for c in tiled.tolist() if c != lost[0]
    ]
    good = h5.read_bag(bag_path(out, "texture", "good"))
    assert good.attrs["n_unreadable"] == 0
    rows = {r["slide_id"]: r for r in read_status(out) if r["stage"] == "extract"}
    assert rows["many"]["state"] == "failed" and "unreadable" in rows["many"]["reason"]
    assert "unreadable" in rows["few"]["detail"]
    assert not bag_path(out, "texture", "many").exists()


def test_texture_features_separate_tumour(tmp_path: Path) -> None:
    """The demo's MIL model learns from these features: tumour and normal patches must differ."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.cohort import tile_cohort

    slide = tmp_path / "slides" / "big.tif"
    slide.parent.mkdir()
    truth = write_synthetic_slide(
        slide,
        SyntheticSpec(
            width=4096, height=4096, tumour=True, tumour_fraction=0.4, n_tissue=2, seed=5
        ),
    )
    out = tmp_path / "out"
    tile_cohort([slide.parent], out, progress=False)
    _run(out, workers=2)
    bag = h5.read_bag(bag_path(out, "texture", "big"))
    frac = np.array([truth.fraction_in(x, y, 256, "tumour") for x, y in bag.coords])
    sure = (frac > 0.5) | (frac < 0.05)
    X, y = bag.features[sure], frac[sure] > 0.5
    assert y.sum() >= 8 and (~y).sum() >= 8
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    acc = cross_val_score(LogisticRegression(max_iter=2000), X, y, cv=3)
    print(
        f"tumour vs normal patches ({int(y.sum())} vs {int((~y).sum())}): accuracy {acc.mean():.3f}"
    )
    assert acc.mean() > 0.9
