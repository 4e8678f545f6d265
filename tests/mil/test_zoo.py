"""The torchmil zoo in our contract; loss-attention in torchmil's; the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from wsi_mil.errors import ConfigError
from wsi_mil.mil import create_model, list_models
from wsi_mil.mil import registry as reg
from wsi_mil.mil.baselines import AttentionMIL
from wsi_mil.mil.data import BagDataset, BagItem
from wsi_mil.mil.zoo import ZOO
from wsi_mil.mil.zoo_parts import adjacency_from_coords, grid_step

D = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than two fighting other test processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grid_coords(B: int, N: int, side: int = 4, step: int = 256) -> torch.Tensor:
    """(B, N, 2) level-0 coords of patches on a ``side``-wide grid."""
    t = torch.arange(N)
    return torch.stack([t % side * step, t // side * step], 1).float().expand(B, N, 2).clone()


def _kw(model: torch.nn.Module, coords: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"coords": coords} if model.needs_coords else {}


def _easy_bags(n_bags: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded bags of 6-10 N(0, 1) instances; a positive bag has 2 instances shifted +4 on axes 0, 1."""
    g = torch.Generator().manual_seed(seed)
    N = 10
    X = torch.randn(n_bags, N, D, generator=g)
    mask = torch.zeros(n_bags, N, dtype=torch.bool)
    y = torch.arange(n_bags) % 2
    for i in range(n_bags):
        n = int(torch.randint(6, N + 1, (1,), generator=g))
        mask[i, :n] = True
        X[i, n:] = 0.0
        if y[i]:
            X[i, :2, :2] += 4.0
    return X, mask, y


# ---------------------------------------------------------------- registry (issue 17)
def test_custom_model_first_keeps_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reg, "_REGISTRY", {})
    monkeypatch.setattr(reg, "_builtins_registered", False)
    reg.register_model("mine", AttentionMIL)  # before any built-in was asked for
    model = reg.create_model("loss_attention", D, 2, trunk="identity", lam=0.3)
    assert type(model).__name__ == "LossAttentionMIL" and model.lam == 0.3
    names = reg.list_models()
    assert "mine" in names and set(reg.BUILTIN_MODELS) <= set(names)
    assert isinstance(reg.create_model("mine", D, 2, trunk="identity", lam=0.3), AttentionMIL)


def test_names_static_and_light() -> None:
    assert tuple(ZOO) == reg.ZOO_MODELS
    assert {n for n, s in ZOO.items() if s.needs_adj} == reg.COORD_MODELS
    assert set(reg.BUILTIN_MODELS) <= set(list_models())
    code = (
        "import sys, wsi_mil.mil.registry as r; r.list_models(); "
        "print(sorted(m for m in ('torch', 'torchmil') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_help_lists_every_model() -> None:
    from wsi_mil.cli import app

    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    missing = [n for n in reg.BUILTIN_MODELS if n not in res.output]
    assert not missing, missing


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", reg.ZOO_MODELS)
def test_contract_shapes_and_masking(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name, D, 2, trunk="mlp", hidden=[16], attention_dim=16, lam=0.5)
    X = torch.randn(3, 9, D)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    coords = _grid_coords(3, 9, side=3)
    y = torch.tensor([0, 1, 1])
    logits, terms = model.compute_loss(y, X, mask, **_kw(model, coords))
    assert logits.shape == (3, 2) and torch.all(logits[:, 0] == 0)
    assert {"bag", "instance", "consistency"} <= set(terms)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    loss = sum(terms.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    model.eval()
    pred = model.predict(X, mask, **_kw(model, coords))
    assert pred.bag_probs.shape == (3, 2) and pred.attention.shape == (3, 9)
    assert pred.instance_probs.shape == (3, 9, 2)
    torch.testing.assert_close(pred.bag_probs.sum(1), torch.ones(3))
    torch.testing.assert_close(pred.attention.sum(1), torch.ones(3))
    assert torch.all(pred.attention >= 0) and torch.all(pred.attention[0, 5:] == 0)
    assert torch.all(pred.instance_probs[0, 5:] == 0)
    torch.testing.assert_close(pred.instance_probs[1:].sum(-1), torch.ones(2, 9))
    # Padding changes nothing: garbage in it, or bag 0 alone and unpadded.
    X2 = X.clone()
    X2[0, 5:] = 1e3
    again = model.predict(X2, mask, **_kw(model, coords))
    torch.testing.assert_close(again.bag_probs, pred.bag_probs)
    torch.testing.assert_close(again.attention, pred.attention)
    alone = model.predict(X[:1, :5], None, **_kw(model, coords[:1, :5]))
    torch.testing.assert_close(alone.bag_probs[0], pred.bag_probs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.instance_probs[0], pred.instance_probs[0, :5], atol=1e-5, rtol=1e-5)
    # A checkpoint as the trainer writes it (safetensors) rebuilds the same model.
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    again = create_model(name, D, 2, trunk="mlp", hidden=[16], attention_dim=16)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    torch.testing.assert_close(again.eval().predict(X, mask, **_kw(model, coords)).bag_probs, pred.bag_probs)


def test_binary_only_and_coords_required() -> None:
    with pytest.raises(ConfigError, match="'clam' supports binary tasks only"):
        create_model("clam", D, 3)
    model = create_model("patch_gcn", D, 2, trunk="identity", attention_dim=8)
    assert model.needs_coords and reg.needs_coords("patch_gcn")
    with pytest.raises(ConfigError, match="needs patch coordinates"):
        model.predict(torch.randn(1, 4, D))
    with pytest.raises(ConfigError, match="omega"):
        create_model("abmil", D, 2).compute_loss(torch.tensor([1]), torch.randn(1, 4, D), consistency_weight=0.5)


def test_adjacency_from_coords() -> None:
    coords = np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [4096, 4096]])  # step 512
    assert grid_step(coords) == 512
    A = adjacency_from_coords(coords).to_dense()
    assert A.shape == (5, 5) and torch.equal(A, A.T)
    edges = {(i, j) for i, j in zip(*np.nonzero(A.numpy()), strict=True)}
    assert edges == {(0, 1), (1, 0), (1, 2), (2, 1), (0, 3), (3, 0), (1, 3), (3, 1)}  # diagonal too
    deg = np.array([2, 3, 1, 2])  # D^-1/2 A D^-1/2
    torch.testing.assert_close(A[0, 1], torch.tensor(1 / np.sqrt(deg[0] * deg[1]), dtype=torch.float32))
    assert A[4].sum() == 0  # the lone patch has no neighbour


def test_clam_instance_loss_per_instance() -> None:
    """FlatTop1SVM is the smooth top-1 SVM of each instance (Berrada et al. 2018), averaged."""
    from torchmil.nn.utils import SmoothTop1SVM

    from wsi_mil.mil.zoo_parts import FlatTop1SVM

    x = np.array([[0.3, -0.2], [1.0, 2.0], [9.0, 0.0], [-4.0, 5.0]])  # rows 2, 3: gap > log 1000
    y = np.array([1, 0, 1, 1])
    expected = []
    for xi, yi in zip(x, y, strict=True):
        margin = xi + (np.arange(2) != yi) - xi[yi]  # α = 1
        hard = np.sort(xi)[-1] - np.sort(xi)[-2] >= np.log(1e3)  # τ = 1
        expected.append(margin.max() if hard else np.log(np.exp(margin).sum()))
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]  # CLAM's (k, 1)
    got = FlatTop1SVM(SmoothTop1SVM(n_classes=2))(xt, yt)
    torch.testing.assert_close(got, torch.tensor(np.mean(expected), dtype=torch.float32))
    assert type(create_model("clam", D, 2).net.inst_loss_fn) is FlatTop1SVM


#: Small settings for the easy problem: CLAM samples 1 instance a side (its pseudo-labels
#: slow the bag head down: 25 steps), DTFD-MIL splits 2 pseudo-bags.
_EASY = {"clam": ({"k_sample": 1}, 25), "dtfdmil": ({"n_groups": 2}, 15)}
#: In the slow run only (the default run keeps one model of each kind: pooling, two
#: streams, graph, smoothing); TransMIL's Nyström pseudo-inverse is the slowest.
_SLOW_TO_TRAIN = {"transmil", "clam", "dtfdmil", "transformer_abmil", "prob_smooth_abmil"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TO_TRAIN else n for n in reg.ZOO_MODELS],
)
def test_learns_easy_problem(name: str) -> None:
    """A few real optimisation steps on 'positive bags hold shifted instances'."""
    torch.manual_seed(0)
    np.random.seed(0)
    X, mask, y = _easy_bags()
    coords = _grid_coords(len(y), X.shape[1])
    options, steps = _EASY.get(name, ({}, 15))
    model = create_model(name, D, 2, trunk="mlp", hidden=[16], attention_dim=16, **options)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        model.train()
        _, terms = model.compute_loss(y, X, mask, **_kw(model, coords))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    model.eval()
    pred = model.predict(X, mask, **_kw(model, coords))
    acc = float((pred.bag_probs.argmax(1) == y).float().mean())
    assert acc >= 0.9, f"{name}: training accuracy {acc:.2f}"


# ---------------------------------------------------------------- hand-written = torchmil
@pytest.mark.parametrize("gated", [False, True])
def test_attention_mil_equals_torchmil_abmil(gated: bool) -> None:
    from torchmil.models import ABMIL

    torch.manual_seed(0)
    ours = AttentionMIL(D, 2, trunk="identity", attention_dim=6, gated=gated).eval()
    theirs = ABMIL(in_shape=(D,), att_dim=6, gated=gated).eval()
    with torch.no_grad():  # same weights: theirs -> ours (their w has no bias: softmax ignores it)
        ours.att_v[0].load_state_dict(theirs.pool.fc1.module.state_dict())
        if gated:
            ours.att_u[0].load_state_dict(theirs.pool.fc_gated.module.state_dict())
        ours.att_w.weight.copy_(theirs.pool.fc2.weight)
        ours.att_w.bias.fill_(0.7)
        ours.classifier.weight.zero_()
        ours.classifier.bias.zero_()
        ours.classifier.weight[1] = theirs.classifier.module.weight[0]
        ours.classifier.bias[1] = theirs.classifier.module.bias[0]
    X = torch.randn(3, 7, D)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = ours.outputs(X, mask)
    z, f = theirs(X, mask, return_att=True)
    torch.testing.assert_close(out.bag_logits[:, 1] - out.bag_logits[:, 0], z, atol=1e-6, rtol=1e-6)
    att = f.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.attention, att, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- loss-attention in torchmil
def test_loss_attention_in_torchmil_trainer() -> None:
    from torchmil.data import collate_fn
    from torchmil.datasets import ToyDataset
    from torchmil.utils import Trainer

    from wsi_mil.mil.torchmil_compat import LossAttentionTorchmil

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 600)
    data = rng.normal(size=(600, D)).astype(np.float32)
    data[labels == 1, :2] += 4.0  # instances of class 1 make a bag positive
    ds = ToyDataset(data, labels, num_bags=24, obj_labels=[1], bag_size=(6, 12), seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_fn)
    torch.manual_seed(0)
    model = LossAttentionTorchmil((D,), trunk="mlp", hidden=[16], lam=0.1)

    class Log:
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def log(self, metrics: dict[str, float]) -> None:
            self.rows.append(metrics)

    log = Log()
    trainer = Trainer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        device="cpu",
        logger=log,
        disable_pbar=True,
        verbose=False,
    )
    trainer.train(max_epochs=5, train_dataloader=dl)
    train = [r for r in log.rows if "train/loss" in r]
    assert len(train) == 5 and {"train/bag", "train/instance"} <= set(train[0])
    assert train[-1]["train/loss"] < 0.6 * train[0]["train/loss"]
    best = trainer.get_best_model().eval()
    batch = collate_fn([ds[i] for i in range(4)])
    y_pred, y_inst = best.predict(batch["X"], batch["mask"], return_inst_pred=True)
    assert y_pred.shape == (4,) and y_inst.shape == batch["X"].shape[:2]
    z, att = best(batch["X"], batch["mask"], return_att=True)
    torch.testing.assert_close(att.sum(1), torch.ones(4))
    probs = best.model.predict(batch["X"], batch["mask"]).bag_probs[:, 1]
    torch.testing.assert_close(torch.sigmoid(z), probs)  # torchmil's logit = our 2-class view


# ---------------------------------------------------------------- the CLI
def _train(tmp_path: Path, csv: Path, model: str) -> Path:
    from wsi_mil.cli import app

    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"hidden": [16], "attention_dim": 16}, "optim": {"epochs": 2}}))
    args = ["train", "--out", str(tmp_path), "--labels", str(csv), "--config", str(cfg)]
    args += ["--folds", "2", "--run-name", model, "--model", model]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return tmp_path / "models" / model


def test_cli_train_abmil(tmp_path: Path, cohort) -> None:
    from wsi_mil.io.h5 import read_bag
    from wsi_mil.mil.inference import load_model, predict_bag, predict_bags

    run = _train(tmp_path, cohort(tmp_path, n=12), "abmil")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "abmil"
    assert len(json.loads((run / "metrics.json").read_text())["folds"]) == 2
    # The run's checkpoints diagnose bags and give the heatmaps' per-patch scores.
    ens = load_model(run)
    bags = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))[:3]
    table = predict_bags(ens, bags)
    assert len(table) == 3 and np.allclose(table[["prob_normal", "prob_tumor"]].sum(axis=1), 1.0)
    bag = read_bag(bags[0])
    pred = predict_bag(ens, bag.features)
    assert pred.attention.shape == (1, len(bag.features)) and pred.instance_probs.shape == (1, len(bag.features), 2)
    torch.testing.assert_close(pred.attention.sum(1), torch.ones(1))


def test_cli_train_graph_model(tmp_path: Path, cohort) -> None:
    """patch_gcn trains, predicts and writes heatmaps with the bags' coordinates."""
    import h5py
    import pandas as pd

    from wsi_mil.cli import app
    from wsi_mil.io.h5 import read_bag, write_bag
    from wsi_mil.mil.inference import load_model, predict_bag, predict_bags
    from wsi_mil.synthetic.slides import SyntheticSpec, write_synthetic_slide

    run = _train(tmp_path, cohort(tmp_path, n=12), "patch_gcn")
    assert len(json.loads((run / "metrics.json").read_text())["folds"]) == 2
    ens = load_model(run)
    assert ens.needs_coords
    bags = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    table = predict_bags(ens, bags[:3])
    assert np.allclose(table[["prob_normal", "prob_tumor"]].sum(axis=1), 1.0)
    bag = read_bag(bags[0])
    pred = predict_bag(ens, bag.features, bag.coords)
    # The ensemble builds the adjacency once and shares it: the same as each fold from coords.
    X, c = torch.from_numpy(bag.features)[None], torch.from_numpy(bag.coords)[None]
    folds = [m.predict(X, None, coords=c) for m in ens.models]
    for field in ("bag_probs", "attention", "instance_probs"):
        assert torch.equal(getattr(pred, field), torch.stack([getattr(f, field) for f in folds]).mean(0)), field
    assert float(table.loc[0, "prob_tumor"]) == float(pred.bag_probs[0, 1])
    with pytest.raises(ConfigError, match="needs patch coordinates"):
        predict_bag(ens, bag.features)
    # wsi-mil heatmap on a slide the bag's patches lie on.
    slide = tmp_path / "slides" / "s00.tiff"
    slide.parent.mkdir()
    write_synthetic_slide(slide, SyntheticSpec(width=int(bag.coords[:, 0].max()) + 256, height=512, mpp=0.5, seed=0))
    write_bag(bags[0], bag.features, bag.coords, {**bag.attrs, "patch_size_level0": 256, "slide_path": str(slide)})
    res = CliRunner().invoke(app, ["heatmap", "--out", str(tmp_path), "--model", str(run), "--slides", "s00",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    index = pd.read_csv(tmp_path / "heatmaps" / "patch_gcn" / "index.csv")
    assert index["slide_id"].tolist() == ["s00"]
    with h5py.File(tmp_path / "heatmaps" / "patch_gcn" / "s00.h5", "r") as f:
        att = np.asarray(f["attention"][:])
    np.testing.assert_allclose(att.reshape(-1), pred.attention[0].numpy(), rtol=1e-6, atol=1e-7)


def test_bag_items_carry_the_kept_rows_coords(tmp_path: Path, cohort) -> None:
    """Subsampled items carry their rows' coordinates; batches pad them like X (0 on padding)."""
    from wsi_mil.io.h5 import read_bag
    from wsi_mil.mil.data import collate_bags

    cohort(tmp_path, n=2)
    paths = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    ds = BagDataset(paths, np.array([0, 1]), max_instances=16, seed=1)
    ds.set_epoch(3)
    items = [ds[0], ds[1]]
    for p, it in zip(paths, items, strict=True):
        assert torch.equal(it.coords, torch.from_numpy(read_bag(p).coords)[it.rows])
    short = BagDataset(paths, np.array([0, 1]))[1]
    b = collate_bags([items[0], short])
    n = len(short.features)
    assert b.coords.shape == (2, max(16, n), 2) and torch.equal(b.coords[1, :n], short.coords)
    assert not b.coords[~b.mask].any()


class _MovedPatches(BagDataset):
    """The same bags with their patches moved to other grid places (the graph changes, not the features)."""

    def __getitem__(self, i: int) -> BagItem:
        item = super().__getitem__(i)
        place = torch.randperm(64, generator=torch.Generator().manual_seed(i))[: len(item.features)]
        return item._replace(coords=torch.stack([place % 8, place // 8], 1) * 256)


@pytest.mark.parametrize("name", ["loss_attention", "patch_gcn"])
def test_coords_reach_only_the_graph_models(tmp_path: Path, cohort, name: str) -> None:
    """Moving the patches leaves a non-graph model's training bitwise the same, and changes a graph model's."""
    from wsi_mil.mil.config import OptimConfig, TrainConfig
    from wsi_mil.mil.fit import fit_fold

    cohort(tmp_path, n=6)
    paths = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    y = np.arange(6) % 2
    omega = 0.5 if name == "loss_attention" else 0.0  # the consistency term (loss_attention only)
    cfg = TrainConfig(optim=OptimConfig(epochs=2, lr=1e-2, omega=omega, rampup_epochs=1, max_instances=16))
    runs = []
    for kind in (BagDataset, _MovedPatches):
        torch.manual_seed(0)
        model = create_model(name, 16, 2, hidden=[16], attention_dim=16)
        state, hist = fit_fold(model, kind(paths[:4], y[:4], 16, seed=1), kind(paths[4:], y[4:]), cfg,
                               torch.device("cpu"), seed=0)
        runs.append((state, hist))
    (a, ha), (b, hb) = runs
    same = ha == hb and all(torch.equal(a[k], b[k]) for k in a)
    assert same == (not reg.needs_coords(name))


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", reg.ZOO_MODELS)
def test_cuda_matches_cpu(name: str) -> None:
    """Same weights on CUDA: the same prediction (fp32, TF32 off), and reproducible there."""
    torch.manual_seed(0)
    model = create_model(name, D, 2, trunk="mlp", hidden=[16], attention_dim=16).eval()
    X, mask, y = _easy_bags()
    coords = _grid_coords(len(y), X.shape[1])
    cpu = model.predict(X, mask, **_kw(model, coords))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        gm = model.to("cuda")
        Xg, mg, cg = X.cuda(), mask.cuda(), coords.cuda()
        gpu = gm.predict(Xg, mg, **_kw(gm, cg))
        torch.testing.assert_close(gm.predict(Xg, mg, **_kw(gm, cg)).bag_probs, gpu.bag_probs)  # fixed RNG
        _, terms = gm.train().compute_loss(y.cuda(), Xg, mg, **_kw(gm, cg))
        assert all(v.device.type == "cuda" and torch.isfinite(v) for v in terms.values())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if name == "prob_smooth_abmil":  # its attention samples come from the device's own generator
        return
    torch.testing.assert_close(gpu.bag_probs.cpu(), cpu.bag_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.attention.cpu(), cpu.attention, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.instance_probs.cpu(), cpu.instance_probs, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_ensemble_and_fit(tmp_path: Path, cohort) -> None:
    """On CUDA the graph ensemble takes numpy coords and the trainer its batches' coords."""
    from wsi_mil.io.h5 import read_bag
    from wsi_mil.mil.config import OptimConfig, TrainConfig
    from wsi_mil.mil.fit import fit_fold
    from wsi_mil.mil.inference import FoldEnsemble, predict_bag

    cohort(tmp_path, n=6)
    paths = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    y = np.arange(6) % 2
    torch.manual_seed(0)
    models = [create_model("patch_gcn", 16, 2, hidden=[16], attention_dim=16) for _ in range(2)]
    cfg = TrainConfig(optim=OptimConfig(epochs=1, max_instances=16))
    fit_fold(models[0].cuda(), BagDataset(paths[:4], y[:4], 16), BagDataset(paths[4:], y[4:]), cfg,
             torch.device("cuda"), seed=0)
    ens = FoldEnsemble([m.cpu().eval() for m in models], ["normal", "tumor"], "toyenc").eval()
    bag = read_bag(paths[0])
    cpu = predict_bag(ens, bag.features, bag.coords)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        gpu = predict_bag(ens.cuda(), bag.features, bag.coords)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert gpu.bag_probs.device.type == "cuda"
    torch.testing.assert_close(gpu.bag_probs.cpu(), cpu.bag_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.attention.cpu(), cpu.attention, atol=1e-4, rtol=1e-4)
