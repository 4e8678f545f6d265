"""Loss-based attention pooling for CNN feature maps (Shi et al., AAAI 2020) — docs/pool2d.md.

A drop-in replacement for a CNN's global average pooling followed by its last fully
connected layer. The H×W positions of a feature map are the instances of a bag:

* position logits     z_t = h_t W + b                     (B, H·W, K)
* attention           α_t = softmax_t(logsumexp_c z_tc)    (B, H·W)
* image logits        z = (Σ_t α_t h_t) W + b               (B, K)
* loss terms          bag = CE(z, y),  instance = λ Σ_t α_t CE(z_t, y)

The attention comes from the classifier's own weights (no attention network), exactly as
in :class:`wsi_mil.mil.loss_attention.LossAttentionMIL` with an identity trunk; the
paper uses it this way on CIFAR-10 and Tiny ImageNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Pool2dOutput:
    """Everything one forward pass of :class:`LossAttentionPool2d` computes.

    Attributes
    ----------
    logits : Tensor
        (B, K) image logits.
    attention : Tensor
        (B, H, W) attention map; sums to 1 over the positions of each image.
    position_logits : Tensor
        (B, H, W, K) class logits of each position.
    """

    logits: Tensor
    attention: Tensor
    position_logits: Tensor


class LossAttentionPool2d(nn.Module):
    """Global pooling + classifier in one: attention from the classifier's own weights.

    Replace ``nn.AdaptiveAvgPool2d(1)`` → ``flatten`` → ``nn.Linear(C, K)`` by this layer.

    Parameters
    ----------
    in_channels : int
        Feature-map channels C.
    n_classes : int
        Number of classes K >= 2.
    lam : float
        λ, weight of the attention-weighted position (instance) cross-entropy.

    Examples
    --------
    >>> pool = LossAttentionPool2d(16, 3)
    >>> fmap = torch.randn(2, 16, 4, 5)               # (B, C, H, W)
    >>> pool(fmap).shape
    torch.Size([2, 3])
    >>> torch.allclose(pool.attention_map(fmap).sum((1, 2)), torch.ones(2))
    True
    """

    def __init__(self, in_channels: int, n_classes: int, *, lam: float = 0.1) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.lam = float(lam)
        self.classifier = nn.Linear(self.in_channels, self.n_classes)  # W (C×K), b

    def outputs(self, feature_map: Tensor) -> Pool2dOutput:
        """Image logits, attention map and per-position logits of ``feature_map`` (B, C, H, W)."""
        if feature_map.dim() != 4 or feature_map.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a feature map (B, {self.in_channels}, H, W), got {tuple(feature_map.shape)}"
            )
        B, _, H, W = feature_map.shape
        h = feature_map.flatten(2).transpose(1, 2)  # (B, H·W, C) positions as instances
        z_pos = self.classifier(h)  # (B, H·W, K)
        att = torch.logsumexp(z_pos, dim=-1).softmax(dim=-1)  # (B, H·W), log-space safe
        pooled = torch.einsum("bn,bnc->bc", att, h)  # (B, C)
        logits = self.classifier(pooled)  # (B, K)
        return Pool2dOutput(logits, att.reshape(B, H, W), z_pos.reshape(B, H, W, self.n_classes))

    def forward(self, feature_map: Tensor) -> Tensor:
        """Image logits (B, K) of ``feature_map`` (B, C, H, W)."""
        return self.outputs(feature_map).logits

    def attention_map(self, feature_map: Tensor) -> Tensor:
        """Attention (B, H, W) over the positions of each image (sums to 1)."""
        return self.outputs(feature_map).attention

    def compute_loss(self, y: Tensor, feature_map: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Image cross-entropy and the λ-weighted attention-weighted position cross-entropy.

        Parameters
        ----------
        y : Tensor
            (B,) class indices.
        feature_map : Tensor
            (B, C, H, W).

        Returns
        -------
        logits, losses
            (B, K) image logits and ``{"bag", "instance"}``, each averaged over images and
            already weighted; the training loss is ``sum(losses.values())``.
        """
        out = self.outputs(feature_map)
        return out.logits, self.loss_terms(out, y)

    def loss_terms(self, out: Pool2dOutput, y: Tensor) -> dict[str, Tensor]:
        """``{"bag", "instance"}`` of an already computed :class:`Pool2dOutput`."""
        B, H, W, K = out.position_logits.shape
        bag = F.cross_entropy(out.logits, y)
        ce_pos = F.cross_entropy(
            out.position_logits.reshape(B * H * W, K), y.repeat_interleave(H * W), reduction="none"
        ).reshape(B, H * W)  # (B, H·W)
        instance = self.lam * (out.attention.reshape(B, H * W) * ce_pos).sum(1).mean()
        return {"bag": bag, "instance": instance}
