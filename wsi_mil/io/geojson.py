"""GeoJSON for QuPath: tissue polygons with holes, patch squares with measurements."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wsi_mil.io.atomic import write_text_atomic


def tissue_feature_collection(
    polygons: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
    simplify_tolerance: float = 0.0,
    name: str = "Tissue",
) -> dict[str, Any]:
    """A FeatureCollection of tissue annotations QuPath imports (level-0 pixel coords).

    Parameters
    ----------
    polygons : sequence of (exterior, holes)
        (n, 2) level-0 rings.
    simplify_tolerance : float
        Douglas–Peucker tolerance in level-0 pixels (0 keeps every vertex).
    name : str
        QuPath classification name.
    """
    from shapely.geometry import Polygon, mapping
    from shapely.ops import unary_union
    from shapely.validation import make_valid

    features = []
    for exterior, holes in polygons:
        if len(exterior) < 3:
            continue
        poly = Polygon(exterior, [h for h in holes if len(h) >= 3])
        if not poly.is_valid:
            # Self-touching contours: keep only the polygonal parts of the repair.
            fixed = make_valid(poly)
            parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
            poly = unary_union(parts) if parts else Polygon()
        if simplify_tolerance > 0:
            poly = poly.simplify(simplify_tolerance, preserve_topology=True)
        if poly.is_empty:
            continue
        features.append({
            "type": "Feature",
            "geometry": mapping(poly),
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 160, 0]}},
        })
    return {"type": "FeatureCollection", "features": features}


def patch_feature_collection(
    coords: np.ndarray, size: int, measurements: Mapping[str, np.ndarray], object_type: str = "tile"
) -> dict[str, Any]:
    """Patch squares (level-0) with one QuPath measurement per score column."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    names = list(measurements)
    cols = [np.asarray(measurements[n], dtype=np.float64) for n in names]
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": object_type,
                "measurements": {n: round(float(c[i]), 6) for n, c in zip(names, cols, strict=True)},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike[str], collection: Mapping[str, Any]) -> None:
    """Write a FeatureCollection atomically."""
    write_text_atomic(path, json.dumps(collection, separators=(",", ":")))
