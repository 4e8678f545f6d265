"""Named encoder presets: the pathology foundation models labs run, as their cards define them.

Pure data (no torch, no timm at import), so ``wsi-mil encoders`` is instant. Each preset
carries the hub repository, whether it is gated, a licence note, the architecture (a timm
model name and the keyword arguments of its card, or a transformers DINOv2 config), the
preprocessing (input size, mean/std, native mpp), the token pooling and the output width.
:mod:`wsi_mil.features.presets_build` turns them into :class:`~.registry.Encoder` objects.
Where a value could not be checked against a card it says so in ``unverified``
(docs/encoders.md lists the sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from wsi_mil.features.registry import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = ["PRESETS", "EncoderPreset", "get_preset", "preset_rows"]

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)

#: Token poolings: ``cls`` (the class token after the final norm, timm's ``global_pool="token"``,
#: transformers' ``pooler_output``), ``cls+mean`` (class token ⊕ mean of the patch tokens,
#: register tokens excluded: Virchow's 2560-d embedding), ``attn`` (CONCH's attentional
#: pooler and its LayerNorm over all tokens).
POOLINGS = ("cls", "cls+mean", "attn")
#: Architecture families: the state-dict key layout a ``--weights`` file must have.
FAMILIES = ("timm", "transformers", "conch")


def _frozen(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kw))


@dataclass(frozen=True)
class EncoderPreset:
    """One published encoder: architecture, preprocessing, pooling, width and provenance.

    Parameters
    ----------
    name : str
        Registry name (``uni``, ``virchow2`` …).
    hub_repo : str
        Hugging Face repository of the published weights.
    weights_file : str
        File of ``hub_repo`` holding the state dict (``pytorch_model.bin``, ``model.safetensors``).
    family : str
        ``timm`` (timm's key layout), ``transformers`` (Hugging Face transformers' layout) or
        ``conch`` (a timm ViT under ``trunk.`` plus CONCH's attentional pooler).
    arch : str
        timm model name, or the transformers model class (``Dinov2Model``,
        ``Dinov2WithRegistersModel``).
    kwargs : mapping
        timm ``create_model`` keyword arguments, or the transformers config fields. The
        strings ``"SwiGLUPacked"`` and ``"SiLU"`` stand for timm's and torch's layers.
    dim : int
        Output width after pooling.
    preprocess : Preprocess
        Input size, mean/std and native µm/px.
    pooling : str
        One of :data:`POOLINGS`.
    gated : bool
        The hub asks for accepted conditions (and a token) before downloading.
    licence : str
        Licence note from the card.
    params : str
        Approximate parameter count, for the table.
    source : str
        Where the values were checked.
    unverified : str
        Values that could not be checked against a card (empty when none).
    """

    name: str
    hub_repo: str
    weights_file: str
    family: str
    arch: str
    kwargs: Mapping[str, Any]
    dim: int
    preprocess: Preprocess
    pooling: str
    gated: bool
    licence: str
    params: str
    source: str
    unverified: str = ""
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _p(size: int, mean: tuple[float, float, float], std: tuple[float, float, float], mpp: float | None) -> Preprocess:
    return Preprocess(input_size=size, mean=mean, std=std, native_mpp=mpp)


_IMNET224 = _p(224, IMAGENET_MEAN, IMAGENET_STD, 0.5)
_VIRCHOW_KW = dict(
    img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
    dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="SiLU",
)  # fmt: skip
_H_OPTIMUS_KW = dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=True)
_TRIDENT = "TRIDENT (mahmoodlab/TRIDENT, patch_encoder_models/load.py)"

PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        EncoderPreset(
            "uni",
            "MahmoodLab/UNI",
            "pytorch_model.bin",
            "timm",
            "vit_large_patch16_224",
            _frozen(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            1024,
            _IMNET224,
            "cls",
            True,
            "CC-BY-NC-ND-4.0 (academic, non-commercial)",
            "0.3B",
            f"{_TRIDENT}; UNI card (timm kwargs, ImageNet mean/std, 20x)",
        ),
        EncoderPreset(
            "uni2-h",
            "MahmoodLab/UNI2-h",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_224",
            _frozen(
                img_size=224,
                patch_size=14,
                depth=24,
                num_heads=24,
                init_values=1e-5,
                embed_dim=1536,
                mlp_ratio=2.66667 * 2,
                num_classes=0,
                no_embed_class=True,
                mlp_layer="SwiGLUPacked",
                act_layer="SiLU",
                reg_tokens=8,
                dynamic_img_size=True,
            ),
            1536,
            _IMNET224,
            "cls",
            True,
            "CC-BY-NC-ND-4.0 (academic, non-commercial)",
            "0.7B",
            f"{_TRIDENT}; UNI2-h card (timm kwargs)",
        ),
        EncoderPreset(
            "virchow",
            "paige-ai/Virchow",
            "pytorch_model.bin",
            "timm",
            "vit_huge_patch14_224",
            _frozen(**_VIRCHOW_KW),
            2560,
            _IMNET224,
            "cls+mean",
            True,
            "Apache-2.0",
            "0.6B",
            f"{_TRIDENT} (timm kwargs; class token ⊕ mean of tokens 1:)",
        ),
        EncoderPreset(
            "virchow2",
            "paige-ai/Virchow2",
            "pytorch_model.bin",
            "timm",
            "vit_huge_patch14_224",
            _frozen(**_VIRCHOW_KW, reg_tokens=4),
            2560,
            _IMNET224,
            "cls+mean",
            True,
            "CC-BY-NC-ND-4.0 (non-commercial)",
            "0.6B",
            f"{_TRIDENT} (timm kwargs; class token ⊕ mean of tokens 5:, registers excluded)",
            unverified="native mpp: trained on several magnifications; 0.5 µm/px recorded",
        ),
        EncoderPreset(
            "virchow2-cls",
            "paige-ai/Virchow2",
            "pytorch_model.bin",
            "timm",
            "vit_huge_patch14_224",
            _frozen(**{**_VIRCHOW_KW, "global_pool": "token"}, reg_tokens=4),
            1280,
            _IMNET224,
            "cls",
            True,
            "CC-BY-NC-ND-4.0 (non-commercial)",
            "0.6B",
            f"{_TRIDENT} (virchow2-cls: Virchow2's class token only, as PRISM2 consumes it)",
            unverified="native mpp (as virchow2)",
        ),
        EncoderPreset(
            "h-optimus-0",
            "bioptimus/H-optimus-0",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_reg4_dinov2",
            _frozen(**_H_OPTIMUS_KW),
            1536,
            _p(224, H_OPTIMUS_MEAN, H_OPTIMUS_STD, 0.5),
            "cls",
            True,
            "Apache-2.0",
            "1.1B",
            f"{_TRIDENT} (timm kwargs, mean/std)",
        ),
        EncoderPreset(
            "h-optimus-1",
            "bioptimus/H-optimus-1",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_reg4_dinov2",
            _frozen(**_H_OPTIMUS_KW),
            1536,
            _p(224, H_OPTIMUS_MEAN, H_OPTIMUS_STD, 0.5),
            "cls",
            True,
            "see the card (terms differ from H-optimus-0)",
            "1.1B",
            f"{_TRIDENT} (timm kwargs, mean/std)",
            unverified="licence",
        ),
        EncoderPreset(
            "prov-gigapath",
            "prov-gigapath/prov-gigapath",
            "pytorch_model.bin",
            "timm",
            "vit_giant_patch14_dinov2",
            _frozen(
                img_size=224,
                in_chans=3,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                mlp_ratio=5.33334,
                num_classes=0,
                dynamic_img_size=True,
            ),
            1536,
            _IMNET224,
            "cls",
            True,
            "Apache-2.0 (gated; research-use conditions)",
            "1.1B",
            f"{_TRIDENT} (tile encoder timm kwargs; ViT-g with 16 px patches)",
            unverified="licence conditions",
        ),
        EncoderPreset(
            "conch-v1.5",
            "MahmoodLab/conchv1_5",
            "pytorch_model_vision.bin",
            "conch",
            "vit_large_patch16_224",
            _frozen(img_size=224, patch_size=16, init_values=1.0, num_classes=0, dynamic_img_size=True),
            768,
            _p(448, IMAGENET_MEAN, IMAGENET_STD, 0.5),
            "attn",
            True,
            "CC-BY-NC-ND-4.0 (academic, non-commercial)",
            "0.3B",
            f"{_TRIDENT} (model_zoo/conchv1_5: ViT-L/16 trunk, attentional pooler 1024→768, LayerNorm; 448 px)",
            extra=_frozen(pool_dim=768, pool_heads=8),
        ),
        EncoderPreset(
            "phikon-v2",
            "owkin/phikon-v2",
            "model.safetensors",
            "transformers",
            "Dinov2Model",
            _frozen(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                patch_size=16,
                image_size=224,
                mlp_ratio=4,
                layerscale_value=1e-5,
                layer_norm_eps=1e-6,
                qkv_bias=True,
            ),
            1024,
            _IMNET224,
            "cls",
            False,
            "Owkin non-commercial licence",
            "0.3B",
            f"{_TRIDENT} (AutoModel, CLS of last_hidden_state); card: ViT-L/16 via DINOv2, 1.21 GB safetensors",
            unverified="config.json fields (image_size 224, layerscale) not read; shapes follow ViT-L/16 at 224",
        ),
        EncoderPreset(
            "hibou-l",
            "histai/hibou-L",
            "model.safetensors",
            "transformers",
            "Dinov2WithRegistersModel",
            _frozen(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                patch_size=14,
                image_size=224,
                num_register_tokens=4,
                mlp_ratio=4,
                layer_norm_eps=1e-6,
                qkv_bias=True,
            ),
            1024,
            _p(224, HIBOU_MEAN, HIBOU_STD, 0.5),
            "cls",
            True,
            "Apache-2.0",
            "0.3B",
            f"{_TRIDENT} (pooler_output, Hibou mean/std); card: DINOv2 with registers, 304M params",
            unverified=(
                "key layout: the card's own trust_remote_code model was not readable here; transformers' "
                "DINOv2-with-registers layout is assumed; native mpp"
            ),
        ),
        EncoderPreset(
            "hibou-b",
            "histai/hibou-b",
            "model.safetensors",
            "transformers",
            "Dinov2WithRegistersModel",
            _frozen(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                patch_size=14,
                image_size=224,
                num_register_tokens=4,
                mlp_ratio=4,
                layer_norm_eps=1e-6,
                qkv_bias=True,
            ),
            768,
            _p(224, HIBOU_MEAN, HIBOU_STD, 0.5),
            "cls",
            False,
            "Apache-2.0",
            "86M",
            "Hibou-B card (Apache-2.0, DINOv2 with registers, 85.7M params); Hibou mean/std as hibou-l",
            unverified="key layout (as hibou-l); native mpp",
        ),
        EncoderPreset(
            "kaiko-vitl14",
            "1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
            "model.safetensors",
            "timm",
            "vit_large_patch14_reg4_dinov2",
            _frozen(img_size=518, num_classes=0, dynamic_img_size=True),
            1024,
            _p(224, KAIKO_MEAN, KAIKO_STD, None),
            "cls",
            False,
            "see kaiko-ai/towards_large_pathology_fms",
            "0.3B",
            f"{_TRIDENT} (timm port by 1aurent, built at 518, fed 224, mean/std 0.5)",
            unverified="licence; native mpp (trained over several magnifications)",
        ),
    )
}


def get_preset(name: str) -> EncoderPreset | None:
    """The preset called ``name``, or None."""
    return PRESETS.get(name)


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset for ``wsi-mil encoders`` (JSON-ready values).

    Examples
    --------
    >>> rows = preset_rows()
    >>> next(r for r in rows if r["name"] == "uni")["dim"]
    1024
    """
    return [
        {
            "name": p.name,
            "dim": p.dim,
            "input_size": p.preprocess.input_size,
            "native_mpp": p.preprocess.native_mpp,
            "mean": list(p.preprocess.mean),
            "std": list(p.preprocess.std),
            "pooling": p.pooling,
            "family": p.family,
            "params": p.params,
            "hub_repo": p.hub_repo,
            "gated": p.gated,
            "licence": p.licence,
            "unverified": p.unverified,
        }
        for p in PRESETS.values()
    ]
