"""Loss-based attention MIL (Shi et al., AAAI 2020) — see docs/loss_attention.md.

For bag i with trunk features h_t and one fully connected layer (W, b):

* instance logits            z_t = h_t W + b                                   (B, N, K)
* attention                  α_t = Σ_c exp(z_tc) / Σ_s Σ_c exp(z_sc)
                             computed as softmax_t(logsumexp_c z_tc)            (B, N)
* bag logits                 z = (Σ_t α_t h_t) W + b                            (B, K)
* loss                       CE(z, y) + λ Σ_t α_t CE(z_t, y) + ω(m) Σ_t (α_t − α̃_t)²

α̃ is a per-instance exponential moving average of α over epochs
(:class:`AttentionTargets`) and ω(m) a Gaussian ramp-up (:func:`consistency_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.ops import check_mask, masked_log_softmax


def consistency_weight(epoch: int, rampup_epochs: int, omega: float) -> float:
    """Gaussian ramp-up ω(m) = ω · exp(−5 (1 − T)²), T = min(epoch / rampup_epochs, 1).

    Examples
    --------
    >>> consistency_weight(0, 10, 1.0)  # doctest: +ELLIPSIS
    0.006737...
    >>> consistency_weight(10, 10, 1.0)
    1.0
    """
    if omega == 0.0:
        return 0.0
    if rampup_epochs <= 0:
        return float(omega)
    t = min(max(epoch / rampup_epochs, 0.0), 1.0)
    return float(omega * math.exp(-5.0 * (1.0 - t) ** 2))


class LossAttentionMIL(MILModel):
    """Loss-based attention MIL: the attention comes from the classifier's own layer.

    Parameters
    ----------
    in_dim : int
        Instance feature width D.
    n_classes : int
        Number of classes K >= 2.
    lam : float
        λ, weight of the attention-weighted instance loss.
    trunk, hidden, dropout
        See :class:`wsi_mil.mil.base.MILModel`.

    Examples
    --------
    >>> model = LossAttentionMIL(in_dim=8, n_classes=3, trunk="identity")
    >>> X = torch.randn(2, 5, 8)                      # (B, N, D)
    >>> model(X).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        lam: float = 0.1,
        trunk: str = "paper",
        hidden: tuple[int, ...] | list[int] | None = None,
        dropout: float = 0.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__(
            in_dim, n_classes, trunk=trunk, hidden=hidden, dropout=dropout, input_norm=input_norm
        )
        self.lam = float(lam)
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)  # W (E×K), b

    def outputs(self, X: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Instance logits, attention from them, and the attention-pooled bag logits."""
        mask = check_mask(X, mask)  # (B, N)
        h = self.trunk(X)  # (B, N, E)
        z_inst = self.classifier(h)  # (B, N, K)   z_t = h_t W + b
        # log α_t = logsumexp_c z_tc − logsumexp_{s,c} z_sc: never overflows.
        log_att = masked_log_softmax(torch.logsumexp(z_inst, dim=-1), mask)  # (B, N)
        att = log_att.exp()  # (B, N), exactly 0 on padding
        pooled = torch.einsum("bn,bne->be", att, h.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, E)
        z_bag = self.classifier(pooled)  # (B, K)   z = (Σ α_t h_t) W + b
        return MILOutput(z_bag, att, z_inst)

    def compute_loss(
        self,
        y: Tensor,
        X: Tensor,
        mask: Tensor | None = None,
        *,
        attention_target: Tensor | None = None,
        consistency_weight: float = 0.0,
        record_attention: Callable[[Tensor], None] | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Bag CE, λ-weighted attention-weighted instance CE, ω-weighted consistency.

        Parameters
        ----------
        y : Tensor
            (B,) class indices.
        X, mask
            Padded batch (B, N, D) and its (B, N) mask.
        attention_target : Tensor, optional
            (B, N) EMA targets α̃ (:meth:`AttentionTargets.get`); NaN where an instance has
            no target yet (it adds nothing to the consistency term). Required when
            ``consistency_weight > 0``.
        consistency_weight : float
            ω(m) for the current epoch (see :func:`consistency_weight`).
        record_attention : callable, optional
            Called once with this forward's attention (B, N), detached — the attention the
            loss was computed with, so the EMA needs no extra forward pass
            (:meth:`AttentionTargets.update`).

        Returns
        -------
        logits, losses
            (B, K) bag logits and the dict of the three terms, each averaged over bags and
            already multiplied by its weight (the training loss is their sum,
            :func:`wsi_mil.mil.protocol.total_loss`).
        """
        mask = check_mask(X, mask)
        out = self.outputs(X, mask)
        if record_attention is not None:
            record_attention(out.attention.detach())
        bag = F.cross_entropy(out.bag_logits, y)
        B, N, K = out.instance_logits.shape
        ce_inst = F.cross_entropy(
            out.instance_logits.reshape(B * N, K), y.repeat_interleave(N), reduction="none"
        ).reshape(B, N)  # (B, N)
        ce_inst = ce_inst.masked_fill(~mask, 0.0)
        instance = self.lam * (out.attention * ce_inst).sum(1).mean()
        if consistency_weight > 0.0:
            if attention_target is None:
                raise ValueError("consistency_weight > 0 needs attention_target")
            target = attention_target.to(out.attention)  # (B, N)
            has = mask & ~torch.isnan(target)  # (B, N) instances with a target
            diff = torch.where(has, out.attention - target.nan_to_num(0.0), 0.0)  # (B, N)
            consistency = consistency_weight * diff.pow(2).sum(1).mean()
        else:
            consistency = bag.new_zeros(())
        return out.bag_logits, {"bag": bag, "instance": instance, "consistency": consistency}


class AttentionTargets:
    """Per-instance EMA targets α̃ ← β α̃ + (1 − β) α, kept on the CPU by (bag, instance row).

    An instance is known by its bag's id and its row in the bag file, so when training
    subsamples a bag (``optim.max_instances``) every kept instance meets its own target,
    whichever subset it is in. An instance's target starts at its first observed
    attention; until then it has none (NaN, no consistency cost). The trainer reads the
    targets before the loss (:meth:`get`) and folds in the attention of that same
    training forward (:meth:`update`, via ``compute_loss(record_attention=...)``), so
    every kept instance's target moves once per epoch and no extra forward pass is run.

    Parameters
    ----------
    beta : float
        EMA decay β in [0, 1).

    Examples
    --------
    >>> t = AttentionTargets(beta=0.5)
    >>> rows = torch.tensor([[0, 2, -1]])                     # rows 0 and 2 kept, one pad
    >>> t.get([7], rows)
    tensor([[nan, nan, nan]])
    >>> t.update([7], rows, torch.tensor([[0.25, 0.75, 0.0]]))
    >>> t.update([7], torch.tensor([[2, 1]]), torch.tensor([[0.25, 0.75]]))
    >>> t.get([7], torch.tensor([[0, 1, 2]]))
    tensor([[0.2500, 0.7500, 0.5000]])
    """

    def __init__(self, beta: float = 0.6) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._store: dict[Hashable, np.ndarray] = {}  # bag id -> (n_rows,) float32, NaN unseen

    def get(self, bag_ids: Sequence[Hashable], rows: Tensor) -> Tensor:
        """Targets (B, N) of the instances at ``rows`` (B, N; -1 = padding); NaN where none."""
        r = rows.detach().cpu().numpy()
        out = np.full(r.shape, np.nan, np.float32)
        for i, bid in enumerate(bag_ids):
            stored = self._store.get(bid)
            if stored is None:
                continue
            real = (r[i] >= 0) & (r[i] < len(stored))
            out[i, real] = stored[r[i, real]]
        return torch.from_numpy(out)

    def update(self, bag_ids: Sequence[Hashable], rows: Tensor, attention: Tensor) -> None:
        """Fold a forward's attention (B, N) of the instances at ``rows`` into their targets."""
        r = rows.detach().cpu().numpy()
        att = attention.detach().float().cpu().numpy()
        for i, bid in enumerate(bag_ids):
            real = r[i] >= 0
            ri, new = r[i, real], att[i, real]
            stored = self._store.get(bid)
            need = int(ri.max()) + 1 if len(ri) else 0
            if stored is None or len(stored) < need:
                grown = np.full(need, np.nan, np.float32)
                if stored is not None:
                    grown[: len(stored)] = stored
                stored = self._store[bid] = grown
            old = stored[ri]
            stored[ri] = np.where(np.isnan(old), new, self.beta * old + (1 - self.beta) * new)
