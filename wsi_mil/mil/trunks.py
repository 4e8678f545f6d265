"""Instance-level feature trunks applied before every MIL head.

* :func:`paper_trunk` — the fc-256 / fc-128 / fc-64 stack (ReLU, dropout) that Shi et al.
  (2020) and Ilse et al. (2018) use on the classic MIL benchmarks.
* :func:`projection_trunk` — one linear projection + ReLU + dropout, the usual choice for
  slide-level bags of pretrained patch embeddings (CLAM's ``fc`` block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Standardize(nn.Module):
    """Fixed z-scoring of instance features, (…, D) -> (…, D).

    The statistics are buffers (saved in checkpoints) set from the training split only
    with :meth:`set_stats`; until then the module is the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        """Use ``mean`` (D,) and ``std`` (D,); tiny stds are clamped to avoid blow-ups."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(1.0 / torch.as_tensor(std, dtype=self.scale.dtype).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.scale


def mlp_trunk(in_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for each width in ``hidden``; (…, in_dim) -> (…, hidden[-1])."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU(), nn.Dropout(dropout)]
        prev = width
    return nn.Sequential(*layers)


def paper_trunk(in_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """The paper's fc-256, fc-128, fc-64 trunk; (…, in_dim) -> (…, 64)."""
    return mlp_trunk(in_dim, (256, 128, 64), dropout)


def projection_trunk(in_dim: int, dim: int = 512, dropout: float = 0.25) -> nn.Sequential:
    """One projection for slide features; (…, in_dim) -> (…, dim)."""
    return mlp_trunk(in_dim, (dim,), dropout)


def make_trunk(
    kind: str, in_dim: int, *, hidden: Sequence[int] | None = None, dropout: float = 0.0
) -> tuple[nn.Module, int]:
    """Build a trunk by name and return it with its output width.

    Parameters
    ----------
    kind : {"paper", "projection", "mlp", "identity"}
        Which trunk.
    in_dim : int
        Instance feature width D.
    hidden : sequence of int, optional
        Widths for ``"mlp"`` (and the projection width for ``"projection"``).
    dropout : float
        Dropout after every ReLU.
    """
    if kind == "paper":
        return paper_trunk(in_dim, dropout), 64
    if kind == "projection":
        dim = int(hidden[0]) if hidden else 512
        return projection_trunk(in_dim, dim, dropout), dim
    if kind == "mlp":
        widths = tuple(int(h) for h in (hidden or (256,)))
        return mlp_trunk(in_dim, widths, dropout), widths[-1]
    if kind == "identity":
        return nn.Identity(), in_dim
    raise ValueError(f"unknown trunk {kind!r}; choose paper, projection, mlp or identity")
