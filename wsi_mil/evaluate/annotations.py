"""Per-slide annotations: QuPath GeoJSON, ASAP / CAMELYON16 XML, mask images.

An annotation folder holds at most one file per slide, named by the slide id:
``<id>.geojson`` (QuPath), ``<id>.xml`` (ASAP), or ``<id>.png`` / ``<id>.tif`` (a mask, nonzero =
positive, its µm/px from ``--mask-mpp`` or a sidecar ``<id>.json`` holding ``{"mpp": …}``).
A slide without a file is negative. Vector annotations become one shapely geometry in level-0
pixels (the positive classes, minus the exclusions); masks stay rasters with their scale.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import WsiMilError

#: File suffixes by kind; the first match wins.
VECTOR_SUFFIXES = (".geojson", ".xml")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
#: ASAP groups whose polygons are cut out of the positive area (CAMELYON16's ``_2``).
EXCLUSION_GROUPS = frozenset({"_2", "exclusion"})


class AnnotationError(WsiMilError):
    """An annotation file cannot be read; the message names the file and the cause."""


@dataclass
class Annotation:
    """The positive area of one slide, as a geometry or as a mask.

    Attributes
    ----------
    slide_id : str
        The slide's id.
    path : Path or None
        The file it came from (None: the slide has none, so it is negative).
    geometry : shapely geometry or None
        Vector sources: the positive area in level-0 pixels (selected classes minus exclusions).
    mask : ndarray or None
        Mask sources: (h, w) bool, True = positive.
    downsample : float
        Level-0 pixels per mask pixel.
    classes : tuple of str
        Every class (GeoJSON) or group (XML) the file holds, chosen or not.
    """

    slide_id: str
    path: Path | None = None
    geometry: Any = None
    mask: np.ndarray | None = None
    downsample: float = 1.0
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_empty(self) -> bool:
        """True when nothing on the slide is positive."""
        if self.mask is not None:
            return not bool(self.mask.any())
        return self.geometry is None or self.geometry.is_empty


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def index_annotations(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Annotation files of a folder by slide id (sidecars ``<id>.json`` are not annotations).

    Raises
    ------
    AnnotationError
        The folder does not exist, or two files name the same slide.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: no such annotation folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if p.name.startswith(".") or not p.is_file() or suffix not in VECTOR_SUFFIXES + MASK_SUFFIXES:
            continue
        if p.stem in found:
            raise AnnotationError(
                f"{p}: a second annotation file for slide {p.stem!r} (also {found[p.stem].name}); keep one"
            )
        found[p.stem] = p
    return found


# --------------------------------------------------------------------------- geometry


def polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry, repaired where invalid (self-crossing outlines)."""
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.ops import unary_union
    from shapely.validation import make_valid

    if geom is None or geom.is_empty:
        return Polygon()
    if not geom.is_valid:
        geom = make_valid(geom)
    parts = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, (Polygon, MultiPolygon))]
    return unary_union(parts) if parts else Polygon()


def _union(geoms: Sequence[Any]) -> Any:
    from shapely import union_all
    from shapely.geometry import Polygon

    return polygonal(union_all(list(geoms))) if geoms else Polygon()


def mask_to_geometry(mask: np.ndarray, downsample: float = 1.0) -> Any:
    """The exact outline of a mask's True pixels (pixel edges), in level-0 pixels.

    Each row's runs become rectangles and shapely unions them, so the area of the geometry
    is the mask's pixel count × ``downsample``².

    Examples
    --------
    >>> m = np.zeros((4, 4), bool); m[1:3, 1:4] = True
    >>> mask_to_geometry(m, 10).area
    600.0
    """
    import shapely

    mask = np.asarray(mask, bool)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # run starts and ends alternate per row
    starts, ends, y = cols[0::2], cols[1::2], rows[0::2]
    boxes = shapely.box(starts * downsample, y * downsample, ends * downsample, (y + 1) * downsample)
    return _union(list(boxes))


# --------------------------------------------------------------------------- GeoJSON


def _feature_class(feature: Mapping[str, Any]) -> str | None:
    cls = (feature.get("properties") or {}).get("classification")
    if isinstance(cls, Mapping):
        name = cls.get("name")
        return str(name) if name is not None else None
    return str(cls) if isinstance(cls, str) else None


def read_geojson(path: str | os.PathLike[str], classes: Iterable[str] = ()) -> Annotation:
    """A QuPath GeoJSON export: a FeatureCollection, a list of features, or one feature.

    Parameters
    ----------
    path : path-like
        ``<slide_id>.geojson``, level-0 pixel coordinates.
    classes : iterable of str
        ``properties.classification.name`` values to keep; empty = every annotation.
        Objects of another ``objectType`` than ``annotation`` (cells, tiles) are skipped.
    """
    from shapely.geometry import shape

    path = Path(path)
    wanted = set(classes)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not a readable GeoJSON file ({_why(exc)})") from exc
    if isinstance(doc, Mapping) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, Mapping) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: not a GeoJSON FeatureCollection or list of features")
    kept, found = [], set()
    for i, feature in enumerate(features):
        try:
            if not isinstance(feature, Mapping) or feature.get("type") != "Feature":
                raise ValueError("not a Feature")
            if (feature.get("properties") or {}).get("objectType", "annotation") != "annotation":
                continue
            name = _feature_class(feature)
            if name is not None:
                found.add(name)
            geom = feature.get("geometry")
            if geom is None or (wanted and name not in wanted):
                continue
            kept.append(polygonal(shape(geom)))
        except Exception as exc:  # shapely raises many kinds on a malformed geometry
            raise AnnotationError(f"{path}: feature {i} is not a valid GeoJSON feature ({_why(exc)})") from exc
    return Annotation(path.stem, path, geometry=_union(kept), classes=tuple(sorted(found)))


# --------------------------------------------------------------------------- ASAP XML


def read_asap_xml(path: str | os.PathLike[str], classes: Iterable[str] = ()) -> Annotation:
    """An ASAP / CAMELYON16 XML file: ``<Annotation PartOfGroup=…><Coordinates><Coordinate X Y Order/>``.

    Parameters
    ----------
    path : path-like
        ``<slide_id>.xml``, level-0 pixel coordinates.
    classes : iterable of str
        Groups (``PartOfGroup``) to keep; empty = every group but the exclusions.
        Polygons of the exclusion groups (``_2`` in CAMELYON16, or ``Exclusion``) are cut
        out of the positive area; annotations of fewer than 3 points (dots) enclose nothing.
    """
    import xml.etree.ElementTree as ET

    from shapely.geometry import Polygon

    path = Path(path)
    wanted = set(classes)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise AnnotationError(f"{path}: not a readable XML file ({_why(exc)})") from exc
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, not <ASAP_Annotations>")
    positive, excluded, found = [], [], set()
    for i, ann in enumerate(root.iter("Annotation")):
        group = str(ann.get("PartOfGroup") or "None")
        found.add(group)
        is_exclusion = group.lower() in EXCLUSION_GROUPS
        if not is_exclusion and wanted and group not in wanted:
            continue
        try:
            pts = sorted(
                (float(c.get("Order", k)), float(c.attrib["X"]), float(c.attrib["Y"]))
                for k, c in enumerate(ann.iter("Coordinate"))
            )
        except (KeyError, ValueError) as exc:
            raise AnnotationError(
                f"{path}: annotation {i} ({ann.get('Name')!r}) has a coordinate without a numeric X/Y ({_why(exc)})"
            ) from exc
        if len(pts) < 3:
            continue
        ring = np.array([(x, y) for _, x, y in pts])
        if not np.isfinite(ring).all():
            raise AnnotationError(f"{path}: annotation {i} ({ann.get('Name')!r}) has a non-finite coordinate")
        (excluded if is_exclusion else positive).append(polygonal(Polygon(ring)))
    geom = _union(positive)
    if excluded and not geom.is_empty:
        geom = polygonal(geom.difference(_union(excluded)))
    return Annotation(path.stem, path, geometry=geom, classes=tuple(sorted(found)))


# --------------------------------------------------------------------------- masks


def _sidecar_mpp(path: Path) -> float | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        mpp = float(json.loads(side.read_text(encoding="utf-8"))["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnnotationError(f'{side}: not a mask sidecar {{"mpp": <µm per pixel>}} ({_why(exc)})') from exc
    if not (math.isfinite(mpp) and mpp > 0):
        raise AnnotationError(f"{side}: mpp must be a positive number, got {mpp}")
    return mpp


def _read_mask_pixels(path: Path, slide_width: int, fine: float) -> tuple[np.ndarray, int]:
    """(h, w) bool mask and the width of its full-resolution level (TIFF: a pyramid level)."""
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
        return (arr.reshape(arr.shape[0], arr.shape[1], -1) != 0).any(-1), arr.shape[1]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        full_w = int(levels[0].shape[levels[0].axes.index("X")])
        # The coarsest level still finer than ``fine`` level-0 pixels per mask pixel.
        pick = levels[0]
        for lvl in levels[1:]:
            if slide_width / lvl.shape[lvl.axes.index("X")] <= fine:
                pick = lvl
        arr = pick.asarray()
        axes = pick.axes
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X")], [0, 1])
    return (arr.reshape(arr.shape[0], arr.shape[1], -1) != 0).any(-1), full_w


def read_mask(
    path: str | os.PathLike[str],
    slide_mpp: float,
    slide_dimensions: tuple[int, int],
    mask_mpp: float | None = None,
    fine: float = 16.0,
) -> Annotation:
    """A mask image (nonzero = positive) and its scale.

    The mask's µm/px comes from ``mask_mpp``, else the sidecar ``<id>.json``, else from
    the slide's size when the mask has the slide's aspect ratio (within 2%).

    Parameters
    ----------
    path : path-like
        ``<slide_id>.png`` or ``<slide_id>.tif`` (a pyramidal TIFF is read at a level
        no coarser than ``fine`` level-0 pixels per mask pixel).
    slide_mpp : float
        µm/px of the slide's level 0.
    slide_dimensions : (int, int)
        The slide's level-0 (width, height).
    mask_mpp : float, optional
        µm/px of the mask's full-resolution level.
    """
    path = Path(path)
    mpp = mask_mpp if mask_mpp is not None else _sidecar_mpp(path)
    width, height = slide_dimensions
    try:
        mask, full_w = _read_mask_pixels(path, width, fine)
    except Exception as exc:  # PIL and tifffile raise many kinds on a damaged image
        raise AnnotationError(f"{path}: not a readable mask image ({_why(exc)})") from exc
    if mpp is None:
        sx, sy = width / mask.shape[1], height / mask.shape[0]
        if abs(sx - sy) > 0.02 * max(sx, sy):
            raise AnnotationError(
                f"{path}: mask {mask.shape[1]}×{mask.shape[0]} px does not have the slide's aspect "
                f"({width}×{height}); give --mask-mpp or a sidecar {path.with_suffix('.json').name}"
            )
        downsample = (sx + sy) / 2
    else:
        downsample = mpp / slide_mpp * full_w / mask.shape[1]
    return Annotation(path.stem, path, mask=mask, downsample=float(downsample))


def read_annotation(
    path: str | os.PathLike[str] | None,
    slide_id: str,
    slide_mpp: float,
    slide_dimensions: tuple[int, int],
    classes: Iterable[str] = (),
    mask_mpp: float | None = None,
) -> Annotation:
    """Read one slide's annotation by its suffix; ``None`` (no file) is an empty, negative one."""
    if path is None:
        return Annotation(slide_id)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".geojson":
        return read_geojson(path, classes)
    if suffix == ".xml":
        return read_asap_xml(path, classes)
    return read_mask(path, slide_mpp, slide_dimensions, mask_mpp)
