"""Loss-based attention MIL as a torchmil model, for torchmil users — see docs/mil_zoo.md.

:class:`LossAttentionTorchmil` is a ``torchmil.models.MILModel`` around our
:class:`~wsi_mil.mil.loss_attention.LossAttentionMIL`, with torchmil's interface:

* ``forward(X, mask=None, return_att=False)`` -> ``Y_pred`` (and attention);
* ``compute_loss(Y, X, mask=None)`` -> ``(Y_pred, {"bag": …, "instance": …})``
  (torchmil's ``Trainer`` sums the values);
* ``predict(X, mask=None, return_inst_pred=True)`` -> ``(Y_pred, y_inst_pred)``.

Binary tasks follow torchmil's convention of one logit per bag: ``Y_pred`` is
z₁ − z₀ (so ``sigmoid(Y_pred)`` is our softmax probability of class 1) and instance
predictions are z_t1 − z_t0; with ``n_classes > 2`` they are the (B, K) and (B, N, K) logits.
The attention is the method's own α (sums to 1 over the real instances).

This module imports torchmil at import time (the class subclasses torchmil's base); the
rest of wsi_mil never imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmil.models import MILModel as TorchmilModel

from wsi_mil.mil.loss_attention import LossAttentionMIL


class LossAttentionTorchmil(TorchmilModel):
    """Loss-attention MIL (Shi et al. 2020) with torchmil's forward / compute_loss / predict.

    Parameters
    ----------
    in_shape : tuple of int
        ``(D,)``, the instance feature width, as torchmil models take it.
    n_classes : int
        K >= 2; binary tasks give torchmil's single logit.
    lam : float
        λ, weight of the attention-weighted instance loss.
    trunk, hidden, dropout
        The instance trunk (see :class:`~wsi_mil.mil.base.MILModel`).

    Examples
    --------
    >>> m = LossAttentionTorchmil((8,), trunk="identity")
    >>> m(torch.randn(2, 5, 8)).shape
    torch.Size([2])
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        n_classes: int = 2,
        *,
        lam: float = 0.1,
        trunk: str = "paper",
        hidden: tuple[int, ...] | list[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = LossAttentionMIL(
            int(in_shape[-1]), n_classes, lam=lam, trunk=trunk, hidden=hidden, dropout=dropout
        )

    def _to_torchmil(self, logits: Tensor) -> Tensor:
        """(…, K) class logits -> torchmil's (…,) single logit when K == 2."""
        return logits[..., 1] - logits[..., 0] if self.model.n_classes == 2 else logits

    def forward(
        self, X: Tensor, mask: Tensor | None = None, return_att: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Bag logits (B,) (binary) or (B, K); with ``return_att`` also α (B, N)."""
        out = self.model.outputs(X, mask)
        y_pred = self._to_torchmil(out.bag_logits)
        return (y_pred, out.attention) if return_att else y_pred

    def compute_loss(self, Y: Tensor, X: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The method's loss: ``"bag"`` CE and ``"instance"`` λ Σ α_t CE(z_t, Y).

        The consistency term needs per-instance EMA targets over epochs, which torchmil's
        trainer does not keep; train with ``wsi-mil train`` for ω > 0.
        """
        logits, terms = self.model.compute_loss(Y.reshape(-1).long(), X, mask)
        return self._to_torchmil(logits), {"bag": terms["bag"], "instance": terms["instance"]}

    @torch.no_grad()
    def predict(
        self, X: Tensor, mask: Tensor | None = None, return_inst_pred: bool = True
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Bag logits and, if asked, instance logits (B, N) (binary) or (B, N, K); 0 on padding."""
        out = self.model.outputs(X, mask)
        y_pred = self._to_torchmil(out.bag_logits)
        if not return_inst_pred:
            return y_pred
        inst = self._to_torchmil(out.instance_logits)
        if mask is not None:
            m = mask.to(torch.bool)
            inst = inst * (m if inst.dim() == 2 else m.unsqueeze(-1))
        return y_pred, inst
