"""``wsi-mil train`` is a thin command over train_run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from wsi_mil.cli import app


def test_train_command(tmp_path: Path, cohort) -> None:
    csv = cohort(tmp_path, n=12)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hidden": [16]}, "optim": {"epochs": 2}}))
    args = [
        "train",
        "--out",
        str(tmp_path),
        "--labels",
        str(csv),
        "--config",
        str(cfg),
        "--folds",
        "3",
        "--run-name",
        "cli",
        "--model",
        "attention",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "models" / "cli"
    assert "accuracy" in res.output and str(run) in res.output
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["name"] == "attention" and resolved["optim"]["epochs"] == 2
    assert resolved["cv"]["folds"] == 3 and resolved["encoder"] == "toyenc"
    assert len(json.loads((run / "metrics.json").read_text())["folds"]) == 3

    bad = CliRunner().invoke(
        app, ["train", "--out", str(tmp_path), "--labels", str(csv), "--encoder", "nope"]
    )
    assert bad.exit_code == 1
    assert "error:" in bad.output and "nope" in bad.output and "Traceback" not in bad.output
