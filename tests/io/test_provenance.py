"""Provenance: outputs record what made them; resume reuses, refuses or redoes accordingly."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from wsi_mil.errors import ConfigError
from wsi_mil.features import extract_cohort
from wsi_mil.features.extract import bag_path
from wsi_mil.io.h5 import read_bag, read_patches
from wsi_mil.io.provenance import (
    PROVENANCE,
    SLIDE_FINGERPRINT,
    StaleOutputError,
    changes,
    digest,
    recorded,
    slide_fingerprint,
    stamp,
)
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.tiling.cohort import tile_cohort

ENC = "texture"


def _slide(path: Path, seed: int, tumour: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_slide(path, SyntheticSpec(width=3072, height=2048, tumour=tumour, n_tissue=2, seed=seed))
    return path


def test_fingerprint_is_content_not_name(tmp_path: Path) -> None:
    a = _slide(tmp_path / "a" / "s.tif", 1)
    b = _slide(tmp_path / "b" / "s.tif", 2)  # same name, other content
    copy = tmp_path / "c" / "renamed.tif"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert slide_fingerprint(a) != slide_fingerprint(b)
    assert slide_fingerprint(a) == slide_fingerprint(copy)


def test_changes_name_every_difference() -> None:
    old = {"tile": {"patch_size": 256, "overlap": 0.0}, "slide": "x"}
    new = {"tile": {"patch_size": 512, "overlap": 0.0}, "slide": "y"}
    assert changes(old, new) == ["slide: x → y", "tile.patch_size: 256 → 512"]
    assert changes(old, old) == [] and digest(old) != digest(new)


def test_tile_reuses_refuses_and_overwrites(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "slides" / "s1.tif", 3)
    out = tmp_path / "out"
    first = tile_cohort([slide], out, progress=False)
    assert first.done == ["s1"]
    attrs = read_patches(out / "patches" / "s1.h5").attrs
    assert recorded(attrs)["tile"]["patch_size"] == 256 and attrs[SLIDE_FINGERPRINT] == slide_fingerprint(slide)

    assert tile_cohort([slide], out, progress=False).skipped == ["s1"]  # same settings: reused

    changed = tile_cohort([slide], out, overrides={"patch_size": 128}, progress=False)
    assert "tile.patch_size: 256 → 128" in changed.failed["s1"] and "--overwrite" in changed.failed["s1"]
    assert read_patches(out / "patches" / "s1.h5").attrs[PROVENANCE] == attrs[PROVENANCE]  # nothing lost

    redo = tile_cohort([slide], out, overrides={"patch_size": 128}, overwrite=True, progress=False)
    assert redo.done == ["s1"]
    assert recorded(read_patches(out / "patches" / "s1.h5").attrs)["tile"]["patch_size"] == 128


def test_tile_refuses_another_file_under_the_same_name(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "slides" / "s1.tif", 4)
    out = tmp_path / "out"
    tile_cohort([slide], out, progress=False)
    _slide(slide, 5)  # a different slide now has that path
    again = tile_cohort([slide], out, progress=False)
    assert "slide: size:" in again.failed["s1"]


def test_extract_refuses_other_precision_and_stale_patches(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "slides" / "s1.tif", 6)
    out = tmp_path / "out"
    tile_cohort([slide], out, progress=False)
    extract_cohort(out, ENC, overrides={"precision": "fp32"}, progress=False)
    bag = read_bag(bag_path(out, ENC, "s1"), load_features=False)
    made = recorded(bag.attrs)
    assert made["extract"]["precision"] == "fp32" and made["patches"]["tile"]["patch_size"] == 256
    assert extract_cohort(out, ENC, overrides={"precision": "fp32"}, progress=False).skipped == ["s1"]

    # The bag as a GPU run in bf16 would have recorded it: a CPU (fp32) resume refuses it.
    with h5py.File(bag_path(out, ENC, "s1"), "r+") as f:
        gpu = {**made, "extract": {**made["extract"], "precision": "bf16"}}
        f.attrs.update(stamp(gpu))
    other = extract_cohort(out, ENC, overrides={"precision": "fp32"}, progress=False)
    assert "extract.precision: bf16 → fp32" in other.failed["s1"]

    # Re-tiling with other settings makes the bag stale: refused, then redone with --overwrite.
    tile_cohort([slide], out, overrides={"overlap": 0.5}, overwrite=True, progress=False)
    stale = extract_cohort(out, ENC, overrides={"precision": "fp32"}, progress=False)
    assert "patches.tile.overlap: 0.0 → 0.5" in stale.failed["s1"]
    redo = extract_cohort(out, ENC, overrides={"precision": "fp32"}, overwrite=True, progress=False)
    assert redo.done == ["s1"]


def test_stale_output_error_is_one_line(tmp_path: Path) -> None:
    from wsi_mil.io.provenance import check

    with pytest.raises(StaleOutputError) as err:
        check("s1", tmp_path / "x.h5", {}, {"tile": {"patch_size": 256}})
    assert "\n" not in str(err.value) and "older wsi-mil" in str(err.value)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("prov_cohort")
    slides = [_slide(root / "slides" / f"s{i}.tif", 10 + i, tumour=i % 2 == 0) for i in range(8)]
    out = root / "out"
    tile_cohort(slides, out, progress=False)
    extract_cohort(out, ENC, overrides={"precision": "fp32"}, progress=False)
    labels = root / "labels.csv"
    pd.DataFrame(
        {"slide_id": [p.stem for p in slides], "label": ["tumour" if i % 2 == 0 else "normal" for i in range(8)]}
    ).to_csv(labels, index=False)
    return out, slides, labels


def _train(out: Path, labels: Path, name: str) -> Path:
    from wsi_mil.mil import load_train_config, train_run

    cfg = load_train_config(
        None, {"run_name": name, "cv.folds": 2, "cv.val_fraction": 0.4, "optim.epochs": 2, "model.hidden": [8]}
    )
    return train_run(out, labels, ENC, cfg, progress=False)


def test_pipeline_yaml_comes_from_the_bags_not_the_current_config(cohort: tuple[Path, list[Path], Path]) -> None:
    out, _, labels = cohort
    cfg_file = out / "tile_config.yaml"
    saved = cfg_file.read_text()
    doc = yaml.safe_load(saved)
    doc["tile"]["patch_size"] = 999  # the cohort's config changed after the bags were made
    cfg_file.write_text(yaml.safe_dump(doc))
    try:
        run = _train(out, labels, "from_bags")
    finally:
        cfg_file.write_text(saved)
    pipeline = yaml.safe_load((run / "pipeline.yaml").read_text())
    assert pipeline["tile"]["patch_size"] == 256
    assert pipeline["extract"]["precision"] == "fp32"
    model = yaml.safe_load((run / "model.json").read_text())
    assert model["provenance"] and model["bag_settings"] == digest(pipeline["bag_settings"])
    splits = pd.read_csv(run / "splits.csv")
    assert splits[SLIDE_FINGERPRINT].str.startswith("size:").all()


def test_train_refuses_bags_made_differently(cohort: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    out, slides, labels = cohort
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    tile_cohort([slides[0]], mixed, overrides={"min_tissue": 0.5}, overwrite=True, progress=False)
    extract_cohort(mixed, ENC, overrides={"precision": "fp32"}, slide_ids=["s0"], overwrite=True, progress=False)
    with pytest.raises(ConfigError, match=r"s1\.h5: made differently from .*s0\.h5 .*min_tissue"):
        _train(mixed, labels, "mixed")


def test_predict_refuses_other_precision_and_trained_on_is_identity(
    cohort: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    from wsi_mil.errors import WsiMilError
    from wsi_mil.predict import predict_cohort

    out, slides, labels = cohort
    run = _train(out, labels, "for_predict")
    with pytest.raises(WsiMilError, match="precision"):
        predict_cohort([slides[0]], run, tmp_path / "p0", extract_overrides={"precision": "bf16"}, progress=False)

    same = tmp_path / "copy" / slides[0].name  # the training slide, copied elsewhere
    same.parent.mkdir()
    shutil.copy(slides[0], same)
    impostor = _slide(tmp_path / "other" / slides[1].name, 99)  # a new slide sharing a training slide's name
    summary = predict_cohort([same, impostor], run, tmp_path / "p1", progress=False)
    trained_on = {r["slide_id"]: r["trained_on"] for r in summary.rows}
    assert trained_on == {slides[0].stem: True, slides[1].stem: False}
