"""Create MIL models by name, in the manner of timm's ``create_model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsi_mil.errors import ConfigError

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_model(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(in_dim, n_classes, **kwargs)`` under ``name``."""
    _REGISTRY[name] = factory


def _ensure_builtins() -> None:
    if _REGISTRY:
        return
    from wsi_mil.mil import baselines
    from wsi_mil.mil.loss_attention import LossAttentionMIL

    register_model("loss_attention", LossAttentionMIL)
    register_model("attention", baselines.AttentionMIL)
    register_model("gated_attention", baselines.GatedAttentionMIL)
    register_model("instance_mean", baselines.InstanceMeanPool)
    register_model("instance_max", baselines.InstanceMaxPool)
    register_model("embedding_mean", baselines.EmbeddingMeanPool)
    register_model("embedding_max", baselines.EmbeddingMaxPool)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def create_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> Any:
    """Build a registered MIL model.

    Parameters
    ----------
    name : str
        One of :func:`list_models` (``"loss_attention"``, ``"attention"``, …).
    in_dim : int
        Instance feature width.
    n_classes : int
        Number of classes.
    **kwargs
        Passed to the model (``lam``, ``trunk``, ``hidden``, ``dropout``, …).

    Examples
    --------
    >>> m = create_model("loss_attention", in_dim=16, n_classes=2, trunk="identity")
    """
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of {', '.join(list_models())}")
    if name != "loss_attention":
        kwargs.pop("lam", None)
    if name not in ("attention", "gated_attention"):
        kwargs.pop("attention_dim", None)
    return _REGISTRY[name](in_dim, n_classes, **kwargs)
