"""Train many small MIL models in lockstep on one CPU or GPU (the reproduction's engine).

It lives beside the trainer (:mod:`wsi_mil.mil.fit`) and minimises the same loss
(:func:`~wsi_mil.mil.protocol.total_loss` of the model's ``compute_loss``); the epoch is
chosen afterwards with the same rule (:func:`~wsi_mil.mil.protocol.select_epoch`).

The paper trains one bag per optimiser step for 100 epochs, 10 folds × 5 repeats. Doing
that model by model spends most of the time in Python overhead, so this engine stacks M
independent copies of the *library's own* model (``torch.func.stack_module_state``) and
runs them with ``torch.func.vmap``: at each step model m takes one bag of its own training
set. Adam and L2 weight decay are element-wise, so one Adam over the stacked parameters
is M independent Adams. A model whose epoch is shorter (fold sizes differ by one bag)
sits out the extra step: its parameters and Adam moments are restored after that step.
Within a step the M bags are sorted by size and run in a few groups, each padded only to
its own largest bag (MUSK2 has bags of 1 to 1,044 instances). All instances live in one
tensor on the training device and each group is gathered from it by index, so a GPU run
copies no bag data per step.

After every epoch all M models are evaluated (dropout off) on a shared list of bags, and
the per-epoch probabilities are returned, so any selection protocol can be applied later
without retraining — and without the test fold ever steering training.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from wsi_mil.mil.protocol import total_loss


@dataclass
class LockstepResult:
    """Per-epoch evaluation of M models, each on its own evaluation bags.

    Attributes
    ----------
    probs : list of ndarray
        For model m, (E, len(eval_sets[m]), K) bag class probabilities after each
        evaluated epoch.
    attention : list of list of ndarray or None
        When requested, for model m and each of its evaluation bags the final epoch's
        attention (n_i,).
    instance_probs : list of list of ndarray or None
        Likewise, each instance's probability of the last class, softmax(z_t)[K-1].
    seconds : float
        Wall time.
    """

    probs: list[np.ndarray]
    attention: list[list[np.ndarray]] | None = None
    instance_probs: list[list[np.ndarray]] | None = None
    seconds: float = 0.0


class _LossOf(nn.Module):
    """Wrap a MIL model so that ``forward`` returns its training loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, y: Tensor, X: Tensor, mask: Tensor) -> Tensor:
        _, terms = self.m.compute_loss(y, X, mask)
        return total_loss(terms)


class _ProbsOf(nn.Module):
    """Wrap a MIL model so that ``forward`` returns bag probabilities and attention."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, X: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.m.outputs(X, mask)
        inst = out.instance_logits.softmax(-1)[..., -1]  # (B, N) P(last class)
        return out.bag_logits.softmax(-1), out.attention, inst


class _BagStore:
    """All bags' instances in one (n_total + 1, D) tensor on ``device``; row 0 is padding."""

    def __init__(self, bags: Sequence[np.ndarray], device: torch.device) -> None:
        self.sizes = np.array([len(b) for b in bags])
        self.offsets = np.concatenate([[1], 1 + np.cumsum(self.sizes)[:-1]])
        flat = np.concatenate([np.zeros((1, bags[0].shape[1]), np.float32), *bags])
        self.flat = torch.from_numpy(flat.astype(np.float32)).to(device)  # (n_total+1, D)
        self.device = device

    def pad(self, idx: np.ndarray) -> tuple[Tensor, Tensor]:
        """Bags ``idx`` padded to the largest: (B, N, D) features and (B, N) mask."""
        n = int(self.sizes[idx].max())
        cols = np.arange(n)
        mask = cols[None, :] < self.sizes[idx][:, None]  # (B, N)
        rows = np.where(mask, self.offsets[idx][:, None] + cols[None, :], 0)  # (B, N)
        rows_t = torch.from_numpy(rows).to(self.device, non_blocking=True)
        return self.flat[rows_t], torch.from_numpy(mask).to(self.device, non_blocking=True)


# Cost of one vmapped forward+backward call, in padded instance rows: a call's fixed
# overhead is worth about this many rows of the fc-256/128/64 trunk on a 2-core CPU.
_CALL_ROWS = 3000


def _groups(sizes: np.ndarray, max_groups: int, call_rows: int = _CALL_ROWS) -> list[np.ndarray]:
    """Split indices (sorted by size) into the equal-count groups that cost least."""
    order = np.argsort(sizes, kind="stable")
    s = sizes[order]
    best, best_cost = [order], len(s) * s[-1] + call_rows
    for g in (2, 3, 4, 6, 8, 12, 16):
        if g > min(max_groups, len(s)):
            break
        parts = np.array_split(np.arange(len(s)), g)
        cost = sum(len(p) * s[p[-1]] for p in parts) + g * call_rows
        if cost < best_cost:
            best, best_cost = [order[p] for p in parts], cost
    return best


def train_lockstep(
    factory: Callable[[int], nn.Module],
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    train_sets: Sequence[np.ndarray],
    eval_sets: Sequence[np.ndarray],
    *,
    epochs: int,
    lr: float = 1e-4,
    weight_decay: float = 5e-4,
    seed: int = 0,
    eval_every: int = 1,
    return_attention: bool = False,
    max_groups: int = 16,
    eval_rows: int = 60_000,
    device: str = "cpu",
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
    eval_sets : sequence of ndarray
        Indices of the bags model m is evaluated on after each epoch.
    epochs, lr, weight_decay
        Adam settings (the paper's: 100, 1e-4, 5e-4).
    eval_every : int
        Evaluate after every ``eval_every`` epochs (and always after the last).
    return_attention : bool
        Also return the final epoch's attention on the evaluation bags.
    device : str
        ``"cpu"`` or a CUDA device. On a GPU a vmapped call costs a kernel launch chain,
        not rows, so steps use fewer, larger groups and evaluation larger chunks.

    Returns
    -------
    LockstepResult
        Per model, the evaluation bags' probabilities after every evaluated epoch.

    Examples
    --------
    >>> from wsi_mil.mil import create_model
    >>> bags = [np.ones((3, 4), np.float32), np.zeros((2, 4), np.float32)] * 3
    >>> y = np.array([1, 0] * 3)
    >>> make = lambda m: create_model("loss_attention", 4, 2, trunk="identity")
    >>> res = train_lockstep(make, bags, y, [np.arange(4), np.arange(2, 6)], [np.arange(4, 6), np.arange(2)], epochs=2)
    >>> [p.shape for p in res.probs]  # (epochs, eval bags, classes) per model
    [(2, 2, 2), (2, 2, 2)]
    """
    t_start = time.time()
    M = len(train_sets)
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    call_rows = 200_000 if gpu else _CALL_ROWS
    if gpu:
        max_groups, eval_rows = min(max_groups, 4), max(eval_rows, 2_000_000)
    models = [factory(m).to(dev) for m in range(M)]
    params, buffers = stack_module_state([_LossOf(m) for m in models])
    loss_base = copy.deepcopy(_LossOf(models[0])).to("meta")
    prob_base = _ProbsOf(copy.deepcopy(models[0]).to("meta"))
    opt = torch.optim.Adam(list(params.values()), lr=lr, weight_decay=weight_decay, foreach=True)

    def loss_one(p: dict, b: dict, y: Tensor, X: Tensor, mask: Tensor) -> Tensor:
        return functional_call(loss_base, (p, b), (y, X, mask))

    def probs_one(p: dict, b: dict, X: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return functional_call(prob_base, (p, b), (X, mask))

    batched_loss = vmap(loss_one, in_dims=(0, 0, 0, 0, 0), randomness="different")
    batched_probs = vmap(probs_one, in_dims=(0, 0, 0, 0))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=dev)
    store = _BagStore(bags, dev)
    sizes_all = store.sizes
    n_steps = max(len(t) for t in train_sets)
    # Evaluation pairs (model, bag), sorted by bag size and cut into chunks of similar size.
    pairs = np.array([(m, b) for m, es in enumerate(eval_sets) for b in es], dtype=np.int64)
    pairs = pairs[np.argsort(sizes_all[pairs[:, 1]], kind="stable")]
    chunks, start = [], 0
    while start < len(pairs):
        n_max = sizes_all[pairs[start:, 1]]
        stop = start + 1
        while stop < len(pairs) and stop - start < 512 and (stop - start + 1) * n_max[stop - start] <= eval_rows:
            stop += 1
        chunks.append(pairs[start:stop])
        start = stop
    slot = {}
    for m, es in enumerate(eval_sets):
        for j, b in enumerate(es):
            slot[(m, int(b))] = j
    K = int(labels.max()) + 1
    all_probs: list[list[np.ndarray]] = [[] for _ in range(M)]
    attention: list[list[np.ndarray]] | None = None
    instance: list[list[np.ndarray]] | None = None

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
            total = 0.0
            for g in _groups(sizes_all[picks], max_groups, call_rows):
                X, mask = store.pad(picks[g])  # (G, N, D), (G, N)
                # g is sorted by bag size: the parameters must follow the same order.
                identity = len(g) == M and bool(np.all(g == np.arange(M)))
                gi = torch.as_tensor(g, device=dev)
                p_g = params if identity else {k: v[gi] for k, v in params.items()}
                b_g = buffers if identity else {k: v[gi] for k, v in buffers.items()}
                y = labels_t[torch.as_tensor(picks[g], device=dev)].unsqueeze(1)  # (G, 1)
                loss = batched_loss(p_g, b_g, y, X.unsqueeze(1), mask.unsqueeze(1))  # (G,)
                on = torch.as_tensor(active[g], dtype=loss.dtype).to(dev)
                total = total + (loss * on).sum()
            total.backward()
            opt.step()
            if saved is not None:
                with torch.no_grad():
                    for old, target in saved:
                        target[idle] = old
        last = epoch == epochs - 1
        if (epoch + 1) % eval_every and not last:
            continue
        prob_base.eval()
        probs = [np.zeros((len(es), K), np.float32) for es in eval_sets]
        atts: list[list[np.ndarray]] = [[np.empty(0)] * len(es) for es in eval_sets]
        insts: list[list[np.ndarray]] = [[np.empty(0)] * len(es) for es in eval_sets]
        with torch.no_grad():
            for chunk in chunks:
                X, mask = store.pad(chunk[:, 1])  # (C, N, D), (C, N)
                gi = torch.as_tensor(chunk[:, 0], device=dev)
                p_c = {k: v[gi] for k, v in params.items()}
                b_c = {k: v[gi] for k, v in buffers.items()}
                pr, att, ins = batched_probs(p_c, b_c, X.unsqueeze(1), mask.unsqueeze(1))
                pr, att, ins = (t[:, 0].cpu().numpy() for t in (pr, att, ins))
                for j, (m, b) in enumerate(chunk):
                    probs[m][slot[(int(m), int(b))]] = pr[j]
                    if last and return_attention:
                        atts[m][slot[(int(m), int(b))]] = att[j, : sizes_all[b]].copy()
                        insts[m][slot[(int(m), int(b))]] = ins[j, : sizes_all[b]].copy()
        for m in range(M):
            all_probs[m].append(probs[m])
        if last and return_attention:
            attention, instance = atts, insts
    return LockstepResult([np.stack(p) for p in all_probs], attention, instance, time.time() - t_start)
