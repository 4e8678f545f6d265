"""Build the named presets of :mod:`.presets` in their published architecture and key layout.

Three families, one per key layout a ``--weights`` file must have:

* ``timm``: ``timm.create_model(arch, **card_kwargs)``; its ``state_dict`` is the layout of
  the hub's ``pytorch_model.bin`` (UNI, UNI2-h, Virchow, H-optimus, Prov-GigaPath, kaiko).
  ``cls+mean`` pooling (Virchow) wraps the token output, after the weights are loaded.
* ``conch``: CONCH v1.5's vision tower — a timm ViT-L/16 under ``trunk.``, its attentional
  pooler ``attn_pool_contrast.`` and ``ln_contrast.`` (``pytorch_model_vision.bin``).
* ``transformers``: a transformers DINOv2 model; a weights file is loaded by
  ``from_pretrained`` on a folder holding the preset's ``config.json`` and the file, so
  transformers' own key handling applies (transformers is optional: ``pip install
  'wsi-mil[transformers]'``).

Every file is loaded strictly: a missing, surplus or misshapen key is one line naming the
file and the key. Keyword arguments override the card's (tests shrink ``depth``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.features.presets import PRESETS, EncoderPreset
from wsi_mil.features.registry import (
    Encoder,
    EncoderError,
    hub_download,
    load_weights,
    register_encoder,
    weights_file_id,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_preset"]

#: Seed of ``--weights random`` (as :data:`wsi_mil.features.encoders.RANDOM_SEED`).
RANDOM_SEED = 0


def _seeded(build: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _pretrained_id(preset: EncoderPreset, path: str) -> str:
    """``pretrained:<repo>@<commit>`` from the hub cache path (``…/snapshots/<commit>/file``)."""
    parts = Path(path).parts
    commit = parts[parts.index("snapshots") + 1][:12] if "snapshots" in parts else "local"
    return f"pretrained:{preset.hub_repo}@{commit}"


# -- modules the cards add on top of the backbone ----------------------------------------
@functools.cache
def _modules() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TokenPool(nn.Module):
        """Class token ⊕ mean of the patch tokens (register tokens excluded), Virchow's embedding."""

        def __init__(self, vit: nn.Module) -> None:
            super().__init__()
            self.vit = vit
            self.num_prefix_tokens = int(vit.num_prefix_tokens)  # class + register tokens

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.vit(x)  # (B, 1 + R + N, D): timm with global_pool="" returns every token
            patches = tokens[:, self.num_prefix_tokens :]  # (B, N, D)
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # (B, 2D)

    class AttentionalPooler(nn.Module):
        """Learnt queries attending over all tokens (CONCH's ``attn_pool_contrast``)."""

        def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int = 1) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.heads = n_head
            self.ln_k = nn.LayerNorm(context_dim)
            self.ln_q = nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, d_model, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
            self.to_out = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h = x.shape[0], self.heads
            q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, D)
            k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, D) each
            q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, ·, D/H)
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Q, D/H)
            return self.to_out(out.transpose(1, 2).flatten(2))  # (B, Q, D)

    class ConchVision(nn.Module):
        """CONCH v1.5 vision tower: ViT-L/16 trunk → attentional pooler → LayerNorm (768-d)."""

        def __init__(self, trunk: nn.Module, dim: int, heads: int) -> None:
            super().__init__()
            self.trunk = trunk
            self.attn_pool_contrast = AttentionalPooler(dim, int(trunk.embed_dim), heads)
            self.ln_contrast = nn.LayerNorm(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)  # (B, 1 + N, 1024), after the trunk's norm
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # (B, 768)

    class HFPooled(nn.Module):
        """A transformers vision model's ``pooler_output`` (DINOv2: the normed class token)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=x).pooler_output  # (B, D)

    return TokenPool, ConchVision, HFPooled


# -- families ----------------------------------------------------------------------------
def _timm_kwargs(preset: EncoderPreset, kw: dict[str, Any]) -> dict[str, Any]:
    import timm.layers
    import torch

    layers = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
    out = {**preset.kwargs, **kw}
    return {k: layers.get(v, v) if isinstance(v, str) and k.endswith("_layer") else v for k, v in out.items()}


def _build_timm(preset: EncoderPreset, kw: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = _timm_kwargs(preset, kw)
    if preset.family == "conch":
        _, ConchVision, _ = _modules()
        trunk = timm.create_model(preset.arch, pretrained=False, **kwargs)
        return ConchVision(trunk, int(preset.extra["pool_dim"]), int(preset.extra["pool_heads"]))
    return timm.create_model(preset.arch, pretrained=False, **kwargs)


def _hf_classes(preset: EncoderPreset) -> tuple[Any, Any]:
    try:
        import transformers
    except ImportError as exc:
        raise EncoderError(
            f"{preset.name}: needs the transformers package (its published weights use transformers' layout); "
            "pip install 'wsi-mil[transformers]'"
        ) from exc
    model_cls = getattr(transformers, preset.arch)
    return model_cls, model_cls.config_class


def _build_hf(preset: EncoderPreset, kw: dict[str, Any]) -> tuple[Any, Any]:
    model_cls, config_cls = _hf_classes(preset)
    config = config_cls(**{**preset.kwargs, **kw})
    return model_cls, config


def _load_hf_file(preset: EncoderPreset, model_cls: Any, config: Any, path: str) -> tuple[nn.Module, Path]:
    """``from_pretrained`` on a folder with the preset's config and the file; strict. Returns the file too."""
    import os
    import tempfile

    p = Path(path)
    if p.is_dir() and (p / preset.weights_file).is_file():  # a downloaded model folder
        p = p / preset.weights_file
    if not p.is_file():
        raise EncoderError(f"{preset.name}: weights file {p} does not exist (or --weights random)")
    name = "model.safetensors" if p.suffix == ".safetensors" else "pytorch_model.bin"
    with tempfile.TemporaryDirectory(prefix="wsi-mil-hf-") as tmp:
        config.save_pretrained(tmp)
        os.symlink(p.resolve(), Path(tmp) / name)
        try:
            model, info = model_cls.from_pretrained(tmp, local_files_only=True, output_loading_info=True)
        except Exception as exc:  # safetensors, pickle and shape errors come in many types
            text = " ".join(str(exc).split())[:300]
            raise EncoderError(f"{preset.name}: cannot load weights file {p} ({type(exc).__name__}: {text})") from exc
    for what, keys in (
        ("lacks", info.get("missing_keys")),
        ("has keys the model lacks:", info.get("unexpected_keys")),
        ("has misshapen", info.get("mismatched_keys")),
    ):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in (keys or ()))
        if keys:
            raise EncoderError(
                f"{preset.name}: weights file {p} {what} {len(keys)} parameter(s), e.g. {', '.join(keys[:3])} "
                f"— not {preset.hub_repo}'s published layout ({preset.arch})"
            )
    return model.float(), p  # fp32 as the timm presets, whatever dtype the file holds


def build_preset(preset: EncoderPreset, name: str, weights: str | None = None, **kw: Any) -> Encoder:
    """Build ``preset`` with its published, random (seeded) or local-file weights.

    Parameters
    ----------
    preset : EncoderPreset
        The preset (:data:`wsi_mil.features.presets.PRESETS`).
    name : str
        Registry name (recorded in bags).
    weights : str, optional
        None (the hub, or its cache), ``"random"`` or a local file in the published layout.
    **kw
        Override the card's architecture arguments (timm kwargs or transformers config).

    Examples
    --------
    >>> import torch
    >>> with torch.device("meta"):  # doctest: +SKIP
    ...     enc = build_preset(PRESETS["uni"], "uni", "random")
    >>> enc.dim  # doctest: +SKIP
    1024
    """
    path = hub_download(name, preset.hub_repo, preset.weights_file) if weights is None else weights
    TokenPool, _, HFPooled = _modules()
    wid = f"random:seed{RANDOM_SEED}" if weights == "random" else ""
    if preset.family == "transformers":
        model_cls, config = _build_hf(preset, kw)
        if weights == "random":
            model = _seeded(lambda: model_cls(config))
        else:
            model, file = _load_hf_file(preset, model_cls, config, path)
            wid = weights_file_id(file) if weights else _pretrained_id(preset, path)
        module: nn.Module = HFPooled(model)
    else:
        module = _seeded(lambda: _build_timm(preset, kw))
        if weights != "random":
            wid = load_weights(module, path, name, identify=weights is not None) or _pretrained_id(preset, path)
        if preset.pooling == "cls+mean":
            module = TokenPool(module)
    return Encoder(name, module, preset.dim, preset.preprocess, wid)


def _register_all() -> None:
    for preset in PRESETS.values():
        register_encoder(preset.name, functools.partial(build_preset, preset))


_register_all()
