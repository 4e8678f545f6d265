"""The one config loader (wsi_mil.config): every stage's dataclass through the same checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

import wsi_mil
from wsi_mil.cohort.config import ClusterConfig, load_cohort_config
from wsi_mil.config import CONFIG_DIR, apply_overrides, from_mapping, list_presets, load_config, preset_path
from wsi_mil.errors import ConfigError
from wsi_mil.evaluate.run import EvaluateConfig
from wsi_mil.features.extract import ExtractConfig
from wsi_mil.heatmaps.options import HeatmapOptions
from wsi_mil.mil.config import TrainConfig, load_train_config
from wsi_mil.tiling.run import TileConfig


class Case(NamedTuple):
    """A stage, its dataclass, a nested or plain key, a valid value for it and the typed result."""

    stage: str
    cls: type
    key: str
    value: Any
    typed: Any


CASES = [
    Case("tile", TileConfig, "segment.seg_mpp", 4, 4.0),
    Case("extract", ExtractConfig, "batch_size", "16", 16),
    Case("train", TrainConfig, "optim.epochs", 7, 7),
    Case("heatmap", HeatmapOptions, "percentiles", [2, 98], (2.0, 98.0)),
    Case("evaluate", EvaluateConfig, "classes", ["Tumor"], ("Tumor",)),
]


@pytest.fixture(params=CASES, ids=[c.stage for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_default_preset_is_the_dataclass_defaults(case: Case) -> None:
    assert load_config(case.cls, case.stage) == load_config(case.cls, case.stage, "default") == case.cls()
    assert "default" in list_presets(case.stage)
    assert preset_path(case.stage, "default").parent == CONFIG_DIR / case.stage


def test_preset_name_and_file_agree_with_a_nested_override(tmp_path: Path, case: Case) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(preset_path(case.stage, "default").read_text())
    sectioned = tmp_path / "sectioned.yaml"  # a resolved OUT/<stage>_config.yaml has a <stage>: section
    sectioned.write_text(yaml.safe_dump({case.stage: yaml.safe_load(plain.read_text())}))
    flags = {case.key: case.value}
    by_name = load_config(case.cls, case.stage, "default", flags)
    for path in (plain, sectioned):
        assert load_config(case.cls, case.stage, path, flags) == by_name
    assert _get(by_name, case.key) == case.typed and type(_get(by_name, case.key)) is type(case.typed)


def test_unknown_key_names_file_key_and_valid_ones(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "c.yaml"
    section, _, _ = case.key.rpartition(".")
    nested = f"{section}.nope" if section else "nope"
    path.write_text(yaml.safe_dump(apply_overrides({}, {nested: 1})))
    with pytest.raises(ConfigError) as exc:
        load_config(case.cls, case.stage, path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: unknown setting(s) {nested} ") and "\n" not in msg
    owner = _get(case.cls(), section) if section else case.cls()
    assert "valid: " + ", ".join(f.name for f in dataclasses.fields(owner)) in msg


def test_wrong_type_is_one_line_naming_file_and_key(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, {case.key: "many" if "." in case.key else {"a": "map"}})))
    with pytest.raises(ConfigError, match=rf"^{path}: {case.key} must be ") as exc:
        load_config(case.cls, case.stage, path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("stage", "cls", "overrides", "match"),
    [
        ("train", TrainConfig, {"optim.lr": -1e-4}, r"optim\.lr must be positive"),
        ("train", TrainConfig, {"optim.lr": 0}, r"optim\.lr must be positive"),
        ("train", TrainConfig, {"cv.folds": 1}, r"cv\.folds must be >= 2"),
        ("train", TrainConfig, {"cv.folds": -5}, r"cv\.folds must be >= 2"),
        ("train", TrainConfig, {"model.dropout": 1.5}, r"model\.dropout"),
        ("tile", TileConfig, {"patch_size": -256}, "patch_size must be ≥ 8"),
        ("tile", TileConfig, {"target_mpp": -0.5}, "target_mpp must be a positive"),
        ("tile", TileConfig, {"segment.seg_mpp": 0}, r"segment: seg_mpp must be positive"),
        ("tile", TileConfig, {"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        ("extract", ExtractConfig, {"batch_size": 0}, "batch_size must be ≥ 1"),
        ("heatmap", HeatmapOptions, {"alpha": 2}, r"alpha must be in \[0, 1\]"),
    ],
)
def test_out_of_range_values_are_refused(stage: str, cls: type, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        load_config(cls, stage, "default", overrides)
    # The preset is fine by itself, so the message names the flag that broke it, not the file.
    flag = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    assert str(exc.value).startswith(f"flag {flag}: ") and "\n" not in str(exc.value)


def test_a_file_out_of_range_is_named_even_with_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("optim: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: optim\.lr must be positive"):
        load_config(TrainConfig, "train", cfg, {"optim.epochs": 3})
    with pytest.raises(ConfigError, match=r"^flag optim\.lr=nan: optim\.lr must be a finite number"):
        load_config(TrainConfig, "train", cfg, {"optim.lr": float("nan")})


def test_typing_rules() -> None:
    cfg = from_mapping(TrainConfig, {"optim": {"lr": "1e-3", "epochs": 3.0}, "model": {"hidden": [64, "32"]}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.model.hidden == [64, 32]  # YAML's 1e-3 is a str
    assert from_mapping(ExtractConfig, {"weights": None}).weights is None
    bad = [
        (TrainConfig, {"standardize": "yes"}, "standardize must be true or false"),
        (TrainConfig, {"optim": {"epochs": 2.5}}, r"optim\.epochs must be an integer"),
        (TrainConfig, {"optim": {"lr": True}}, r"optim\.lr must be a number"),
        (TrainConfig, {"optim": 3}, "optim must be a mapping"),
        (TrainConfig, {"model": {"hidden": [64, "x"]}}, r"model\.hidden\[1\] must be an integer"),
        (HeatmapOptions, {"percentiles": [1, 50, 99]}, "percentiles must be a list of 2 values"),
        (ClusterConfig, {"memory_limit": ["4GB"]}, "memory_limit must be a string"),
    ]
    for cls, data, match in bad:
        with pytest.raises(ConfigError, match=rf"^src: {match}"):
            from_mapping(cls, data, "src")


def test_overrides_one_spelling() -> None:
    base = {"optim": {"lr": 0.1}, "tile": "biopsy"}
    assert apply_overrides(base, {"optim.epochs": 2, "cv": {"folds": 3}, "run_name": None}) == {
        "optim": {"lr": 0.1, "epochs": 2}, "cv": {"folds": 3}, "tile": "biopsy",
    }  # fmt: skip
    assert base == {"optim": {"lr": 0.1}, "tile": "biopsy"}  # not changed in place
    assert apply_overrides(base, {"optim": {}}) == base  # an empty section overrides nothing
    with pytest.raises(ConfigError, match=r"tile\.patch_size: tile is 'biopsy', not a section"):
        apply_overrides(base, {"tile.patch_size": 512})
    cfg = load_train_config("default", {"optim.epochs": 4, "model.lam": None})
    assert cfg.optim.epochs == 4 and cfg.model.lam == TrainConfig().model.lam  # None = not given


def test_cohort_sections_and_flags_go_through_the_same_loader(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("slides: s\nout: o\nstages: tile\ntile: biopsy\ntrain: {optim: {lr: 1.0e-3}}\n")
    cfg = load_cohort_config(path, {"tile.segment.seg_mpp": 2, "train.cv.folds": 3, "stages": "extract,tile"})
    assert cfg.tile == load_config(TileConfig, "tile", "biopsy", {"segment.seg_mpp": 2})
    assert cfg.train == load_train_config("default", {"optim.lr": 1e-3, "cv.folds": 3, "run_name": "cohort"})
    assert cfg.stages == ("tile", "extract")
    for body, match in [
        ("slides: s\nout: o\nstages: [tile]\nmpp: -0.25\n", "mpp must be a positive number"),
        ("slides: s\nout: o\nstages: [tile]\ntrain: {optim: {lr: -1}}\n", r"train: optim\.lr must be positive"),
        ("slides: s\nout: o\nstages: [tile]\ntrain: {cv: {folds: 0}}\n", r"train: cv\.folds must be >= 2"),
        ("slides: s\nout: o\nstages: [tile]\ntile: {patch_size: -1}\n", r"tile: patch_size must be ≥ 8"),
        ("slides: s\nout: o\nstages: [tile]\ntile: 3\n", "tile: expected a preset name or a mapping"),
        ("slides: s\nstages: [tile]\n", r"'out' is required \(the cohort output folder\)"),
        ("slides: s\nout: o\nsource: x\n", "unknown setting"),
    ]:
        path.write_text(body)
        with pytest.raises(ConfigError, match=rf"^{path}: .*{match}"):
            load_cohort_config(path)


def test_out_of_range_refused_before_any_work(tmp_path: Path) -> None:
    from wsi_mil.tiling.cohort import tile_cohort

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="patch_size"):
        tile_cohort([tmp_path / "none"], out, overrides={"patch_size": -256})
    r = subprocess.run(
        [str(Path(sys.executable).parent / "wsi-mil"), "train", "--out", str(out), "--labels", str(tmp_path / "l.csv"),
         "--lr", "-0.001"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "optim.lr must be positive" in r.stderr
    made = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert set(made) <= {".status", ".wsi-mil.lock"}  # at most the output lock: nothing tiled or trained


def test_presets_ship_inside_the_package() -> None:
    package = Path(wsi_mil.__file__).parent
    assert package / "configs" == CONFIG_DIR
    stages = {p.parent.name for p in CONFIG_DIR.glob("*/default.yaml")}
    assert stages == {"cohort", "evaluate", "extract", "heatmap", "tile", "train"}
    # That a built wheel carries them and its train preset loads: tests/test_wheel.py (make test-wheel).
