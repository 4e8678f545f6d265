"""Stage 2: patch features into HDF5 bags (encoders, fast reading, streaming writes).

Importing this package loads no torch; the names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Encoder",
    "EncoderError",
    "ExtractConfig",
    "Preprocess",
    "create_encoder",
    "extract_cohort",
    "extract_slide",
    "list_encoders",
    "register_encoder",
]

_WHERE = {
    "Encoder": "registry",
    "EncoderError": "registry",
    "Preprocess": "registry",
    "create_encoder": "registry",
    "list_encoders": "registry",
    "register_encoder": "registry",
    "ExtractConfig": "extract",
    "extract_slide": "extract",
    "extract_cohort": "cohort",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"wsi_mil.features.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'wsi_mil.features' has no attribute {name!r}")
