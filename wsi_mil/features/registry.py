"""Encoder registry after timm: ``register_encoder``, ``create_encoder``, ``list_encoders``.

An encoder is a ``torch.nn.Module`` mapping a normalised (B, 3, S, S) batch to (B, D)
features, plus its :class:`Preprocess` (input size, mean/std, native mpp) and an id of the
weights it carries. Both are copied into every bag's attributes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.errors import WsiMilError, first_line

if TYPE_CHECKING:  # torch is imported lazily: importing wsi_mil.features loads nothing heavy
    from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderError",
    "Preprocess",
    "create_encoder",
    "list_encoders",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``weights`` values meaning "the encoder's published pretrained weights".
PRETRAINED = (None, "", "pretrained", "default")


class EncoderError(WsiMilError):
    """An encoder name, its weights or its download is unusable."""


@dataclass(frozen=True)
class Preprocess:
    """How patches are prepared for an encoder (timm's pretrained config, trimmed).

    Parameters
    ----------
    input_size : int
        Side in pixels of the square the encoder sees; patches are resized to it.
    mean, std : tuple of float
        Per-channel normalisation of RGB scaled to [0, 1].
    native_mpp : float or None
        µm/px the encoder was trained at, if known (recorded; tiling decides the mpp).
    interpolation : str
        Resize filter: ``"area"`` (downscaling) with bilinear when upscaling.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float | None = None
    interpolation: str = "area"


@dataclass
class Encoder:
    """A ready encoder: model in eval mode, output width, preprocessing, weights id."""

    name: str
    model: nn.Module
    dim: int
    preprocess: Preprocess
    weights_id: str

    def attrs(self) -> dict[str, Any]:
        """Bag attributes naming the encoder and its preprocessing."""
        pre = asdict(self.preprocess)
        return {
            "encoder": self.name,
            "encoder_dim": self.dim,
            "encoder_weights": self.weights_id,
            **{f"preprocess_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in pre.items()},
        }


#: factory(name, weights, **kw) -> Encoder
Factory = Callable[..., Encoder]
_NAMES: dict[str, Factory] = {}
_PREFIXES: dict[str, tuple[Factory, str]] = {}


def register_encoder(name: str, factory: Factory | None = None, *, prefix: bool = False, pattern: str = "") -> Any:
    """Register an encoder factory under ``name`` (usable as a decorator).

    Parameters
    ----------
    name : str
        Encoder name (``"resnet50_trunc"``), or with ``prefix=True`` a prefix such as
        ``"timm:"`` that owns every name starting with it.
    factory : callable, optional
        ``factory(name, weights, **kw) -> Encoder``; ``weights`` is None (pretrained),
        ``"random"`` or a local file path.
    prefix : bool
        Register a name prefix instead of one name.
    pattern : str
        How a prefixed name is spelled, for :func:`list_encoders` (``"timm:<name>"``).

    Examples
    --------
    >>> @register_encoder("my_encoder")  # doctest: +SKIP
    ... def my_encoder(name, weights=None, **kw):
    ...     return Encoder(name, model, 384, Preprocess(224), "file:my.safetensors")
    """

    def deco(fn: Factory) -> Factory:
        if prefix:
            _PREFIXES[name] = (fn, pattern or f"{name}<name>")
        else:
            _NAMES[name] = fn
        return fn

    return deco(factory) if factory is not None else deco


def _ensure_builtins() -> None:
    from wsi_mil.features import encoders  # noqa: F401 - registers the built-in encoders


def list_encoders() -> list[str]:
    """Names :func:`create_encoder` accepts (prefixed families shown as patterns)."""
    _ensure_builtins()
    return sorted(_NAMES) + sorted(p for _, p in _PREFIXES.values())


def create_encoder(name: str, weights: str | Path | None = None, **kw: Any) -> Encoder:
    """Build encoder ``name`` in eval mode with the requested weights.

    Parameters
    ----------
    name : str
        A registered name (``resnet50_trunc``, ``texture``), ``timm:<model>`` or
        ``hf-hub:<org>/<model>``.
    weights : str or path, optional
        None for the published pretrained weights (needs the network or a local cache),
        ``"random"`` for a seeded random initialisation, or a local file (safetensors, or
        a PyTorch state dict read with ``weights_only=True``).
    **kw
        Passed to the factory (e.g. ``timm.create_model`` keyword arguments).

    Examples
    --------
    >>> enc = create_encoder("texture")
    >>> enc.dim > 0
    True
    """
    _ensure_builtins()
    if isinstance(weights, Path):
        weights = str(weights)
    if weights in PRETRAINED:
        weights = None
    factory = _NAMES.get(name)
    if factory is None:
        for prefix, (fn, _) in _PREFIXES.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                factory = fn
                break
    if factory is None:
        raise EncoderError(f"unknown encoder {name!r}; valid: {', '.join(list_encoders())}")
    enc = factory(name, weights, **kw)
    enc.model.eval()
    return enc


# -- weights -----------------------------------------------------------------------------
def weights_file_id(path: str | Path) -> str:
    """``file:<name>:<sha256 prefix>`` — identifies a local weights file in bag attributes."""
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"file:{p.name}:{h.hexdigest()[:12]}"


def read_state_dict(path: str | Path, encoder: str) -> dict[str, Any]:
    """Tensors of a local weights file: safetensors, or ``torch.load(weights_only=True)``.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel's
    ``module.`` prefix are removed.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise EncoderError(
            f"{encoder}: weights file {p} does not exist (give a .safetensors or "
            "PyTorch state-dict file, or --weights random)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle raise many types on bad files
        text = str(exc)
        # torch.load's weights_only refusal is a page of advice; its cause follows this marker.
        cause = first_line(text.split("WeightsUnpickler error:", 1)[-1]) if text else type(exc).__name__
        raise EncoderError(
            f"{encoder}: cannot read weights file {p} ({type(exc).__name__}: {cause}); give a "
            ".safetensors file or a PyTorch state dict of this architecture, or --weights random"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderError(f"{encoder}: {p} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(
    model: nn.Module, path: str | Path, encoder: str, ignore: tuple[str, ...] = (), identify: bool = True
) -> str:
    """Load a local weights file into ``model``; missing keys are an error.

    Parameters
    ----------
    ignore : tuple of str
        Prefixes of file keys the model deliberately lacks (e.g. a truncated ResNet's
        ``layer4.``, ``fc.``).
    identify : bool
        Hash the file for its id (False: a hub download, named by its commit instead).

    Returns
    -------
    str
        The weights id (:func:`weights_file_id`; ``""`` when ``identify`` is False).
    """
    sd = read_state_dict(path, encoder)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:  # shapes, non-tensor values
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise EncoderError(
            f"{encoder}: weights in {path} do not fit the model ({first[0].strip()}); wrong architecture?"
        ) from exc
    if missing:
        raise EncoderError(
            f"{encoder}: weights file {path} lacks {len(missing)} parameter(s) of the "
            f"model, e.g. {', '.join(missing[:3])}"
        )
    if unexpected:
        raise EncoderError(
            f"{encoder}: weights file {path} has {len(unexpected)} parameter(s) the "
            f"model lacks, e.g. {', '.join(unexpected[:3])} — wrong architecture?"
        )
    return weights_file_id(path) if identify else ""


def hub_probe(repo: str | None = None, timeout: float = 5.0) -> str:
    """Why the model hub does not answer (``""`` when it does), asked through huggingface_hub.

    One HEAD request through huggingface_hub's own HTTP session, the one its downloads use,
    so ``HTTPS_PROXY``/``HTTP_PROXY``, ``HF_ENDPOINT`` and its CA settings apply. One request,
    no retries: its downloads retry a connection error five times (about 25 s) before giving
    up. Any HTTP answer, even 401 or 404, counts as an answer; a transport error (DNS,
    refused, proxy refusal, timeout) does not. With ``HF_HUB_OFFLINE`` set nothing is sent.
    """
    import os

    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = f"{constants.ENDPOINT}/api/models/{repo}" if repo else constants.ENDPOINT
    try:
        get_session().head(url, timeout=timeout)
    except Exception as exc:  # httpx transport errors (the class lives in huggingface_hub's httpx)
        proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY") if os.environ.get(k)), "")
        via = f" through proxy {proxy}" if proxy else ""
        return f"the model hub cannot be reached{via} ({type(exc).__name__}: {first_line(str(exc)) or 'no answer'})"
    return ""


def hub_reachable(repo: str | None = None, timeout: float = 5.0) -> bool:
    """Whether the model hub answers (:func:`hub_probe`); proxies and ``HF_HUB_OFFLINE`` honoured."""
    return not hub_probe(repo, timeout)


def hub_offline_message(name: str, why: str, repo: str | None = None) -> str:
    """One line: the weights are not in the local cache and the hub cannot be used (``why``)."""
    from huggingface_hub import constants

    return (
        f"{name}: pretrained weights are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"{why}; download them on a machine with network (`hf download {repo or '<repo>'}`, with a hub token for "
        "gated models) and pass --weights PATH (.safetensors or a state dict) or copy the cache, "
        "or use --weights random for tests"
    )


def hub_error_message(name: str, repo: str, exc: BaseException) -> str:
    """One line for a hub error once the hub answered: gated, missing, or another HTTP error."""
    from huggingface_hub import errors

    text = first_line(str(exc))
    if isinstance(exc, errors.GatedRepoError | errors.RepositoryNotFoundError) or " 401 " in f" {text} ":
        return (
            f"{name}: {repo} is gated or needs a token ({type(exc).__name__}); accept its conditions on "
            "the hub, run `hf auth login` (or `huggingface-cli login`), or pass --weights PATH"
        )
    return f"{name}: cannot load pretrained weights from {repo} ({type(exc).__name__}: {text}); or pass --weights PATH"


def hub_call(name: str, repo: str | None, fetch: Callable[[], Any]) -> Any:
    """``fetch()`` (a hub download or a timm/transformers ``pretrained=True`` build), offline when it must be.

    huggingface_hub decides what offline means: with ``HF_HUB_OFFLINE`` set, or when
    :func:`hub_probe` finds the hub unreachable, ``fetch`` runs with huggingface_hub in
    offline mode, so a cached model works without network and an uncached one fails at once
    with one line saying what to do. Otherwise hub errors (gated, missing) become one line.
    """
    from huggingface_hub import constants

    why = hub_probe(repo)
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = bool(why)
    try:
        return fetch()
    except EncoderError:
        raise
    except Exception as exc:  # hub, HTTP and cache errors come in many types
        if why:
            raise EncoderError(hub_offline_message(name, why, repo)) from exc
        raise EncoderError(hub_error_message(name, repo or "the hub", exc)) from exc
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_download(name: str, repo: str, filename: str) -> str:
    """Local path of ``filename`` of hub ``repo`` (the cache, else a download; :func:`hub_call`)."""
    from huggingface_hub import hf_hub_download

    return hub_call(name, repo, lambda: hf_hub_download(repo, filename))
