"""Stage 2: patch features into HDF5 bags (encoders, fast reading, streaming writes).

Importing this package loads no torch; the names below are resolved on first use.
"""

from __future__ import annotations

from wsi_mil._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _WHERE)
