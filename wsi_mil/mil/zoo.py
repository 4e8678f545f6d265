"""The field's MIL models through torchmil, in this package's contract — see docs/mil_zoo.md.

One adapter, :class:`TorchmilMIL`, puts our instance trunk (``trunk``, ``hidden``,
``dropout``, ``input_norm``) in front of a torchmil model and speaks
:class:`~wsi_mil.mil.base.MILModel`'s contract:

* torchmil's heads give one logit z per bag; ours are two-class logits (0, z), so the
  softmax is sigmoid(z) and our cross-entropy equals torchmil's BCE-with-logits;
* ``compute_loss`` returns torchmil's own loss dict: its main criterion becomes ``"bag"``,
  its extra terms keep torchmil's names (CLAM's ``InstLoss``, DSMIL's
  ``BCEWithLogitsLoss_max``, DTFD-MIL's pseudo-bag ``BCEWithLogitsLoss_t2``, the smoothing
  model's ``KLDiv``); the training loss is the sum of all values (torchmil's rule);
* the torchmil model runs bag by bag on the real instances only. Several torchmil models
  ignore the mask somewhere (TransMIL takes none; DSMIL picks its critical instance and
  max-instance over padding; CLAM's instance loss may pick padded rows), so padding can
  never reach a result here;
* in eval mode the random parts (DTFD-MIL's pseudo-bag split, the probabilistic attention
  samples) are drawn from a fixed seed, so a prediction is reproducible; the caller's
  random state is restored.

Graph and smoothing models (``needs_coords = True``) take the patch coordinates
``coords`` (B, N, 2) (or a ready ``adj``) in ``forward``, ``outputs``, ``compute_loss``
and ``predict``; :func:`wsi_mil.mil.zoo_parts.adjacency_from_coords` builds torchmil's
adjacency from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wsi_mil.errors import ConfigError
from wsi_mil.mil.base import MILModel, MILOutput, MILPrediction
from wsi_mil.mil.ops import check_mask
from wsi_mil.mil.zoo_parts import FlatTop1SVM, adjacency_from_coords, fixed_rng


@dataclass(frozen=True)
class ZooSpec:
    """How one torchmil model is built and read.

    Attributes
    ----------
    cls : str
        Class name in ``torchmil.models``.
    kind : str
        How its forward is read: ``"pool"`` (attention pooling, instance scores from its
        bag head), ``"clam"``, ``"dsmil"``, ``"dtfd"`` or ``"transmil"``.
    head : str
        Attribute of the bag classifier (applied to each instance for instance scores).
    needs_adj : bool
        The model needs an adjacency built from patch coordinates.
    bag_key : str
        torchmil's loss key that is the bag term.
    build : callable
        ``build(torchmil.models, embed_dim, attention_dim, options) -> model``.
    """

    cls: str
    kind: str
    head: str = "classifier"
    needs_adj: bool = False
    bag_key: str = "BCEWithLogitsLoss"
    build: Callable[..., Any] | None = None


def _att(dim: int) -> dict[str, int]:
    return {"att_dim": int(dim)}


ZOO: dict[str, ZooSpec] = {
    "abmil": ZooSpec("ABMIL", "pool"),
    "clam": ZooSpec("CLAM_SB", "clam"),
    "dsmil": ZooSpec("DSMIL", "dsmil", head="bag_classifier"),
    "dtfdmil": ZooSpec("DTFDMIL", "dtfd", bag_key="BCEWithLogitsLoss_t1"),
    "transmil": ZooSpec("TransMIL", "transmil"),
    "transformer_abmil": ZooSpec(
        "TransformerABMIL",
        "pool",
        head="last_layer",
        build=lambda m, e, a, o: m.TransformerABMIL(
            in_shape=(e,), pool_att_dim=a, transf_att_dim=o.pop("transf_att_dim", a), **o
        ),
    ),
    "sm_abmil": ZooSpec("SmABMIL", "pool", head="last_layer", needs_adj=True),
    "prob_smooth_abmil": ZooSpec("ProbSmoothABMIL", "pool", needs_adj=True),
    "patch_gcn": ZooSpec("PatchGCN", "pool", needs_adj=True),
}


def create_zoo_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> TorchmilMIL:
    """Build the zoo model ``name`` (the registry's factory; see :class:`TorchmilMIL`).

    Examples
    --------
    >>> m = create_zoo_model("abmil", 16, 2, trunk="identity")  # doctest: +SKIP
    """
    return TorchmilMIL(name, in_dim, n_classes, **kwargs)


def _ones(h: Tensor) -> Tensor:
    """All-True mask (1, n) for one unpadded bag h (1, n, E)."""
    return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)


def _binary(z: Tensor) -> Tensor:
    """One logit (...) -> two-class logits (..., 2) = (0, z): softmax gives sigmoid(z)."""
    return torch.stack([torch.zeros_like(z), z], -1)


class TorchmilMIL(MILModel):
    """A torchmil model behind our trunk, in the :class:`~wsi_mil.mil.base.MILModel` contract.

    Parameters
    ----------
    name : str
        One of :data:`ZOO` (``"abmil"``, ``"clam"``, ``"dsmil"``, …).
    in_dim : int
        Instance feature width D.
    n_classes : int
        Must be 2: torchmil's heads have one logit (a :class:`ConfigError` otherwise).
    attention_dim : int
        torchmil's ``att_dim`` (attention width; TransMIL's token width).
    trunk, hidden, dropout, input_norm
        Our instance trunk, as :class:`~wsi_mil.mil.base.MILModel`.
    **options
        Passed to the torchmil constructor (``k_sample`` for CLAM, ``n_groups`` for DTFD-MIL, …).

    Attributes
    ----------
    needs_coords : bool
        The trainer and inference must pass ``coords`` (B, N, 2) (graph/smoothing models).

    Examples
    --------
    >>> m = TorchmilMIL("abmil", 8, 2, trunk="identity")  # doctest: +SKIP
    >>> m.predict(torch.randn(1, 5, 8)).instance_probs.shape  # doctest: +SKIP
    torch.Size([1, 5, 2])
    """

    needs_coords = False

    def __init__(
        self,
        name: str,
        in_dim: int,
        n_classes: int = 2,
        *,
        attention_dim: int = 128,
        trunk: str = "paper",
        hidden: tuple[int, ...] | list[int] | None = None,
        dropout: float = 0.0,
        input_norm: bool = False,
        **options: Any,
    ) -> None:
        if name not in ZOO:
            raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")
        if n_classes != 2:
            raise ConfigError(
                f"model {name!r} supports binary tasks only (torchmil's {ZOO[name].cls} has one "
                f"output logit), got {n_classes} classes; use loss_attention or attention"
            )
        super().__init__(in_dim, n_classes, trunk=trunk, hidden=hidden, dropout=dropout, input_norm=input_norm)
        import torchmil.models as tm

        self.name = name
        self.spec = ZOO[name]
        self.needs_coords = self.spec.needs_adj
        if self.spec.build is not None:
            self.net = self.spec.build(tm, self.embed_dim, attention_dim, dict(options))
        else:
            self.net = getattr(tm, self.spec.cls)(in_shape=(self.embed_dim,), **_att(attention_dim), **options)
        if self.spec.kind == "clam" and type(self.net.inst_loss_fn).__name__ == "SmoothTop1SVM":
            self.net.inst_loss_fn = FlatTop1SVM(self.net.inst_loss_fn)

    # ------------------------------------------------------------------ per bag
    def _adjs(self, mask: Tensor, coords: Tensor | None, adj: Tensor | None) -> list[Tensor | None]:
        """One adjacency (1, n, n) per bag on its real instances, or Nones."""
        n_real = mask.sum(1).tolist()
        if not self.needs_coords:
            return [None] * len(n_real)
        if adj is None and coords is None:
            raise ConfigError(
                f"model {self.name!r} needs patch coordinates: pass coords=(B, N, 2) "
                "(the trainer and inference read them from the bags)"
            )
        out = []
        for i, n in enumerate(n_real):
            if adj is not None:
                a = adj[i].coalesce() if adj.is_sparse else adj[i].to_sparse().coalesce()
                idx, val = a.indices(), a.values()
                keep = (idx[0] < n) & (idx[1] < n)
                a = torch.sparse_coo_tensor(idx[:, keep], val[keep], (n, n), check_invariants=False)
            else:
                a = adjacency_from_coords(coords[i, :n])
            out.append(a.to(mask.device).unsqueeze(0).coalesce())  # (1, n, n)
        return out

    def _bag(self, h: Tensor, adj: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """torchmil on one bag h (1, n, E): logit (1,), attention (1, n), instance logits (1, n, 2)."""
        net, kind = self.net, self.spec.kind
        kw = {"adj": adj} if adj is not None else {}
        seen: dict[str, Tensor] = {}
        with fixed_rng(h.device, not self.training):
            if kind in ("pool", "clam"):
                hook = net.pool.register_forward_pre_hook(lambda _m, args: seen.update(emb=args[0]))
                try:
                    z, f = net(h, **kw, return_att=True)  # (1,), (1, n) scores before softmax
                finally:
                    hook.remove()
                att = f.softmax(-1)
                if kind == "clam":  # CLAM's positive-class instance classifier: two logits
                    inst = net.inst_classifiers[1](seen["emb"])  # (1, n, 2)
                else:
                    inst = _binary(getattr(net, self.spec.head)(seen["emb"]).squeeze(-1))
            elif kind == "dsmil":
                z_bag, A, y = net(h, return_att=True, return_inst_pred=True)  # (1,), (1, n, 1), (1, n)
                z = 0.5 * (z_bag + y.amax(1))  # torchmil's DSMIL prediction: both streams
                att, inst = A.squeeze(-1), _binary(y)
            elif kind == "dtfd":
                z, cam = net(h, _ones(h), return_inst_cam=True)  # (1,), (1, n)
                att = cam.softmax(-1)
                inst = _binary(net.classifier(h).squeeze(-1))  # tier-1 head per instance (CAM + bias)
            else:  # transmil: its cls-token attention; its head on each instance token
                hook = net.norm.register_forward_hook(lambda _m, _a, out: seen.update(tok=out))
                try:
                    z, a = net(h, return_att=True)  # (1,), (1, n)
                finally:
                    hook.remove()
                n = h.shape[1]
                inst = _binary(net.classifier(seen["tok"][:, 1 : n + 1]).squeeze(-1))  # (1, n, 2)
                a = a.clamp_min(0.0)  # the Nyström approximation can dip below 0
                s = a.sum(-1, keepdim=True)
                att = torch.where(s > 0, a / s.clamp_min(1e-12), torch.full_like(a, 1.0 / n))
        return z.reshape(1), att.reshape(1, -1), inst.reshape(1, -1, 2)

    # ------------------------------------------------------------------ contract
    def outputs(
        self,
        X: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        adj: Tensor | None = None,
    ) -> MILOutput:
        """Bag logits (B, 2), attention (B, N), instance logits (B, N, 2); 0 on padding."""
        mask = check_mask(X, mask)  # (B, N)
        B, N = mask.shape
        h = self.trunk(X)  # (B, N, E)
        logits = h.new_zeros(B, 2)
        att = h.new_zeros(B, N)
        inst = h.new_zeros(B, N, 2)
        for i, a in enumerate(self._adjs(mask, coords, adj)):
            real = mask[i].nonzero().squeeze(1)  # (n,)
            z, att_i, inst_i = self._bag(h[i : i + 1, real], a)
            logits[i, 1] = z[0]
            att[i, real] = att_i[0]
            inst[i, real] = inst_i[0]
        return MILOutput(logits, att, inst)

    def forward(
        self,
        X: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        adj: Tensor | None = None,
    ) -> Tensor:
        """Bag logits (B, 2) = (0, z) of a padded batch ``X`` (B, N, D)."""
        return self.outputs(X, mask, coords=coords, adj=adj).bag_logits

    def compute_loss(
        self,
        y: Tensor,
        X: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        adj: Tensor | None = None,
        consistency_weight: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """torchmil's own loss, bag by bag, averaged over bags.

        Returns
        -------
        logits : Tensor
            (B, 2) bag logits (0, z) of torchmil's ``compute_loss`` prediction.
        losses : dict
            ``"bag"`` (torchmil's criterion: BCE-with-logits = our CE on (0, z)),
            ``"instance"`` and ``"consistency"`` (zero) and torchmil's extra terms under
            their own names; the training loss is the sum of all values.
        """
        if consistency_weight > 0.0:
            raise ConfigError(
                f"optim.omega (the attention consistency cost) applies to loss_attention, not {self.name}"
            )
        mask = check_mask(X, mask)
        h = self.trunk(X)  # (B, N, E)
        preds, sums = [], {}
        for i, a in enumerate(self._adjs(mask, coords, adj)):
            real = mask[i].nonzero().squeeze(1)
            kw: dict[str, Tensor] = {"adj": a} if a is not None else {}
            if self.spec.kind == "dtfd":  # its max-min distillation needs a mask
                kw["mask"] = _ones(h[i : i + 1, real])
            z, terms = self.net.compute_loss(y[i : i + 1], h[i : i + 1, real], **kw)
            preds.append(z.reshape(1))
            for k, v in terms.items():
                key = "bag" if k == self.spec.bag_key else k
                sums[key] = sums.get(key, 0.0) + v / len(y)
        zero = h.new_zeros(())
        losses = {"bag": sums.pop("bag"), "instance": zero, "consistency": zero, **sums}
        return _binary(torch.cat(preds)), losses

    @torch.no_grad()
    def predict(
        self,
        X: Tensor,
        mask: Tensor | None = None,
        return_instance: bool = True,
        *,
        coords: Tensor | None = None,
        adj: Tensor | None = None,
    ) -> MILPrediction:
        """Bag probabilities (B, 2); attention (B, N) and instance probabilities (B, N, 2)."""
        out = self.outputs(X, mask, coords=coords, adj=adj)
        bag_probs = out.bag_logits.softmax(-1)  # (B, 2)
        if not return_instance:
            return MILPrediction(bag_probs)
        mask = check_mask(X, mask)
        inst = out.instance_logits.softmax(-1) * mask.unsqueeze(-1)  # (B, N, 2), 0 on padding
        return MILPrediction(bag_probs, out.attention, inst)
