"""Baselines in the same contract as :class:`~wsi_mil.mil.loss_attention.LossAttentionMIL`.

* :class:`AttentionMIL` and :class:`GatedAttentionMIL` — Ilse, Tomczak & Welling (2018);
* :class:`InstanceMeanPool` / :class:`InstanceMaxPool` — classify every instance, pool the
  instance probabilities (mi-Net style);
* :class:`EmbeddingMeanPool` / :class:`EmbeddingMaxPool` — pool the trunk features, then
  classify (MI-Net style).

Instance logits of the embedding-level models are the bag classifier applied to each
instance's features on its own, so heatmaps work for every model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsi_mil.mil.base import MILModel, MILOutput
from wsi_mil.mil.ops import check_mask, masked_max, masked_mean, masked_softmax


class AttentionMIL(MILModel):
    """Attention-based deep MIL (Ilse et al. 2018): a_t = softmax(w·tanh(V h_t)).

    Parameters
    ----------
    attention_dim : int
        Width L of the attention network (the paper's 128 on the classic datasets).
    gated : bool
        Use the gated variant a_t ∝ exp(w·(tanh(V h_t) ⊙ sigm(U h_t))).
    Other parameters as :class:`~wsi_mil.mil.base.MILModel`.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        attention_dim: int = 128,
        gated: bool = False,
        trunk: str = "paper",
        hidden: tuple[int, ...] | list[int] | None = None,
        dropout: float = 0.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__(
            in_dim, n_classes, trunk=trunk, hidden=hidden, dropout=dropout, input_norm=input_norm
        )
        self.gated = gated
        self.att_v = nn.Sequential(nn.Linear(self.embed_dim, attention_dim), nn.Tanh())
        self.att_u = (
            nn.Sequential(nn.Linear(self.embed_dim, attention_dim), nn.Sigmoid()) if gated else None
        )
        self.att_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)

    def outputs(self, X: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Attention-pooled embedding through a linear classifier."""
        mask = check_mask(X, mask)  # (B, N)
        h = self.trunk(X)  # (B, N, E)
        a = self.att_v(h)  # (B, N, L)
        if self.att_u is not None:
            a = a * self.att_u(h)  # (B, N, L)
        att = masked_softmax(self.att_w(a).squeeze(-1), mask)  # (B, N)
        pooled = torch.einsum("bn,bne->be", att, h.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, E)
        return MILOutput(self.classifier(pooled), att, self.classifier(h))


class GatedAttentionMIL(AttentionMIL):
    """Gated attention MIL (Ilse et al. 2018)."""

    def __init__(self, in_dim: int, n_classes: int = 2, **kwargs: object) -> None:
        kwargs.pop("gated", None)
        super().__init__(in_dim, n_classes, gated=True, **kwargs)  # type: ignore[arg-type]


class _InstancePool(MILModel):
    """Classify instances, pool their class probabilities; bag logits are log-probs."""

    pool = "mean"

    def __init__(self, in_dim: int, n_classes: int = 2, **kwargs: object) -> None:
        super().__init__(in_dim, n_classes, **kwargs)  # type: ignore[arg-type]
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)

    def outputs(self, X: Tensor, mask: Tensor | None = None) -> MILOutput:
        mask = check_mask(X, mask)  # (B, N)
        z = self.classifier(self.trunk(X))  # (B, N, K)
        p = z.softmax(-1)  # (B, N, K)
        if self.pool == "mean":
            bag_p = masked_mean(p, mask)  # (B, K)
            att = mask.to(p.dtype) / mask.sum(1, keepdim=True).to(p.dtype)  # (B, N)
        else:
            # Max of the non-background classes; class 0 takes what is left (binary: max-pool).
            pos = masked_max(p[..., 1:], mask)  # (B, K-1)
            bag_p = torch.cat([(1 - pos.sum(-1, keepdim=True)).clamp_min(1e-6), pos], -1)  # (B, K)
            bag_p = bag_p / bag_p.sum(-1, keepdim=True)
            score = p[..., 1:].amax(-1).masked_fill(~mask, -1.0)  # (B, N)
            att = torch.nn.functional.one_hot(score.argmax(1), X.shape[1]).to(p.dtype)  # (B, N)
        return MILOutput(bag_p.clamp_min(1e-12).log(), att, z)


class InstanceMeanPool(_InstancePool):
    """Instance-level mean pooling of class probabilities."""

    pool = "mean"


class InstanceMaxPool(_InstancePool):
    """Instance-level max pooling of the positive-class probabilities."""

    pool = "max"


class _EmbeddingPool(MILModel):
    """Pool trunk features over instances, then one linear classifier."""

    pool = "mean"

    def __init__(self, in_dim: int, n_classes: int = 2, **kwargs: object) -> None:
        super().__init__(in_dim, n_classes, **kwargs)  # type: ignore[arg-type]
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)

    def outputs(self, X: Tensor, mask: Tensor | None = None) -> MILOutput:
        mask = check_mask(X, mask)  # (B, N)
        h = self.trunk(X)  # (B, N, E)
        if self.pool == "mean":
            pooled = masked_mean(h, mask)  # (B, E)
            att = mask.to(h.dtype) / mask.sum(1, keepdim=True).to(h.dtype)  # (B, N)
        else:
            pooled = masked_max(h, mask)  # (B, E)
            # Share of feature channels each instance wins: a max-pool "attention".
            hm = h.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (B, N, E)
            wins = torch.nn.functional.one_hot(hm.argmax(1), X.shape[1]).to(h.dtype)  # (B, E, N)
            att = wins.mean(1)  # (B, N)
        return MILOutput(self.classifier(pooled), att, self.classifier(h))


class EmbeddingMeanPool(_EmbeddingPool):
    """Embedding-level mean pooling."""

    pool = "mean"


class EmbeddingMaxPool(_EmbeddingPool):
    """Embedding-level max pooling."""

    pool = "max"
