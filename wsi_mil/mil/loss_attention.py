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
from collections.abc import Hashable, Sequence
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
            (B, N) EMA targets α̃ (from :class:`AttentionTargets`); required when
            ``consistency_weight > 0``.
        consistency_weight : float
            ω(m) for the current epoch (see :func:`consistency_weight`).

        Returns
        -------
        logits, losses
            (B, K) bag logits and the dict of the three terms, each averaged over bags and
            already multiplied by its weight (the training loss is their sum).
        """
        mask = check_mask(X, mask)
        out = self.outputs(X, mask)
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
            diff = (out.attention - attention_target.to(out.attention)).masked_fill(~mask, 0.0)
            consistency = consistency_weight * diff.pow(2).sum(1).mean()
        else:
            consistency = bag.new_zeros(())
        return out.bag_logits, {"bag": bag, "instance": instance, "consistency": consistency}


class AttentionTargets:
    """Per-instance EMA targets α̃ ← β α̃ + (1 − β) α, kept on the CPU by bag id.

    A bag's targets start at its first observed attention. The trainer calls
    :meth:`get` before the loss and :meth:`update` with the attention of the same step,
    so over an epoch every instance's target moves once.

    Parameters
    ----------
    beta : float
        EMA decay β in [0, 1).
    """

    def __init__(self, beta: float = 0.6) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._store: dict[Hashable, np.ndarray] = {}

    def get(self, bag_ids: Sequence[Hashable], attention: Tensor, mask: Tensor) -> Tensor:
        """Targets (B, N) for ``bag_ids``; unseen bags get their current ``attention``."""
        att = attention.detach().cpu().numpy()  # (B, N)
        n_real = mask.sum(1).cpu().numpy()
        out = np.zeros_like(att)
        for i, bid in enumerate(bag_ids):
            n = int(n_real[i])
            stored = self._store.get(bid)
            out[i, :n] = stored if stored is not None and len(stored) == n else att[i, :n]
        return torch.from_numpy(out).to(attention.device)

    def update(self, bag_ids: Sequence[Hashable], attention: Tensor, mask: Tensor) -> None:
        """Fold the step's attention (B, N) into the stored targets."""
        att = attention.detach().cpu().numpy()
        n_real = mask.sum(1).cpu().numpy()
        for i, bid in enumerate(bag_ids):
            n = int(n_real[i])
            new = att[i, :n].astype(np.float32)
            old = self._store.get(bid)
            self._store[bid] = (
                new if old is None or len(old) != n else self.beta * old + (1 - self.beta) * new
            )
