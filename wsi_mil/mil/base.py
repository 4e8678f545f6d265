"""The one contract every MIL model follows (torchmil's, with instance outputs).

* ``forward(X, mask=None)`` -> bag logits (B, K);
* ``compute_loss(y, X, mask=None, ...)`` -> ``(logits, {"bag", "instance", "consistency"})``;
* ``predict(X, mask=None, return_instance=True)`` -> :class:`MILPrediction`.

``X`` is a padded batch (B, N, D) and ``mask`` (B, N) is True for real instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_mil.mil.ops import check_mask
from wsi_mil.mil.trunks import Standardize, make_trunk


@dataclass
class MILOutput:
    """Everything one forward pass computes.

    Attributes
    ----------
    bag_logits : Tensor
        (B, K).
    attention : Tensor
        (B, N); sums to 1 over the real instances of each bag, 0 on padding.
    instance_logits : Tensor
        (B, N, K) class logits of each instance.
    """

    bag_logits: Tensor
    attention: Tensor
    instance_logits: Tensor


@dataclass
class MILPrediction:
    """Inference outputs: probabilities, not logits.

    Attributes
    ----------
    bag_probs : Tensor
        (B, K) softmax of the bag logits.
    attention : Tensor or None
        (B, N) attention per instance (None unless ``return_instance``).
    instance_probs : Tensor or None
        (B, N, K) softmax of each instance's logits (None unless ``return_instance``).
    """

    bag_probs: Tensor
    attention: Tensor | None = None
    instance_probs: Tensor | None = None


class MILModel(nn.Module):
    """Base class: an instance trunk followed by a pooling head.

    Parameters
    ----------
    in_dim : int
        Instance feature width D.
    n_classes : int
        Number of classes K (>= 2).
    trunk : str
        ``"paper"`` (fc-256/128/64), ``"projection"``, ``"mlp"`` or ``"identity"``.
    hidden : sequence of int, optional
        Trunk widths (see :func:`wsi_mil.mil.trunks.make_trunk`).
    dropout : float
        Dropout in the trunk.
    input_norm : bool
        Put a :class:`~wsi_mil.mil.trunks.Standardize` layer in front of the trunk; set its
        statistics from the training split with :meth:`set_input_stats`.

    Attributes
    ----------
    needs_coords : bool
        True for models that need the patch coordinates: the trainer and inference then
        pass ``coords`` (B, N, 2), padded like ``X``, as a keyword to ``outputs``,
        ``forward``, ``compute_loss`` and ``predict`` (the graph models of
        :mod:`wsi_mil.mil.zoo`). False here.
    """

    #: Whether ``coords=`` (B, N, 2) must be passed to the model's methods.
    needs_coords: bool = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        *,
        trunk: str = "paper",
        hidden: tuple[int, ...] | list[int] | None = None,
        dropout: float = 0.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.trunk, self.embed_dim = make_trunk(trunk, in_dim, hidden=hidden, dropout=dropout)
        if input_norm:
            self.trunk = nn.Sequential(Standardize(in_dim), self.trunk)

    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        """Set the z-scoring statistics (D,) of the ``input_norm`` layer."""
        first = self.trunk[0] if isinstance(self.trunk, nn.Sequential) else None
        if not isinstance(first, Standardize):
            raise ValueError("model was built without input_norm=True")
        first.set_stats(mean, std)

    def outputs(self, X: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Bag logits, attention and instance logits for a padded batch."""
        raise NotImplementedError

    def forward(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        """Bag logits (B, K) of a padded batch ``X`` (B, N, D)."""
        return self.outputs(X, mask).bag_logits

    def compute_loss(
        self, y: Tensor, X: Tensor, mask: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Bag cross-entropy; subclasses add their own terms.

        Returns
        -------
        logits : Tensor
            (B, K) bag logits.
        losses : dict
            ``"bag"``, ``"instance"`` and ``"consistency"`` scalars (zeros when unused);
            the training loss is their sum.
        """
        out = self.outputs(X, mask)
        zero = out.bag_logits.new_zeros(())
        return out.bag_logits, {
            "bag": F.cross_entropy(out.bag_logits, y),
            "instance": zero,
            "consistency": zero,
        }

    @torch.no_grad()
    def predict(
        self, X: Tensor, mask: Tensor | None = None, return_instance: bool = True
    ) -> MILPrediction:
        """Bag probabilities and, if asked, attention and instance probabilities."""
        out = self.outputs(X, mask)
        bag_probs = out.bag_logits.softmax(-1)  # (B, K)
        if not return_instance:
            return MILPrediction(bag_probs)
        mask = check_mask(X, mask)
        inst = out.instance_logits.softmax(-1) * mask.unsqueeze(-1)  # (B, N, K), 0 on padding
        return MILPrediction(bag_probs, out.attention, inst)

    def embed(self, X: Tensor) -> Tensor:
        """Trunk features h: (B, N, D) -> (B, N, E)."""
        return self.trunk(X)
