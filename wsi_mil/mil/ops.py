"""Masked tensor operations shared by every MIL model.

Padded batches carry a boolean ``mask`` (B, N), True for real instances. Every reduction
over instances goes through these functions so padding never leaks into a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def full_mask(X: Tensor) -> Tensor:
    """All-True mask for an unpadded batch ``X`` (B, N, D) -> (B, N)."""
    return torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)


def check_mask(X: Tensor, mask: Tensor | None) -> Tensor:
    """Return a boolean (B, N) mask for ``X``; ``None`` means no padding."""
    if X.dim() != 3:
        raise ValueError(f"expected X of shape (B, N, D), got {tuple(X.shape)}")
    if mask is None:
        return full_mask(X)
    if mask.shape != X.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match X {tuple(X.shape[:2])}")
    return mask.to(torch.bool)


def masked_log_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Log-softmax over instances (last dim) ignoring padded positions.

    Parameters
    ----------
    scores : Tensor
        (B, N) unnormalised log-weights.
    mask : Tensor
        (B, N) bool, True for real instances; every bag needs at least one.

    Returns
    -------
    Tensor
        (B, N) log-weights; padded positions hold ``-inf`` (their weight is exactly 0).
    """
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, N)
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, N)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over instances with padded positions set to exactly 0 -> (B, N)."""
    return masked_log_softmax(scores, mask).exp()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, N, F) over real instances -> (B, F)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, F)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of ``x`` (B, N, F) over real instances -> (B, F)."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)  # (B, F)
