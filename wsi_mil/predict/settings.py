"""Which of a model's tiling and extraction settings a predicting machine must keep.

``models/<run>/pipeline.yaml`` (read and written by :mod:`wsi_mil.io.run_folder`) records
how the training bags were made. ``wsi-mil predict`` tiles and extracts new slides with
exactly those settings and refuses a bag whose settings differ; the speed-only fields
below may differ.
"""

from __future__ import annotations

from typing import Any

# Extraction fields that change speed, not features: a predicting machine may differ.
# Precision is not among them: bf16 and fp32 bags differ.
RUNTIME_FIELDS = ("batch_size", "workers", "device", "backend", "compile", "pt")


# Tile settings that change what one patch's features are; the others (overlap, tissue
# threshold, segmentation) only change which patches a bag holds, e.g. the overlapping
# grid recommended for smoother heatmaps.
PATCH_TILE_FIELDS = ("patch_size", "target_mpp")


def patch_settings(bag_settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """What makes each patch's features: the patch size and mpp, encoder, weights, preprocessing, precision.

    Examples
    --------
    >>> patch_settings({"patches": {"tile": {"patch_size": 256, "overlap": 0.5}}, "extract": {"precision": "fp32"}})
    {'tile': {'patch_size': 256}, 'extract': {'precision': 'fp32'}}
    """
    if bag_settings is None:
        return None
    tile = ((bag_settings.get("patches") or {}).get("tile")) or {}
    return {
        "tile": {k: tile[k] for k in PATCH_TILE_FIELDS if k in tile},
        "extract": bag_settings.get("extract"),
    }
