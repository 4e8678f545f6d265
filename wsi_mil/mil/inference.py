"""Load a trained run and predict: the fold ensemble that stage 4 calls."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from wsi_mil.errors import BagError, ConfigError, first_line
from wsi_mil.io.h5 import read_bag
from wsi_mil.mil.base import MILPrediction
from wsi_mil.mil.registry import create_model


class FoldEnsemble(nn.Module):
    """Mean of the fold models' outputs; same contract as a single MIL model.

    Bag probabilities, attention and instance probabilities are each averaged over folds.
    ``forward`` returns the log of the mean probabilities (usable as logits). Fold models
    with ``needs_coords`` (the graph models) get the patch coordinates; their adjacency is
    built once per call and shared by the folds.

    Attributes
    ----------
    classes : list of str
        Class names, index order of the probabilities.
    encoder : str
        Feature folder the run was trained on.
    """

    def __init__(self, models: Sequence[nn.Module], classes: list[str], encoder: str) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.classes = list(classes)
        self.encoder = encoder

    @property
    def needs_coords(self) -> bool:
        """True when some fold model needs the patch coordinates."""
        return any(getattr(m, "needs_coords", False) for m in self.models)

    @torch.no_grad()
    def predict(
        self, X: Tensor, mask: Tensor | None = None, return_instance: bool = True, *, coords: Tensor | None = None
    ) -> MILPrediction:
        """Fold-averaged :class:`MILPrediction` for a padded batch (B, N, D); ``coords`` (B, N, 2)."""
        graph: dict[str, Tensor] = {}
        if coords is not None and self.needs_coords:
            graph = {"adj": shared_adjacency(X, mask, coords)}
        preds = [m.predict(X, mask, return_instance, **(graph if getattr(m, "needs_coords", False) else {}))
                 for m in self.models]
        bag = torch.stack([p.bag_probs for p in preds]).mean(0)  # (B, K)
        if not return_instance:
            return MILPrediction(bag)
        att = torch.stack([p.attention for p in preds]).mean(0)  # (B, N)
        inst = torch.stack([p.instance_probs for p in preds]).mean(0)  # (B, N, K)
        return MILPrediction(bag, att, inst)

    def forward(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log mean probabilities (B, K)."""
        return self.predict(X, mask, return_instance=False).bag_probs.clamp_min(1e-12).log()


def load_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> FoldEnsemble:
    """Rebuild the fold ensemble of ``OUT/models/<run>``.

    Examples
    --------
    >>> ens = load_model("OUT/models/run1")  # doctest: +SKIP
    >>> ens.predict(torch.randn(1, 100, ens.models[0].in_dim)).bag_probs  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from wsi_mil.io.run_folder import MODEL_FILE, read_model_spec

    run_dir = Path(run_dir)
    spec = read_model_spec(run_dir)
    where = run_dir / MODEL_FILE
    try:
        checkpoints = [str(c) for c in spec["checkpoints"]]
        classes = [str(c) for c in spec["classes"]]
        if not checkpoints or len(classes) != int(spec["n_classes"]):
            raise ValueError("no checkpoints, or n_classes differs from the class list")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a usable model description ({type(exc).__name__}: "
                          f"{first_line(exc)}); was it edited? retrain the run") from exc
    models = []
    for ckpt in checkpoints:
        try:
            model = create_model(spec["model"], spec["in_dim"], spec["n_classes"], **spec["kwargs"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{where}: cannot rebuild the model ({type(exc).__name__}: {first_line(exc)}); "
                              "was it edited? retrain the run") from exc
        path = run_dir / ckpt
        try:
            state = load_file(str(path))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: checkpoint missing; the run is incomplete, retrain it") from exc
        except Exception as exc:  # safetensors raises its own SafetensorError on a damaged file
            raise ConfigError(f"{path}: damaged checkpoint ({first_line(exc)}); retrain the run "
                              "or restore the file") from exc
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # the first mismatch, not one line per tensor
            detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), first_line(exc))
            raise ConfigError(f"{path}: checkpoint does not fit {where.name} ({detail.rstrip('.')}); "
                              f"was {where.name} edited? retrain the run") from exc
        models.append(model.eval())
    return FoldEnsemble(models, classes, str(spec.get("encoder", ""))).to(device).eval()


def shared_adjacency(X: Tensor, mask: Tensor | None, coords: Tensor) -> Tensor:
    """The graph models' adjacency of a padded batch as one sparse (B, N, N) tensor.

    Each bag's block is :func:`wsi_mil.mil.zoo_parts.adjacency_from_coords` of its real
    instances (the first ``mask[i].sum()`` rows), as the models build it from ``coords``.
    """
    from wsi_mil.mil.zoo_parts import adjacency_from_coords

    B, N = X.shape[:2]
    n_real = mask.sum(1).tolist() if mask is not None else [N] * B
    blocks = []
    for i, n in enumerate(n_real):
        a = adjacency_from_coords(coords[i, :n]).coalesce()  # (n, n)
        blocks.append(torch.sparse_coo_tensor(a.indices(), a.values(), (N, N), check_invariants=False))
    return torch.stack(blocks).coalesce().to(X.device)  # (B, N, N)


def predict_bag(
    model: nn.Module, features: np.ndarray | Tensor, coords: np.ndarray | Tensor | None = None
) -> MILPrediction:
    """Predict one bag (N, D): bag probs (1, K), attention (1, N), instance probs (1, N, K).

    ``coords`` (N, 2), the bag's level-0 patch coordinates, is passed on (as (1, N, 2)) to
    a model or ensemble with ``needs_coords``; such a model without it raises ``ConfigError``.
    """
    X = torch.as_tensor(np.asarray(features, np.float32)).unsqueeze(0)  # (1, N, D)
    dev = next(model.parameters()).device
    kw = {}
    if coords is not None and getattr(model, "needs_coords", False):
        kw["coords"] = torch.as_tensor(np.asarray(coords)).reshape(1, -1, 2).to(dev)  # (1, N, 2)
    return model.predict(X.to(dev), None, return_instance=True, **kw)


def predict_bags(
    model: FoldEnsemble,
    bags: Sequence[str | os.PathLike[str]],
    *,
    slide_ids: Sequence[str] | None = None,
):  # -> pandas.DataFrame
    """Diagnose feature bags (HDF5 paths); one bag in memory at a time.

    Returns
    -------
    pandas.DataFrame
        ``slide_id``, ``prediction`` (class name) and ``prob_<class>`` per class.
    """
    import pandas as pd

    rows = []
    for i, path in enumerate(bags):
        bag = read_bag(path)
        if len(bag.features) == 0:
            raise BagError(f"{path}: bag has no instances")
        probs = predict_bag(model, bag.features, bag.coords).bag_probs[0].cpu().numpy()
        sid = slide_ids[i] if slide_ids is not None else Path(path).stem
        row = {"slide_id": sid, "prediction": model.classes[int(probs.argmax())]}
        row.update({f"prob_{c}": float(p) for c, p in zip(model.classes, probs, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)
