"""One fold's training loop: epochs of single-forward steps, validation, the selected weights.

This is the part a researcher changes most. It knows no loss term (it minimises
:func:`~wsi_mil.mil.protocol.total_loss` of whatever ``compute_loss`` returns) and no
selection rule of its own (:func:`~wsi_mil.mil.protocol.select_epoch`); the test fold is
never passed in.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsi_mil.mil.config import TrainConfig
from wsi_mil.mil.data import BagBatch, BagDataset, collate_bags
from wsi_mil.mil.loss_attention import AttentionTargets, consistency_weight
from wsi_mil.mil.protocol import select_epoch, total_loss


def coords_kwargs(model: torch.nn.Module, b: BagBatch, device: torch.device) -> dict[str, Any]:
    """``{"coords": (B, N, 2)}`` for a model with ``needs_coords`` (the graph models), else ``{}``."""
    if not getattr(model, "needs_coords", False) or b.coords is None:
        return {}  # a graph model without coordinates raises its own ConfigError
    return {"coords": b.coords.to(device)}


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Bag probabilities (S, K) in dataset order (dropout off)."""
    model.eval()
    out: dict[int, np.ndarray] = {}
    for b in loader:
        kw = coords_kwargs(model, b, device)
        pred = model.predict(b.X.to(device), b.mask.to(device), return_instance=False, **kw)
        for i, p in zip(b.index.tolist(), pred.bag_probs.cpu().numpy(), strict=True):
            out[i] = p
    return np.stack([out[i] for i in range(len(out))])


def validation_scores(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Validation (error, loss) of bag probabilities (V, K) against labels (V,).

    The error is the share of bags whose arg-max class is wrong; the loss the mean
    negative log-likelihood (probabilities clamped at 1e-12).

    Examples
    --------
    >>> validation_scores(np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([0, 0]))  # doctest: +ELLIPSIS
    (0.5, 0.51...)
    """
    loss = float(F.nll_loss(torch.as_tensor(probs).clamp_min(1e-12).log(), torch.as_tensor(y, dtype=torch.long)))
    return float((probs.argmax(1) != y).mean()), loss


def fit_fold(
    model: torch.nn.Module,
    train_ds: BagDataset,
    val_ds: BagDataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    progress: Callable[[int, float, float], None] | None = None,
    targets: AttentionTargets | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train one fold; return the weights of the epoch :func:`select_epoch` picks, and the history.

    Each step runs one training forward (``compute_loss``); with the consistency term on
    (``optim.omega > 0``) the EMA targets α̃ are read before it and updated with that
    forward's own attention (no extra forward). After every epoch the model predicts the
    validation bags with dropout off; the weights of the selected epoch so far are kept.
    A model with ``needs_coords`` (the graph models) gets each batch's ``coords=`` in both.

    Parameters
    ----------
    model : Module
        A MIL model (the contract of :mod:`wsi_mil.mil.base`), on ``device``.
    train_ds, val_ds : BagDataset
        The fold's training and validation bags.
    cfg : TrainConfig
        ``optim`` and ``num_workers`` are used.
    device : torch.device
        Where the model is.
    seed : int
        Seeds the order of the training bags.
    progress : callable, optional
        ``progress(epoch, val_error, val_loss)`` after every epoch.
    targets : AttentionTargets, optional
        The store of the consistency targets α̃ (default: a new one, β = ``optim.ema_beta``,
        when ``optim.omega > 0``); pass one to start from given targets or to read them after.

    Returns
    -------
    state, history
        The selected state dict, and per epoch ``epoch``, ``train_<term>`` (each loss term,
        averaged over the epoch's bags), ``val_loss`` and ``val_error``.
    """
    o = cfg.optim
    gen = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(
        train_ds,
        batch_size=o.batch_size,
        shuffle=True,
        collate_fn=collate_bags,
        generator=gen,
        num_workers=cfg.num_workers,
    )
    val_dl = DataLoader(val_ds, batch_size=1, collate_fn=collate_bags, num_workers=cfg.num_workers)
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    if targets is None and o.omega > 0:
        targets = AttentionTargets(o.ema_beta)
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    since_best = 0
    for epoch in range(o.epochs):
        model.train()
        train_ds.set_epoch(epoch)  # new instance subsets (max_instances), in every worker
        omega = consistency_weight(epoch, o.rampup_epochs, o.omega)
        sums: dict[str, float] = {}
        for b in train_dl:
            X, mask, y = b.X.to(device), b.mask.to(device), b.y.to(device)
            kwargs: dict[str, Any] = coords_kwargs(model, b, device)
            if targets is not None:
                ids = b.index.tolist()
                kwargs |= {
                    "attention_target": targets.get(ids, b.rows).to(device),
                    "consistency_weight": omega,
                    "record_attention": functools.partial(targets.update, ids, b.rows),
                }
            _, terms = model.compute_loss(y, X, mask, **kwargs)
            loss = total_loss(terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y) / len(train_ds)
        val_err, val_loss = validation_scores(predict_loader(model, val_dl, device), val_ds.y)
        history.append(
            {"epoch": epoch, **{f"train_{k}": v for k, v in sums.items()}, "val_loss": val_loss, "val_error": val_err}
        )
        if select_epoch([h["val_error"] for h in history], [h["val_loss"] for h in history]) == epoch:
            best_state, since_best = copy.deepcopy(model.state_dict()), 0
        else:
            since_best += 1
        if progress is not None:
            progress(epoch, val_err, val_loss)
        if o.patience and since_best >= o.patience:
            break
    return best_state, history
