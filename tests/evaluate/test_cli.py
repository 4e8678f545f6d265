"""``wsi-mil evaluate`` through the command line: what EVAL holds, and bad input leaving it as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from shapely.geometry import box
from typer.testing import CliRunner

from tests.evaluate.conftest import grid, write_heatmap
from wsi_mil.cli import app
from wsi_mil.evaluate.export import write_asap_xml

runner = CliRunner()
DIMS = (4096, 2048)
BAD_GEOJSON = json.dumps(
    {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "x"}}],
    }
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Heatmaps of three slides (two annotated in ASAP XML, one negative) and their annotations."""
    root = tmp_path_factory.mktemp("eval_cli")
    coords = grid(*DIMS, 256)
    rng = np.random.default_rng(1)
    for sid, lesion in (("a", box(256, 256, 1280, 1280)), ("b", box(2048, 512, 3328, 1536)), ("c", None)):
        inside = np.zeros(len(coords))
        if lesion is not None:
            write_asap_xml(root / "ann" / f"{sid}.xml", lesion)
            inside = np.array([lesion.contains(box(x, y, x + 256, y + 256)) for x, y in coords], float)
        write_heatmap(root / "hm", sid, coords, 256, np.clip(0.6 * inside + 0.5 * rng.random(len(coords)), 0, 1), DIMS)
    return root / "hm", root / "ann"


def _args(hm: Path, ann: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--heatmaps", str(hm), "--annotations", str(ann), "--out", str(out), *extra]


def test_evaluate_writes_summary_table_and_plots(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    hm, ann = inputs
    out = tmp_path / "eval"
    result = runner.invoke(app, _args(hm, ann, out, "--threshold", "0.6"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"attention", "prob_normal", "prob_tumour"}
    for m in summary.values():
        assert set(m) == {"patch_auc", "patch_auc_pooled", "average_precision", "froc", "dice"}
    assert summary["prob_tumour"]["patch_auc"] > 0.9 and summary["prob_tumour"]["froc"] > 0.5
    table = pd.read_csv(out / "per_slide.csv").set_index("slide_id")
    assert table.loc["a", "n_pos"] == 16 and table.loc["c", "n_pos"] == 0 and not table.loc["c", "positive"]
    assert table.loc[["a", "b"], "n_lesions"].tolist() == [1, 1]
    assert (table["n_pos"] + table["n_neg"] + table["n_ignored"] == table["n_patches"]).all()
    assert {"prob_tumour_auc", "prob_tumour_dice", "prob_tumour_lesions_found", "attention_auc"} <= set(table.columns)
    for png in ("roc.png", "froc.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert "threshold: 0.6" in (out / "evaluate_config.yaml").read_text()
    assert "prob_tumour: patch_auc" in result.output


@pytest.mark.parametrize(
    ("name", "text", "cause"),
    [
        ("a.xml", "<ASAP_Annotations><Annotations><Annotation", "not a readable XML file"),
        ("a.geojson", BAD_GEOJSON, "feature 0 is not a valid GeoJSON feature"),
    ],
)
def test_a_malformed_annotation_fails_in_one_line_and_writes_nothing(
    inputs: tuple[Path, Path], tmp_path: Path, name: str, text: str, cause: str
) -> None:
    hm, _ = inputs
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / name).write_text(text)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier evaluation: kept as it was
    result = runner.invoke(app, _args(hm, ann, out))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and str(ann / name) in result.output and cause in result.output
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"] and (out / "summary.json").read_text() == "{}"


def test_a_class_found_in_no_file_is_refused_naming_the_classes(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    hm, ann = inputs
    result = runner.invoke(app, _args(hm, ann, tmp_path / "eval", "--class", "Tumor"))
    assert result.exit_code == 1
    assert "no annotation of class 'Tumor'" in result.output and "classes found: _0" in result.output
    assert not (tmp_path / "eval").exists()


def test_slides_choose_and_the_runs_tables_mark_in_sample_slides(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    hm, ann = inputs
    pd.DataFrame({"slide_id": ["a", "b", "c"], "trained_on": [True, False, False]}).to_csv(
        tmp_path / "index.csv", index=False
    )
    run = tmp_path / "heatmaps" / "r"
    run.mkdir(parents=True)
    for p in hm.glob("*.h5"):
        (run / p.name).symlink_to(p)
    (run / "index.csv").write_bytes((tmp_path / "index.csv").read_bytes())
    out = tmp_path / "eval"
    result = runner.invoke(app, _args(run, ann, out, "--slides", "a,c"))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "per_slide.csv")
    assert table["slide_id"].tolist() == ["a", "c"] and table["trained_on"].tolist() == [True, False]
    assert "1 of 2 slides were in the run's training splits" in result.output
    result = runner.invoke(app, _args(run, ann, out, "--slides", "a,zz"))
    assert result.exit_code == 1 and "no heatmap file for slide(s) zz" in result.output
