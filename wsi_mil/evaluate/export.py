"""Write annotations: a geometry as QuPath GeoJSON or ASAP XML; a synthetic slide's truth as either.

For the demo and the tests (the generator's tumour masks become the annotation folder a
pathologist would hand over), and for anyone converting between the two formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.io.atomic import write_text_atomic


def _polygons(geometry: Any) -> list[Any]:
    return [p for p in getattr(geometry, "geoms", [geometry]) if not p.is_empty]


def write_geojson_annotation(path: str | os.PathLike[str], geometry: Any, name: str = "Tumor") -> None:
    """A QuPath-importable FeatureCollection: one annotation per polygon, classified ``name``."""
    from shapely.geometry import mapping

    features = [
        {
            "type": "Feature",
            "geometry": mapping(p),
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}},
        }
        for p in _polygons(geometry)
    ]
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}))


def write_asap_xml(
    path: str | os.PathLike[str], geometry: Any, group: str = "_0", exclusions: Iterable[Any] = ()
) -> None:
    """An ASAP / CAMELYON16 XML file: each polygon's outline in ``group``, each hole (and each
    geometry of ``exclusions``) as a polygon of the exclusion group ``_2``."""
    import xml.etree.ElementTree as ET

    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    rings: list[tuple[np.ndarray, str]] = []
    for p in _polygons(geometry):
        rings.append((np.asarray(p.exterior.coords)[:-1], group))
        rings.extend((np.asarray(r.coords)[:-1], "_2") for r in p.interiors)
    for ex in exclusions:
        rings.extend((np.asarray(p.exterior.coords)[:-1], "_2") for p in _polygons(ex))
    for i, (ring, grp) in enumerate(rings):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon", PartOfGroup=grp,
                          Color="#F4FA58")  # fmt: skip
        coords = ET.SubElement(a, "Coordinates")
        for k, (x, y) in enumerate(ring.tolist()):
            ET.SubElement(coords, "Coordinate", Order=str(k), X=repr(float(x)), Y=repr(float(y)))
    groups = ET.SubElement(root, "AnnotationGroups")
    for grp in sorted({g for _, g in rings} | {group}):
        g = ET.SubElement(groups, "Group", Name=grp, PartOfGroup="None", Color="#64FE2E")
        ET.SubElement(g, "Attributes")
    write_text_atomic(path, ET.tostring(root, encoding="unicode"))


def write_synthetic_annotations(
    slides: Iterable[str | os.PathLike[str]], folder: str | os.PathLike[str], fmt: str = "geojson"
) -> list[Path]:
    """The generator's tumour masks of synthetic slides as an annotation folder.

    Slides without tumour get no file (negative). Outlines follow the truth grid's pixel
    edges exactly (:func:`~wsi_mil.evaluate.annotations.mask_to_geometry`).

    Parameters
    ----------
    slides : iterable of path-like
        Synthetic slides (their ``<stem>.truth.npz`` is read).
    folder : path-like
        Where ``<slide_id>.geojson`` (``fmt="geojson"``) or ``<slide_id>.xml`` (``"xml"``) go.

    Examples
    --------
    >>> write_synthetic_annotations(sorted(Path("demo_out/slides").glob("*.tif")), "ann")  # doctest: +SKIP
    """
    from wsi_mil.evaluate.annotations import mask_to_geometry
    from wsi_mil.synthetic.slides import load_truth

    if fmt not in ("geojson", "xml"):
        raise ValueError(f"fmt must be 'geojson' or 'xml', got {fmt!r}")
    written = []
    for slide in slides:
        truth = load_truth(slide)
        if not truth.tumour.any():
            continue
        geom = mask_to_geometry(truth.tumour, truth.downsample)
        path = Path(folder) / f"{Path(slide).stem}.{fmt}"
        (write_geojson_annotation if fmt == "geojson" else write_asap_xml)(path, geom)
        written.append(path)
    return written
