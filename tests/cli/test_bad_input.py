"""Hostile input on every command: one line naming the file (or flag) and the cause, nothing lost.

The catalogue below is the one place these cases live (docs/errors.md lists them). Each
case damages a fresh copy of a small trained cohort (built once per module), runs the
command as a user does, and checks the rule of docs/errors.md:

* exit code ≠ 0, and the error is one line (no traceback, no library's multi-line advice)
  naming the offending file or flag and the cause;
* a setting out of range is refused before any work starts: no file is written;
* every file already in OUT is byte-identical afterwards;
* where one slide is bad, the others are processed all the same.

Most cases run in-process through the typer app (each subprocess pays ~3 s importing
torch); those marked ``SUBPROCESS`` run the installed console script, so exit code and
stderr are exactly what a user sees.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.demo import label_of
from wsi_mil.io.layout import LOCK, STATUS_CSV, STATUS_STORE, Layout
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

ENCODER = "texture"
RUN = "r1"
WSI_MIL = Path(sys.executable).with_name("wsi-mil")
TRAIN_YAML = "cv: {folds: 2, val_fraction: 0.4}\noptim: {epochs: 2}\n"


@dataclass
class World:
    """The pristine cohort every case copies: slides, OUT (tiled, extracted, trained), labels."""

    root: Path
    slides: list[Path]
    held: Path
    out: Path
    labels: Path
    train_yaml: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from wsi_mil.features import extract_cohort
    from wsi_mil.mil import load_train_config, train_run
    from wsi_mil.tiling.cohort import tile_cohort

    root = tmp_path_factory.mktemp("bad_input")
    paths = []
    for i in range(9):
        tumour = i % 2 == 0
        path = root / "slides" / f"{'tumour' if tumour else 'normal'}_{i:02d}.tif"
        path.parent.mkdir(exist_ok=True)
        write_synthetic_slide(path, SyntheticSpec(width=2048, height=2048, tumour=tumour, tumour_fraction=0.4,
                                                  n_tissue=1, seed=500 + i))
        paths.append(path)
    slides, held = paths[:8], paths[8]
    held_dir = root / "held"
    held_dir.mkdir()
    held = held.rename(held_dir / held.name)
    out = root / "out"
    tile_cohort(list(slides), out, progress=False)
    extract_cohort(out, ENCODER, progress=False)
    labels = root / "labels.csv"
    pd.DataFrame({"slide_id": [p.stem for p in slides], "label": [label_of(p) for p in slides]}).to_csv(
        labels, index=False
    )
    train_yaml = root / "train.yaml"
    train_yaml.write_text(TRAIN_YAML)
    cfg = load_train_config(train_yaml, {"run_name": RUN})
    train_run(out, labels, ENCODER, cfg, progress=False)
    return World(root, slides, held, out, labels, train_yaml)


# --------------------------------------------------------------------------- the catalogue


@dataclass
class Run:
    """What a case runs and what the one error line must contain.

    ``failing``: the slide that fails while the others (``good``: files that must exist
    afterwards) are processed; None means the whole command is refused up front, before
    writing anything. ``ok``: valid input that must succeed (a BOM, say). ``also_failing``:
    further bad slides of the same corpus, each reported on a line of its own.
    """

    argv: list[str]
    expect: tuple[str, ...]
    failing: str | None = None
    good: tuple[Path, ...] = ()
    ok: bool = False
    also_failing: tuple[str, ...] = ()


@dataclass
class Ctx:
    """One case's sandbox: a fresh copy of OUT under ``d``."""

    w: World
    d: Path
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.d / "out"
        shutil.copytree(self.w.out, self.out, symlinks=True)

    @property
    def model(self) -> Path:
        return self.out / "models" / RUN

    def bag(self, sid: str) -> Path:
        return Layout(self.out).bag(ENCODER, sid)

    def patches(self, sid: str) -> Path:
        return Layout(self.out).patches(sid)

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.d / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def train(self, *extra: str, labels: Path | None = None) -> list[str]:
        return ["train", "--out", str(self.out), "--labels", str(labels or self.w.labels),
                "--config", str(self.w.train_yaml), "--run-name", "again", *extra]


CATALOGUE: dict[str, Callable[[Ctx], Run]] = {}
#: Cases run through the installed console script rather than in-process.
SUBPROCESS = {
    "train-flag-lr-negative", "train-labels-not-utf8", "tile-flag-mpp-negative", "extract-weights-garbage-pth",
    "predict-model-truncated-safetensors", "heatmap-bag-nan", "tile-corpus-bad-slides", "run-config-malformed-yaml",
}
#: Cases that process slides (seconds each): marked slow.
SLOW = {"predict-corpus-bad-slide", "tile-corpus-bad-slides", "train-labels-bom"}


def case(name: str) -> Callable[[Callable[[Ctx], Run]], Callable[[Ctx], Run]]:
    def deco(fn: Callable[[Ctx], Run]) -> Callable[[Ctx], Run]:
        CATALOGUE[name] = fn
        return fn

    return deco


def _labels(c: Ctx) -> list[tuple[str, str]]:
    return [(p.stem, label_of(p)) for p in c.w.slides]


def _csv(rows: list[tuple[str, str]], header: str = "slide_id,label") -> str:
    return header + "\n" + "".join(f"{a},{b}\n" for a, b in rows)


def _rewrite(path: Path, name: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> None:
    """Replace dataset ``name`` of an HDF5 file by ``fn(old)`` (None: delete it)."""
    with h5py.File(path, "r+") as f:
        new = fn(f[name][:])
        del f[name]
        if new is not None:
            f[name] = new


def _nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[0, 0] = np.nan
    return x


# -- train: labels CSVs
@case("train-labels-missing")
def _(c: Ctx) -> Run:
    return Run(c.train(labels=c.d / "nope.csv"), ("nope.csv", "No such file"))


@case("train-labels-empty")
def _(c: Ctx) -> Run:
    return Run(c.train(labels=c.write("empty.csv", "")), ("empty.csv", "cannot read labels CSV"))


@case("train-labels-header-only")
def _(c: Ctx) -> Run:
    return Run(c.train(labels=c.write("head.csv", "slide_id,label\n")), ("head.csv", "at least two classes"))


@case("train-labels-wrong-columns")
def _(c: Ctx) -> Run:
    return Run(c.train(labels=c.write("cols.csv", _csv(_labels(c), "id,klass"))), ("cols.csv", "needs columns"))


@case("train-labels-duplicates")
def _(c: Ctx) -> Run:
    rows = _labels(c)
    return Run(c.train(labels=c.write("dup.csv", _csv(rows + rows[:1]))), ("dup.csv", "duplicate slide_id"))


@case("train-labels-unknown-slide")
def _(c: Ctx) -> Run:
    rows = [*_labels(c), ("ghost_99", "normal")]
    return Run(c.train(labels=c.write("ghost.csv", _csv(rows))), ("ghost_99", "no feature bag"))


@case("train-labels-bad-slide-id")
def _(c: Ctx) -> Run:
    rows = [*_labels(c), ("../escape", "normal")]
    return Run(c.train(labels=c.write("escape.csv", _csv(rows))), ("escape.csv:10", "../escape"))


@case("train-labels-one-class")
def _(c: Ctx) -> Run:
    rows = [(s, "x") for s, _ in _labels(c)]
    return Run(c.train(labels=c.write("one.csv", _csv(rows))), ("one.csv", "at least two classes"))


@case("train-labels-too-few-per-class")
def _(c: Ctx) -> Run:
    rows = [(s, "a" if i else "b") for i, (s, _) in enumerate(_labels(c))]
    return Run(c.train(labels=c.write("few.csv", _csv(rows))), ("few.csv", "smallest class has 1"))


@case("train-labels-not-utf8")
def _(c: Ctx) -> Run:
    rows = [(s, lab.replace("tumour", "tumeur\xe9")) for s, lab in _labels(c)]
    return Run(c.train(labels=c.write("latin1.csv", _csv(rows).encode("latin-1"))), ("latin1.csv", "not UTF-8"))


@case("train-labels-bom")
def _(c: Ctx) -> Run:
    path = c.write("bom.csv", b"\xef\xbb\xbf" + _csv(_labels(c)).encode())
    return Run(c.train(labels=path), (), ok=True)


# -- train: configs and flags
@case("train-config-malformed-yaml")
def _(c: Ctx) -> Run:
    bad = c.write("bad.yaml", "cv: {folds: [1\n")
    return Run(["train", "--out", str(c.out), "--labels", str(c.w.labels), "--config", str(bad)],
               ("bad.yaml", "not valid YAML"))


@case("train-config-unknown-key")
def _(c: Ctx) -> Run:
    bad = c.write("typo.yaml", "optim: {lrr: 0.1}\n")
    return Run(["train", "--out", str(c.out), "--labels", str(c.w.labels), "--config", str(bad)],
               ("typo.yaml", "unknown setting(s) optim.lrr"))


@case("train-config-missing-file")
def _(c: Ctx) -> Run:
    return Run(["train", "--out", str(c.out), "--labels", str(c.w.labels), "--config", str(c.d / "gone.yaml")],
               ("gone.yaml", "not found"))


@case("train-config-weight-decay-negative")
def _(c: Ctx) -> Run:
    bad = c.write("wd.yaml", "optim: {weight_decay: -0.1}\n")
    return Run(["train", "--out", str(c.out), "--labels", str(c.w.labels), "--config", str(bad)],
               ("wd.yaml", "optim.weight_decay must be >= 0"))


@case("train-flag-lr-negative")
def _(c: Ctx) -> Run:
    return Run(c.train("--lr", "-1"), ("flag optim.lr=-1.0", "must be positive"))


@case("train-flag-lr-nan")
def _(c: Ctx) -> Run:
    return Run(c.train("--lr", "nan"), ("optim.lr", "finite"))


@case("train-flag-folds-one")
def _(c: Ctx) -> Run:
    return Run(c.train("--folds", "1"), ("flag cv.folds=1", "cv.folds must be >= 2"))


@case("train-flag-epochs-zero")
def _(c: Ctx) -> Run:
    return Run(c.train("--epochs", "0"), ("flag optim.epochs=0", "must be >= 1"))


@case("train-flag-lambda-negative")
def _(c: Ctx) -> Run:
    return Run(c.train("--lambda", "-0.5"), ("model.lam", "must be >= 0"))


@case("train-flag-model-unknown")
def _(c: Ctx) -> Run:
    return Run(c.train("--model", "nosuch"), ("nosuch", "loss_attention"))


@case("train-encoder-unknown")
def _(c: Ctx) -> Run:
    return Run(c.train("--encoder", "nosuch"), ("nosuch", "texture"))


# -- train: bags
@case("train-bag-nan")
def _(c: Ctx) -> Run:
    _rewrite(c.bag("tumour_00"), "features", _nan)
    return Run(c.train(), ("tumour_00.h5", "NaN or Inf"))


@case("train-bag-inf")
def _(c: Ctx) -> Run:
    _rewrite(c.bag("normal_03"), "features", lambda x: np.where(np.arange(x.shape[1]) == 2, np.inf, x))
    return Run(c.train(), ("normal_03.h5", "NaN or Inf"))


@case("train-bag-zero-byte")
def _(c: Ctx) -> Run:
    c.bag("tumour_02").write_bytes(b"")
    return Run(c.train(), ("tumour_02.h5", "not a readable feature bag"))


@case("train-bag-truncated")
def _(c: Ctx) -> Run:
    p = c.bag("tumour_02")
    p.write_bytes(p.read_bytes()[:2000])
    return Run(c.train(), ("tumour_02.h5", "truncated"))


@case("train-bag-coords-missing")
def _(c: Ctx) -> Run:
    _rewrite(c.bag("normal_05"), "coords", lambda x: None)
    return Run(c.train(), ("normal_05.h5", "coords"))


@case("train-bag-features-1d")
def _(c: Ctx) -> Run:
    _rewrite(c.bag("normal_05"), "features", lambda x: x[:, 0])
    return Run(c.train(), ("normal_05.h5", "not a readable feature bag (dataset 'features' must be (N, D)"))


@case("train-bag-rows-differ")
def _(c: Ctx) -> Run:
    _rewrite(c.bag("normal_05"), "coords", lambda x: x[:-1])
    return Run(c.train(), ("normal_05.h5", "coords"))


@case("train-bag-other-encoder")
def _(c: Ctx) -> Run:  # one bag of another (wider) encoder in the folder
    _rewrite(c.bag("normal_05"), "features", lambda x: np.zeros((len(x), 16), np.float32))
    return Run(c.train(), ("normal_05", "16"))


# -- tile: flags, configs, the slide corpus
def _tile(c: Ctx, *extra: str, slides: list[str] | None = None) -> list[str]:
    return ["tile", *(slides or [str(c.w.slides[0])]), "--out", str(c.out), *extra]


@case("tile-flag-mpp-negative")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--mpp", "-1", "--overwrite"), ("--mpp", "positive", "-1"))


@case("tile-flag-mpp-zero")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--mpp", "0"), ("--mpp", "positive"))


@case("tile-flag-patch-size-negative")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--patch-size", "-256"), ("flag patch_size=-256", "≥ 8"))


@case("tile-flag-target-mpp-zero")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--target-mpp", "0"), ("flag target_mpp=0.0", "positive"))


@case("tile-flag-overlap-one")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--overlap", "1"), ("flag overlap=1.0", "[0, 1)"))


@case("tile-flag-min-tissue-above-one")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--min-tissue", "1.5"), ("flag min_tissue=1.5", "[0, 1]"))


@case("tile-config-malformed-yaml")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--config", str(c.write("t.yaml", "patch_size: [256\n"))), ("t.yaml", "not valid YAML"))


@case("tile-config-unknown-key")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--config", str(c.write("t.yaml", "patchsize: 256\n"))), ("t.yaml", "patchsize"))


@case("tile-config-segment-negative")
def _(c: Ctx) -> Run:
    bad = c.write("t.yaml", "segment: {median_um: -4}\n")
    return Run(_tile(c, "--config", str(bad)), ("t.yaml", "median_um must be ≥ 0"))


@case("tile-config-preset-unknown")
def _(c: Ctx) -> Run:
    return Run(_tile(c, "--config", "nosuchpreset"), ("nosuchpreset", "biopsy"))


@case("tile-slides-csv-no-path-column")
def _(c: Ctx) -> Run:
    return Run(_tile(c, slides=[str(c.write("s.csv", "name\na.svs\n"))]), ("s.csv", "path"))


@case("tile-slides-csv-bad-mpp")
def _(c: Ctx) -> Run:
    table = c.write("s.csv", f"path,mpp\n{c.w.slides[0]},-0.5\n")
    return Run(_tile(c, slides=[str(table)]), ("s.csv:2", "mpp must be positive"))


@case("tile-no-slides")
def _(c: Ctx) -> Run:
    (c.d / "empty").mkdir()
    return Run(_tile(c, slides=[str(c.d / "empty")]), ("empty", "no slides found"))


@case("tile-corpus-bad-slides")
def _(c: Ctx) -> Run:
    src = c.d / "corpus"
    src.mkdir()
    good = c.w.held
    os.symlink(good, src / good.name)
    (src / "zero.tif").write_bytes(b"")
    (src / "notes.svs").write_text("not a slide at all")
    (src / "cut.tif").write_bytes(good.read_bytes()[:20_000])
    fresh = c.d / "fresh"
    return Run(["tile", str(src), "--out", str(fresh)], ("cut.tif", "truncated|not a slide"), failing="cut",
               good=(Layout(fresh).patches(good.stem),), also_failing=("zero", "notes"))


# -- extract: flags, weights, patch files
def _extract(c: Ctx, *extra: str, encoder: str = ENCODER) -> list[str]:
    return ["extract", "--out", str(c.out), "--encoder", encoder, *extra]


@case("extract-flag-batch-size-zero")
def _(c: Ctx) -> Run:
    return Run(_extract(c, "--batch-size", "0"), ("flag batch_size=0", "≥ 1"))


@case("extract-flag-workers-negative")
def _(c: Ctx) -> Run:
    return Run(_extract(c, "--workers", "-5"), ("flag workers=-5", "≥ 0"))


@case("extract-encoder-unknown")
def _(c: Ctx) -> Run:
    return Run(_extract(c, encoder="nosuch"), ("nosuch", "valid:"))


@case("extract-weights-missing")
def _(c: Ctx) -> Run:
    return Run(_extract(c, "--weights", str(c.d / "none.pth"), encoder="resnet50_trunc"), ("none.pth", "not exist"))


@case("extract-weights-garbage-pth")
def _(c: Ctx) -> Run:
    junk = c.write("junk.pth", np.random.default_rng(0).bytes(2000))
    return Run(_extract(c, "--weights", str(junk), encoder="resnet50_trunc"), ("junk.pth", "cannot read weights"))


@case("extract-weights-garbage-safetensors")
def _(c: Ctx) -> Run:
    junk = c.write("junk.safetensors", np.random.default_rng(1).bytes(2000))
    return Run(_extract(c, "--weights", str(junk), encoder="resnet50_trunc"),
               ("junk.safetensors", "cannot read weights"))


@case("extract-weights-other-architecture")
def _(c: Ctx) -> Run:
    import torch
    from safetensors.torch import save_file

    path = c.d / "vit.safetensors"  # a transformer's tensors, not a ResNet's
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)},
              str(path))
    return Run(_extract(c, "--weights", str(path), encoder="resnet50_trunc"), ("vit.safetensors", "lacks"))


@case("extract-weights-for-texture")
def _(c: Ctx) -> Run:
    return Run(_extract(c, "--weights", str(c.w.labels)), ("texture", "drop --weights"))


def _extract_one_bad(c: Ctx, bad: str, damage: Callable[[Path], None]) -> Run:
    """``bad``'s patch file damaged and its bag (and tumour_00's) removed, so extract redoes both."""
    for sid in (bad, "tumour_00"):
        c.bag(sid).unlink()
    damage(c.patches(bad))
    return Run(_extract(c), (f"{bad}.h5", "not a readable patch file"), failing=bad, good=(c.bag("tumour_00"),))


@case("extract-patches-zero-byte")
def _(c: Ctx) -> Run:
    return _extract_one_bad(c, "normal_01", lambda p: p.write_bytes(b""))


@case("extract-patches-truncated")
def _(c: Ctx) -> Run:
    return _extract_one_bad(c, "normal_03", lambda p: p.write_bytes(p.read_bytes()[:3000]))


@case("extract-patches-wrong-dataset")
def _(c: Ctx) -> Run:
    return _extract_one_bad(c, "normal_05", lambda p: _rewrite(p, "coords", lambda x: x[:, :1].astype(float)))


# -- predict / heatmap: model folders, bags
def _predict(c: Ctx, model: Path, *extra: str, slides: tuple[str, ...] = ()) -> list[str]:
    return ["predict", *(slides or (str(c.w.held),)), "--model", str(model), "--out", str(c.d / "pred"),
            "--no-progress", *extra]


def _heatmap(c: Ctx, model: Path, *extra: str) -> list[str]:
    return ["heatmap", "--out", str(c.out), "--model", str(model), "--no-progress", *extra]


@case("predict-model-missing")
def _(c: Ctx) -> Run:
    return Run(_predict(c, c.d / "norun"), ("norun", "missing"))


@case("predict-model-truncated-safetensors")
def _(c: Ctx) -> Run:
    ckpt = c.model / "fold_0.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    return Run(_predict(c, c.model), ("fold_0.safetensors", "damaged checkpoint"))


@case("predict-model-corrupted-safetensors")
def _(c: Ctx) -> Run:
    ckpt = c.model / "fold_1.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[8:40] = b"x" * 32
    ckpt.write_bytes(bytes(raw))
    return Run(_predict(c, c.model), ("fold_1.safetensors", "damaged checkpoint"))


@case("predict-model-checkpoint-missing")
def _(c: Ctx) -> Run:
    (c.model / "fold_1.safetensors").unlink()
    return Run(_predict(c, c.model), ("fold_1.safetensors", "missing"))


@case("predict-model-config-edited")
def _(c: Ctx) -> Run:
    spec = c.model / "model.json"
    spec.write_text(spec.read_text().replace('"in_dim": 41', '"in_dim": 99'))
    return Run(_predict(c, c.model), ("fold_0.safetensors", "does not fit model.json", "size mismatch"))


@case("predict-model-config-malformed")
def _(c: Ctx) -> Run:
    (c.model / "model.json").write_text('{"model": ')
    return Run(_predict(c, c.model), ("model.json", "not a trained wsi-mil run"))


@case("predict-model-config-unknown-trunk")
def _(c: Ctx) -> Run:
    spec = c.model / "model.json"
    spec.write_text(spec.read_text().replace('"trunk": "projection"', '"trunk": "nosuch"'))
    return Run(_predict(c, c.model), ("model.json", "unknown trunk"))


@case("predict-model-pipeline-edited")
def _(c: Ctx) -> Run:
    pipe = c.model / "pipeline.yaml"
    pipe.write_text(pipe.read_text().replace("patch_size: 256", "patch_size: -3", 1))
    return Run(_predict(c, c.model), ("pipeline.yaml", "patch_size must be ≥ 8"))


@case("predict-flag-mpp-negative")
def _(c: Ctx) -> Run:
    return Run(_predict(c, c.model, "--mpp", "-0.5"), ("--mpp", "positive"))


@case("predict-flag-smooth-negative")
def _(c: Ctx) -> Run:
    return Run(_predict(c, c.model, "--smooth-um", "-3"), ("smooth_um", "≥ 0"))


@case("predict-flag-extract-setting")
def _(c: Ctx) -> Run:
    return Run(_predict(c, c.model, "--batch-size", "0"), ("batch_size", "≥ 1"))


@case("predict-corpus-bad-slide")
def _(c: Ctx) -> Run:
    cut = c.write("cut.tif", c.w.held.read_bytes()[:20_000])
    pred = c.d / "pred"
    return Run(_predict(c, c.model, slides=(str(c.w.held), str(cut))), ("cut.tif", "truncated|not a slide"),
               failing="cut", good=(Layout(pred).heatmap_paths(RUN, c.w.held.stem)["png"],))


@case("heatmap-model-truncated-safetensors")
def _(c: Ctx) -> Run:
    ckpt = c.model / "fold_0.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    return Run(_heatmap(c, c.model), ("fold_0.safetensors", "damaged checkpoint"))


@case("heatmap-flag-score-unknown")
def _(c: Ctx) -> Run:
    return Run(_heatmap(c, c.model, "--score", "nosuchclass"), ("nosuchclass", "attention"))


def _heatmap_one_bad(c: Ctx, bad: str, damage: Callable[[Path], None], expect: tuple[str, ...]) -> Run:
    damage(c.bag(bad))
    good = "normal_07"
    return Run(_heatmap(c, c.model, "--slides", f"{bad},{good}"), expect, failing=bad,
               good=(Layout(c.out).heatmap_paths(RUN, good)["png"],))


@case("heatmap-bag-nan")
def _(c: Ctx) -> Run:
    return _heatmap_one_bad(c, "tumour_00", lambda p: _rewrite(p, "features", _nan), ("tumour_00.h5", "NaN"))


@case("heatmap-bag-zero-byte")
def _(c: Ctx) -> Run:
    return _heatmap_one_bad(c, "tumour_02", lambda p: p.write_bytes(b""), ("tumour_02.h5", "not a readable"))


@case("heatmap-bag-other-encoder")
def _(c: Ctx) -> Run:
    def wider(p: Path) -> None:
        _rewrite(p, "features", lambda x: np.zeros((len(x), 16), np.float32))

    return _heatmap_one_bad(c, "tumour_04", wider, ("tumour_04", "16"))


@case("heatmap-slides-unknown")
def _(c: Ctx) -> Run:
    good = "normal_07"
    return Run(_heatmap(c, c.model, "--slides", f"ghost_99,{good}"), ("ghost_99.h5", "no feature bag"),
               failing="ghost_99", good=(Layout(c.out).heatmap_paths(RUN, good)["png"],))


@case("heatmap-out-missing")
def _(c: Ctx) -> Run:
    return Run(["heatmap", "--out", str(c.d / "nowhere"), "--model", str(c.model)], ("nowhere", "no feature bags"))


@case("train-out-missing")
def _(c: Ctx) -> Run:
    return Run(["train", "--out", str(c.d / "nowhere"), "--labels", str(c.w.labels)], ("nowhere", "extract"))


@case("extract-out-missing")
def _(c: Ctx) -> Run:
    return Run(["extract", "--out", str(c.d / "nowhere"), "--encoder", ENCODER], ("nowhere", "tile"))


# -- run: cohort configs
@case("run-config-malformed-yaml")
def _(c: Ctx) -> Run:
    return Run(["run", str(c.write("cohort.yaml", "slides: [a\n"))], ("cohort.yaml", "not valid YAML"))


@case("run-config-unknown-key")
def _(c: Ctx) -> Run:
    bad = c.write("cohort.yaml", f"slides: {c.w.slides[0]}\nout: {c.out}\nstagez: [tile]\n")
    return Run(["run", str(bad)], ("cohort.yaml", "stagez"))


@case("run-config-negative-lr")
def _(c: Ctx) -> Run:
    bad = c.write("cohort.yaml", f"slides: {c.w.slides[0]}\nout: {c.out}\ntrain: {{optim: {{lr: -1}}}}\n")
    return Run(["run", str(bad)], ("cohort.yaml", "optim.lr must be positive"))


@case("run-config-missing")
def _(c: Ctx) -> Run:
    return Run(["run", str(c.d / "nocohort.yaml")], ("nocohort.yaml", "not found"))


# -- demo: its flags
def _demo(c: Ctx, *extra: str) -> list[str]:
    return ["demo", "--out", str(c.d / "demo"), *extra]


@case("demo-flag-folds-one")
def _(c: Ctx) -> Run:
    return Run(_demo(c, "--folds", "1", "--n-slides", "8", "--n-heldout", "2"), ("flag cv.folds=1", ">= 2"))


@case("demo-flag-epochs-zero")
def _(c: Ctx) -> Run:
    return Run(_demo(c, "--epochs", "0"), ("flag optim.epochs=0", ">= 1"))


@case("demo-flag-heldout-too-many")
def _(c: Ctx) -> Run:
    return Run(_demo(c, "--n-slides", "4", "--n-heldout", "3"), ("n_heldout", "4"))


@case("demo-flag-size-malformed")
def _(c: Ctx) -> Run:
    return Run(_demo(c, "--size", "big"), ("--size", "WIDTHxHEIGHT"))


# --------------------------------------------------------------------------- running them


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(name: str, argv: list[str]) -> tuple[int, str, str]:
    if name in SUBPROCESS:
        r = subprocess.run([str(WSI_MIL), *argv], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"}, timeout=300)
        return r.returncode, r.stdout, r.stderr
    res = CliRunner().invoke(app, argv, prog_name="wsi-mil")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # escaped the CLI: would be a traceback for the user
    return res.exit_code, res.stdout, res.stderr


def _params() -> list[object]:
    return [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in SLOW else []) for n in CATALOGUE]


@pytest.mark.parametrize("name", _params())
def test_bad_input(name: str, world: World, tmp_path: Path) -> None:
    c = Ctx(world, tmp_path)
    spec = CATALOGUE[name](c)
    watched = [c.out, c.w.root / "slides", c.d]
    before = {str(r): _hashes(r) for r in watched}
    rc, stdout, stderr = _invoke(name, spec.argv)
    text = stdout + stderr
    assert "Traceback" not in text and "unexpected" not in stderr, text
    if spec.ok:
        assert rc == 0, text
        return
    assert rc != 0, text
    err_lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if spec.failing is None:
        # Refused up front: exactly one line, naming the file or flag and the cause.
        assert len(err_lines) == 1 and err_lines[0].startswith("error: "), stderr
        line = err_lines[0]
    else:
        # One slide failed: its one line names it and the cause; the others are processed.
        hits = [ln for ln in stdout.splitlines() if ln.startswith(f"{spec.failing}: failed: ")]
        assert len(hits) == 1, text
        line = hits[0]
        assert not err_lines, stderr
        for good in spec.good:
            assert good.is_file(), (good, text)
        for sid in spec.also_failing:  # each bad slide of the corpus: one line of its own
            assert sum(ln.startswith(f"{sid}: failed: ") for ln in stdout.splitlines()) == 1, (sid, text)
    for word in spec.expect:  # "a|b": either wording of the cause
        assert any(w in line for w in word.split("|")), (word, line)
    assert not any(ln.startswith(("Error", "ValueError", "KeyError", "TypeError")) for ln in text.splitlines())
    # Nothing already written is lost or changed (the status table records the failure).
    may_change = (STATUS_CSV, STATUS_STORE, "extract_config.yaml", "tile_config.yaml")
    for root in watched:
        after = _hashes(root)
        for rel, digest in before[str(root)].items():
            if spec.failing is not None and any(part.startswith(may_change) for part in Path(rel).parts):
                continue
            assert after.get(rel) == digest, f"{rel} changed or vanished"
        if spec.failing is None:
            new = sorted(p for p in set(after) - set(before[str(root)]) if Path(p).name != LOCK)
            assert not new, f"refused up front, yet wrote {new}"


def test_the_catalogue_covers_every_command() -> None:
    commands = {name.split("-")[0] for name in CATALOGUE}
    assert commands >= {"train", "tile", "extract", "predict", "heatmap", "run", "demo"}
    assert len(CATALOGUE) >= 80


@pytest.mark.slow
def test_overwrite_keeps_the_bag_of_a_slide_that_fails(world: World, tmp_path: Path) -> None:
    """``extract --overwrite`` with one damaged patch file: that slide's old bag survives intact."""
    c = Ctx(world, tmp_path)
    bag = c.bag("normal_01")
    kept = hashlib.sha256(bag.read_bytes()).hexdigest()
    c.patches("normal_01").write_bytes(b"")
    rc, stdout, stderr = _invoke("extract-overwrite", _extract(c, "--overwrite"))
    assert rc == 1 and any(ln.startswith("normal_01: failed: ") for ln in stdout.splitlines()), stdout + stderr
    assert hashlib.sha256(bag.read_bytes()).hexdigest() == kept
    assert "7 done" in stdout
