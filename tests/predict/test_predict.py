"""Stage 4: diagnosis of new slides, heatmaps, and their agreement with training."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tests.predict.conftest import ENCODER, RUN, Trained
from wsi_mil.cli import app
from wsi_mil.demo import label_of
from wsi_mil.errors import BagError, WsiMilError
from wsi_mil.features.extract import bag_path
from wsi_mil.heatmaps import heatmap_paths
from wsi_mil.io.h5 import read_bag, read_heatmap_data
from wsi_mil.mil.inference import FoldEnsemble, load_model, predict_bag
from wsi_mil.predict import load_settings, predict_cohort, predict_slide
from wsi_mil.synthetic.evaluate import localisation

runner = CliRunner()


@pytest.fixture(scope="session")
def predicted(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """The held-out slides and an unreadable file through ``wsi-mil predict``."""
    out = tmp_path_factory.mktemp("diagnosis")
    broken = out.parent / "broken_99.tif"
    broken.write_bytes(b"II*\x00 this is not a slide")
    args = ["predict", *map(str, trained.held), str(broken), "--model", str(trained.run_dir)]
    result = runner.invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output  # one slide failed
    return out, pd.read_csv(out / "predictions.csv")


def test_pipeline_yaml_records_training_settings(trained: Trained) -> None:
    settings = load_settings(trained.run_dir)
    doc = yaml.safe_load(settings.path.read_text())
    assert settings.encoder == ENCODER
    assert doc["tile"]["patch_size"] == 256 and doc["tile"]["target_mpp"] == 0.5
    bag = read_bag(bag_path(trained.out, ENCODER, trained.train[0].stem))
    assert settings.weights_id == bag.attrs["encoder_weights"]


def test_predict_cli_lists_a_broken_slide_and_completes_the_others(
    trained: Trained, predicted: tuple[Path, pd.DataFrame]
) -> None:
    out, rows = predicted
    rows = rows.set_index("slide_id")
    assert rows.loc["broken_99", "status"] == "failed"
    assert "broken_99.tif" in rows.loc["broken_99", "error"]
    ok = [p.stem for p in trained.held]
    assert (rows.loc[ok, "status"] == "ok").all()
    assert rows.loc[ok, "n_patches"].gt(0).all()
    probs = rows.loc[ok, ["prob_normal", "prob_tumour"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(rows.loc[ok, "prediction"]) == [["normal", "tumour"][int(p[1] >= 0.5)] for p in probs]
    for sid in ok:
        paths = heatmap_paths(out, RUN, sid)
        assert all(paths[k].exists() for k in ("h5", "png", "tiff", "geojson")), sid
    assert not heatmap_paths(out, RUN, "broken_99")["h5"].exists()
    assert not rows["trained_on"].any()


def test_predict_on_a_training_slide_warns_in_sample(trained: Trained, tmp_path: Path) -> None:
    lines: list[str] = []
    summary = predict_cohort(trained.train[:1], trained.run_dir, tmp_path, echo=lines.append, progress=False)
    assert summary.rows[0]["trained_on"] is True
    assert any("in-sample" in line and trained.train[0].stem in line for line in lines)


def test_predict_tiles_new_slides_like_the_training_ones(
    trained: Trained, predicted: tuple[Path, pd.DataFrame]
) -> None:
    out, _ = predicted
    new = read_bag(bag_path(out, ENCODER, trained.held[0].stem))
    old = read_bag(bag_path(trained.out, ENCODER, trained.train[0].stem))
    for key in ("encoder", "encoder_weights", "patch_size", "target_mpp", "patch_size_level0"):
        assert new.attrs[key] == old.attrs[key], key


def test_heldout_diagnosis_and_localisation(trained: Trained, predicted: tuple[Path, pd.DataFrame]) -> None:
    """Slides never seen in training: right diagnosis; tumour patches ranked above normal ones."""
    out, rows = predicted
    rows = rows.set_index("slide_id")
    held = trained.held
    truth = np.array([label_of(p) == "tumour" for p in held])
    p_tumour = rows.loc[[p.stem for p in held], "prob_tumour"].to_numpy()
    assert ((p_tumour >= 0.5) == truth).all(), p_tumour
    loc = localisation([heatmap_paths(out, RUN, p.stem)["h5"] for p in held], held, "tumour")
    assert loc.n_tumour > 10 and loc.n_normal > 50
    assert loc.prob_auc >= 0.90, loc
    assert loc.attention_auc >= 0.90, loc


def test_predict_matches_out_of_fold_predictions(trained: Trained) -> None:
    """Each fold's model on its own test bags reproduces train's out-of-fold probabilities."""
    ens = load_model(trained.run_dir)
    oof = pd.read_csv(trained.run_dir / "predictions.csv").set_index("slide_id")
    for sid, row in oof.iterrows():
        fold_model = FoldEnsemble([ens.models[int(row["fold"])]], ens.classes, ens.encoder)
        got = predict_slide(trained.out, trained.run_dir, str(sid), model=fold_model)
        for c in ens.classes:
            assert got[f"prob_{c}"] == pytest.approx(row[f"prob_{c}"], abs=1e-5), (sid, c)
        assert got["prediction"] == row["prediction"]


def test_heatmap_h5_holds_the_ensemble_outputs(trained: Trained, predicted: tuple[Path, pd.DataFrame]) -> None:
    out, rows = predicted
    sid = trained.held[1].stem
    data = read_heatmap_data(heatmap_paths(out, RUN, sid)["h5"])
    bag = read_bag(bag_path(out, ENCODER, sid))
    pred = predict_bag(load_model(trained.run_dir), bag.features)
    np.testing.assert_array_equal(data.coords, bag.coords)
    np.testing.assert_allclose(data.attention, pred.attention[0].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(data.instance_probs, pred.instance_probs[0].numpy(), rtol=1e-5, atol=1e-6)
    assert data.attention.sum() == pytest.approx(1.0, abs=1e-4)
    prob = rows.set_index("slide_id").loc[sid, "prob_tumour"]
    assert prob == pytest.approx(float(pred.bag_probs[0, 1]), abs=1e-6)


def test_bag_from_other_weights_is_refused(trained: Trained, tmp_path: Path) -> None:
    sid = trained.train[0].stem
    src = bag_path(trained.out, ENCODER, sid)
    dst = bag_path(tmp_path, ENCODER, sid)
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["encoder_weights"] = "sha256:not-the-same"
    with pytest.raises(BagError, match="extracted with weights"):
        predict_slide(tmp_path, trained.run_dir, sid)


def test_model_settings_cannot_be_overridden(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(WsiMilError, match="come from the model"):
        predict_cohort(trained.held[:1], trained.run_dir, tmp_path, extract_overrides={"patch_size": 512})


def test_predict_without_a_trained_run_fails_cleanly(trained: Trained, tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(trained.held[0]), "--model", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert str(tmp_path) in result.output and result.output.count("\n") == 1


def test_heatmap_cli_marks_training_slides(trained: Trained) -> None:
    ids = [trained.train[0].stem, trained.train[1].stem]
    args = ["heatmap", "--out", str(trained.out), "--model", str(trained.run_dir), "--slides", ",".join(ids)]
    result = runner.invoke(app, [*args, "--score", "tumour", "--zarr", "--no-progress"])
    assert result.exit_code == 0, result.output
    index = pd.read_csv(trained.out / "heatmaps" / RUN / "index.csv")
    assert sorted(index["slide_id"]) == sorted(ids)
    assert index["trained_on"].all()
    for sid in ids:
        paths = heatmap_paths(trained.out, RUN, sid)
        assert paths["zarr"].is_dir() and paths["tiff"].is_file()

    # Rendering another slide adds its row; the index keeps the earlier ones.
    third = trained.train[2].stem
    args[-1] = third
    assert runner.invoke(app, [*args, "--no-progress"]).exit_code == 0
    index = pd.read_csv(trained.out / "heatmaps" / RUN / "index.csv")
    assert sorted(index["slide_id"]) == sorted([*ids, third])


def test_unknown_score_is_refused_before_any_slide(trained: Trained, tmp_path: Path) -> None:
    args = ["predict", str(trained.held[0]), "--model", str(trained.run_dir), "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--score", "stroma"])
    assert result.exit_code == 1
    assert "'stroma' is neither 'attention' nor a class (normal, tumour)" in result.output
    assert not (tmp_path / "patches").exists()


def test_heatmap_cli_unknown_slide_fails_with_reason(trained: Trained) -> None:
    args = ["heatmap", "--out", str(trained.out), "--model", str(trained.run_dir), "--slides", "nope"]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1
    assert "nope" in result.output and "no feature bag" in result.output


def test_overlapping_heatmap_recipe(trained: Trained, tmp_path: Path) -> None:
    """docs/predict.md: tile with 50 % overlap, extract, then `wsi-mil heatmap` on that folder."""
    from wsi_mil.features import extract_cohort
    from wsi_mil.tiling.cohort import tile_cohort

    slide = trained.held[0]
    tile_cohort([slide], tmp_path, overrides={"overlap": 0.5}, progress=False)
    extract_cohort(tmp_path, ENCODER, progress=False)
    args = ["heatmap", "--out", str(tmp_path), "--model", str(trained.run_dir), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = read_heatmap_data(heatmap_paths(tmp_path, RUN, slide.stem)["h5"])
    plain = read_bag(bag_path(trained.out, ENCODER, trained.train[0].stem))
    size = int(data.attrs["patch_size_level0"])
    assert size == int(plain.attrs["patch_size_level0"])
    steps = np.diff(np.unique(data.coords[:, 0]))
    assert steps.min() == size // 2  # neighbours overlap by half a patch
    assert not pd.read_csv(tmp_path / "heatmaps" / RUN / "index.csv")["trained_on"].any()


def test_predict_aggregates_per_case_from_a_slide_csv(trained: Trained, tmp_path: Path) -> None:
    """A slide CSV with case_id: each slide row carries its case; the case table means its slides."""
    csv = tmp_path / "new.csv"
    held = trained.held[:3]
    pd.DataFrame({"case_id": ["P1", "P1", "P2"], "path": [str(p) for p in held]}).to_csv(csv, index=False)
    summary = predict_cohort([csv], trained.run_dir, tmp_path / "dx", progress=False)
    slides = pd.read_csv(tmp_path / "dx" / "predictions.csv").set_index("slide_id")
    assert slides.loc[[p.stem for p in held], "case_id"].tolist() == ["P1", "P1", "P2"]
    assert summary.case_csv == tmp_path / "dx" / "case_predictions.csv"
    cases = pd.read_csv(summary.case_csv).set_index("case_id")
    assert cases.loc["P1", "n_slides"] == 2 and cases.loc["P2", "n_slides"] == 1
    mean = slides.loc[[held[0].stem, held[1].stem], "prob_tumour"].mean()
    assert cases.loc["P1", "prob_tumour"] == pytest.approx(mean, rel=1e-6)
    assert cases.loc["P2", "prediction"] == slides.loc[held[2].stem, "prediction"]
