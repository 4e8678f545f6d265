"""Create MIL models by name, in the manner of timm's ``create_model``.

The registry is a leaf: it knows names and factories, no architecture. Built-in names are
static (:data:`HANDWRITTEN_MODELS`, :data:`ZOO_MODELS`) so listing them imports neither
torch nor torchmil; a factory's module is imported only when a model is created.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from wsi_mil.errors import ConfigError

#: Models written in this package (``wsi_mil.mil.loss_attention``, ``wsi_mil.mil.baselines``).
HANDWRITTEN_MODELS: tuple[str, ...] = (
    "loss_attention",
    "attention",
    "gated_attention",
    "instance_mean",
    "instance_max",
    "embedding_mean",
    "embedding_max",
)

#: The field's models through torchmil (``wsi_mil.mil.zoo``); binary tasks.
ZOO_MODELS: tuple[str, ...] = (
    "abmil",
    "clam",
    "dsmil",
    "dtfdmil",
    "transmil",
    "transformer_abmil",
    "sm_abmil",
    "prob_smooth_abmil",
    "patch_gcn",
)

#: Zoo models that need patch coordinates (``coords=``): the graph and smoothing ones.
COORD_MODELS: frozenset[str] = frozenset({"sm_abmil", "prob_smooth_abmil", "patch_gcn"})

#: Every built-in name, in the order the CLI help lists them.
BUILTIN_MODELS: tuple[str, ...] = HANDWRITTEN_MODELS + ZOO_MODELS

_HANDWRITTEN_FACTORIES = {
    "loss_attention": ("wsi_mil.mil.loss_attention", "LossAttentionMIL"),
    "attention": ("wsi_mil.mil.baselines", "AttentionMIL"),
    "gated_attention": ("wsi_mil.mil.baselines", "GatedAttentionMIL"),
    "instance_mean": ("wsi_mil.mil.baselines", "InstanceMeanPool"),
    "instance_max": ("wsi_mil.mil.baselines", "InstanceMaxPool"),
    "embedding_mean": ("wsi_mil.mil.baselines", "EmbeddingMeanPool"),
    "embedding_max": ("wsi_mil.mil.baselines", "EmbeddingMaxPool"),
}

#: Keyword arguments a model ignores are dropped by :func:`create_model`, so one config
#: (``lam``, ``attention_dim``) serves every model.
_TAKES_LAM = frozenset({"loss_attention"})
_TAKES_ATTENTION_DIM = frozenset({"attention", "gated_attention", *ZOO_MODELS})

_REGISTRY: dict[str, Callable[..., Any]] = {}
_builtins_registered = False


class _Lazy:
    """A factory that imports ``module.attr`` on first call (keeps listing light)."""

    def __init__(self, module: str, attr: str, *args: Any) -> None:
        self.module, self.attr, self.args = module, attr, args

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = getattr(importlib.import_module(self.module), self.attr)
        return target(*self.args, *args, **kwargs)


def register_model(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory(in_dim, n_classes, **kwargs)`` under ``name``.

    A user's name may replace a built-in one; the built-ins stay reachable otherwise.

    Examples
    --------
    >>> from wsi_mil.mil.baselines import AttentionMIL
    >>> register_model("my_attention", AttentionMIL)
    >>> "my_attention" in list_models() and "loss_attention" in list_models()
    True
    """
    _ensure_builtins()
    _REGISTRY[name] = factory


def _ensure_builtins() -> None:
    # A flag of its own: a user's registration must not stand for the built-ins (issue 17).
    global _builtins_registered
    if _builtins_registered:
        return
    _builtins_registered = True
    for name, (module, attr) in _HANDWRITTEN_FACTORIES.items():
        _REGISTRY.setdefault(name, _Lazy(module, attr))
    for name in ZOO_MODELS:
        _REGISTRY.setdefault(name, _Lazy("wsi_mil.mil.zoo", "create_zoo_model", name))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (built-ins and registered ones), sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def needs_coords(name: str) -> bool:
    """Whether model ``name`` needs ``coords=`` (B, N, 2), without building it.

    A built model says the same in its ``needs_coords`` attribute.

    Examples
    --------
    >>> needs_coords("patch_gcn"), needs_coords("loss_attention")
    (True, False)
    """
    return name in COORD_MODELS


def create_model(name: str, in_dim: int, n_classes: int = 2, **kwargs: Any) -> Any:
    """Build a registered MIL model.

    Parameters
    ----------
    name : str
        One of :func:`list_models` (``"loss_attention"``, ``"attention"``, ``"abmil"``, …).
    in_dim : int
        Instance feature width.
    n_classes : int
        Number of classes.
    **kwargs
        Passed to the model (``lam``, ``trunk``, ``hidden``, ``dropout``, ``attention_dim``, …);
        ``lam`` (all but loss_attention) and ``attention_dim`` (all but the attention
        models and the zoo) are dropped, so one training config serves every model.

    Examples
    --------
    >>> m = create_model("loss_attention", in_dim=16, n_classes=2, trunk="identity")
    """
    _ensure_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of {', '.join(list_models())}")
    if name not in _TAKES_LAM:
        kwargs.pop("lam", None)
    if name not in _TAKES_ATTENTION_DIM:
        kwargs.pop("attention_dim", None)
    return _REGISTRY[name](in_dim, n_classes, **kwargs)
