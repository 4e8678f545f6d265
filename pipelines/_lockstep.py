"""Train many small MIL models in lockstep on one CPU (the reproduction's engine).

The paper trains one bag per optimiser step for 100 epochs, 10 folds × 5 repeats. Doing
that model by model spends most of the time in Python overhead, so this engine stacks M
independent copies of the *library's own* model (``torch.func.stack_module_state``) and
runs them with ``torch.func.vmap``: at each step model m takes one bag of its own training
set. Adam and L2 weight decay are element-wise, so one Adam over the stacked parameters
is M independent Adams. A model whose epoch is shorter (fold sizes differ by one bag)
sits out the extra step: its parameters and Adam moments are restored after that step.
Within a step the M bags are sorted by size and run in a few groups, each padded only to
its own largest bag (MUSK2 has bags of 1 to 1,044 instances).

After every epoch all M models are evaluated (dropout off) on a shared list of bags, and
the per-epoch probabilities are returned, so any selection protocol can be applied later
without retraining — and without the test fold ever steering training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap


@dataclass
class LockstepResult:
    """Per-epoch evaluation of M models on the shared evaluation bags.

    Attributes
    ----------
    probs : ndarray
        (E, M, n_eval, K) bag class probabilities after each epoch.
    attention : list of ndarray or None
        When requested: for the final epoch, per evaluation bag an (M, n_i) array.
    """

    probs: np.ndarray
    attention: list[np.ndarray] | None = None


class _LossOf(nn.Module):
    """Wrap a MIL model so that ``forward`` returns its training loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, y: Tensor, X: Tensor, mask: Tensor) -> Tensor:
        _, terms = self.m.compute_loss(y, X, mask)
        return terms["bag"] + terms["instance"] + terms["consistency"]


class _ProbsOf(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, X: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.m.outputs(X, mask)
        return out.bag_logits.softmax(-1), out.attention


def _pad(bags: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    n = max(len(b) for b in bags)
    X = np.zeros((len(bags), n, bags[0].shape[1]), np.float32)  # (B, N, D)
    mask = np.zeros((len(bags), n), bool)  # (B, N)
    for i, b in enumerate(bags):
        X[i, : len(b)] = b
        mask[i, : len(b)] = True
    return torch.from_numpy(X), torch.from_numpy(mask)


def _groups(sizes: np.ndarray, max_groups: int) -> list[np.ndarray]:
    """Split indices (sorted by size) into groups that keep padding waste low."""
    order = np.argsort(sizes, kind="stable")
    if max_groups <= 1 or sizes.max() <= 2 * max(np.median(sizes), 1):
        return [order]
    return [g for g in np.array_split(order, max_groups) if len(g)]


def train_lockstep(
    factory: Callable[[int], nn.Module],
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    train_sets: Sequence[np.ndarray],
    eval_idx: np.ndarray,
    *,
    epochs: int,
    lr: float = 1e-4,
    weight_decay: float = 5e-4,
    seed: int = 0,
    eval_every: int = 1,
    return_attention: bool = False,
    max_groups: int = 4,
    eval_chunk: int = 32,
) -> LockstepResult:
    """Train ``len(train_sets)`` models, one bag per step each, and evaluate every epoch.

    Parameters
    ----------
    factory : callable
        ``factory(m)`` builds model m (seed it inside for reproducible initialisation).
    bags, labels
        All bags (each (n_i, D) float32) and their class indices.
    train_sets : sequence of ndarray
        Indices into ``bags`` that model m trains on.
    eval_idx : ndarray
        Indices of the bags every model is evaluated on after each epoch.
    epochs, lr, weight_decay
        Adam settings (the paper's: 100, 1e-4, 5e-4).
    eval_every : int
        Evaluate after every ``eval_every`` epochs (and always after the last).
    return_attention : bool
        Also return the final epoch's attention on the evaluation bags.
    """
    M = len(train_sets)
    models = [factory(m) for m in range(M)]
    params, buffers = stack_module_state([_LossOf(m) for m in models])
    loss_base = copy.deepcopy(_LossOf(models[0])).to("meta")
    prob_base = _ProbsOf(copy.deepcopy(models[0]).to("meta"))
    opt = torch.optim.Adam(list(params.values()), lr=lr, weight_decay=weight_decay)
    prob_params = {k[len("m.") :]: v for k, v in params.items()}
    prob_params = {"m." + k: v for k, v in prob_params.items()}

    def loss_one(p: dict, b: dict, y: Tensor, X: Tensor, mask: Tensor) -> Tensor:
        return functional_call(loss_base, (p, b), (y, X, mask))

    def probs_one(p: dict, b: dict, X: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(prob_base, (p, b), (X, mask))

    batched_loss = vmap(loss_one, in_dims=(0, 0, 0, 0, 0), randomness="different")
    batched_probs = vmap(probs_one, in_dims=(0, 0, None, None))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    sizes_all = np.array([len(b) for b in bags])
    n_steps = max(len(t) for t in train_sets)
    eval_order = eval_idx[np.argsort(sizes_all[eval_idx], kind="stable")]
    eval_chunks = [eval_order[i : i + eval_chunk] for i in range(0, len(eval_order), eval_chunk)]
    eval_pos = {int(b): i for i, b in enumerate(eval_idx)}
    K = int(labels.max()) + 1
    all_probs: list[np.ndarray] = []
    attention: list[np.ndarray] | None = None

    for epoch in range(epochs):
        loss_base.train()
        perms = [rng.permutation(t) for t in train_sets]
        for step in range(n_steps):
            active = np.array([step < len(p) for p in perms])
            picks = np.array([p[step] if step < len(p) else p[0] for p in perms])
            idle = np.flatnonzero(~active)
            saved = None
            if len(idle):
                saved = [(v.detach()[idle].clone(), v) for v in params.values()]
                saved += [
                    (opt.state[v][k][idle].clone(), opt.state[v][k])
                    for v in params.values()
                    if v in opt.state
                    for k in ("exp_avg", "exp_avg_sq")
                ]
            opt.zero_grad(set_to_none=True)
            for g in _groups(sizes_all[picks], max_groups):
                X, mask = _pad([bags[i] for i in picks[g]])  # (G, N, D), (G, N)
                gi = torch.as_tensor(g)
                p_g = {k: v[gi] for k, v in params.items()} if len(g) < M else params
                b_g = {k: v[gi] for k, v in buffers.items()} if len(g) < M else buffers
                y = labels_t[picks[g]].unsqueeze(1)  # (G, 1)
                loss = batched_loss(p_g, b_g, y, X.unsqueeze(1), mask.unsqueeze(1))  # (G,)
                (loss * torch.as_tensor(active[g], dtype=loss.dtype)).sum().backward()
            opt.step()
            if saved is not None:
                with torch.no_grad():
                    for old, target in saved:
                        target[idle] = old
        last = epoch == epochs - 1
        if (epoch + 1) % eval_every and not last:
            continue
        prob_base.eval()
        probs = np.zeros((M, len(eval_idx), K), np.float32)
        atts: list[np.ndarray | None] = [None] * len(eval_idx)
        with torch.no_grad():
            for chunk in eval_chunks:
                X, mask = _pad([bags[i] for i in chunk])  # (C, N, D)
                pr, att = batched_probs(prob_params, buffers, X, mask)  # (M, C, K), (M, C, N)
                for j, b in enumerate(chunk):
                    probs[:, eval_pos[int(b)]] = pr[:, j].numpy()
                    if last and return_attention:
                        atts[eval_pos[int(b)]] = att[:, j, : len(bags[b])].numpy()
        all_probs.append(probs)
        if last and return_attention:
            attention = [a for a in atts if a is not None]
    return LockstepResult(np.stack(all_probs), attention)
