"""Annotations → patch truth: the same truth from GeoJSON, ASAP XML and a mask; exclusions; classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from tests.evaluate.conftest import MPP, grid
from wsi_mil.evaluate.annotations import Annotation, AnnotationError, index_annotations, read_annotation, read_mask
from wsi_mil.evaluate.export import write_asap_xml, write_geojson_annotation, write_synthetic_annotations
from wsi_mil.evaluate.truth import lesion_map, patch_fractions, patch_labels
from wsi_mil.synthetic import SyntheticTruth


def _read(path: Path | None, dims: tuple[int, int], classes: tuple[str, ...] = ()) -> Annotation:
    return read_annotation(path, path.stem if path else "none", MPP, dims, classes)


def test_generator_masks_as_geojson_xml_and_png_give_the_generators_truth(
    tumour_slide: tuple[Path, SyntheticTruth], tmp_path: Path
) -> None:
    slide, truth = tumour_slide
    dims = (truth.tumour.shape[1] * truth.downsample, truth.tumour.shape[0] * truth.downsample)
    (gj,) = write_synthetic_annotations([slide], tmp_path / "gj")
    (xml,) = write_synthetic_annotations([slide], tmp_path / "xml", "xml")
    png = tmp_path / "png" / f"{slide.stem}.png"
    png.parent.mkdir()
    from PIL import Image

    Image.fromarray(truth.tumour.astype(np.uint8) * 255).save(png)
    png.with_suffix(".json").write_text(json.dumps({"mpp": MPP * truth.downsample}))

    for size in (256, 200):  # on the truth grid, and across its cells (x, y multiples of 200)
        coords = grid(*dims, size)
        expected = np.array([truth.fraction_in(int(x), int(y), size, "tumour") for x, y in coords])
        got = {p.suffix: patch_fractions(_read(p, dims), coords, size) for p in (gj, xml, png)}
        np.testing.assert_allclose(got[".geojson"], got[".xml"], atol=1e-9)
        np.testing.assert_allclose(got[".geojson"], got[".png"], atol=1e-9)
        labels = patch_labels(got[".xml"])
        assert (labels == 1).sum() > 20 and (labels == 0).sum() > 100 and (labels == -1).any()
        if size == 256:  # fraction_in is exact on whole truth cells
            np.testing.assert_allclose(got[".geojson"], expected, atol=1e-9)
            np.testing.assert_array_equal(labels, np.where(expected >= 0.5, 1, np.where(expected == 0, 0, -1)))


def test_patch_truth_rule_half_inside_positive_untouched_negative_else_ignored(tmp_path: Path) -> None:
    # A lesion covering x in [0, 300) of a 400-wide row of 100-px patches, and 30 % of the fourth.
    path = tmp_path / "s.geojson"
    write_geojson_annotation(path, box(0, 0, 330, 100))
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0], [400, 0], [250, 0]])
    f = patch_fractions(_read(path, (1000, 100)), coords, 100)
    np.testing.assert_allclose(f, [1, 1, 1, 0.3, 0, 0.8])
    assert patch_labels(f).tolist() == [1, 1, 1, -1, 0, 1]


def test_camelyon16_exclusion_group_cuts_the_tumour_and_equals_a_geojson_hole(tmp_path: Path) -> None:
    dims = (4000, 4000)
    outer, inner = box(0, 0, 2000, 2000), box(500, 500, 1500, 1500)
    xml = tmp_path / "x" / "s.xml"
    xml.parent.mkdir()
    write_asap_xml(xml, outer, group="_0", exclusions=[inner])  # tumour _0, exclusion _2
    gj = tmp_path / "g" / "s.geojson"
    write_geojson_annotation(gj, Polygon(outer.exterior.coords, [inner.exterior.coords]))
    coords = grid(*dims, 250)
    fx = patch_fractions(_read(xml, dims), coords, 250)
    np.testing.assert_allclose(fx, patch_fractions(_read(gj, dims), coords, 250), atol=1e-9)
    in_hole = (coords[:, 0] >= 500) & (coords[:, 0] < 1500) & (coords[:, 1] >= 500) & (coords[:, 1] < 1500)
    in_ring = (coords[:, 0] < 2000) & (coords[:, 1] < 2000) & ~in_hole
    assert (fx[in_hole] == 0).all() and (fx[in_ring] == 1).all() and (fx[~in_ring & ~in_hole] == 0).all()
    # The lesion is the grown outline with its hole filled (CAMELYON16): one lesion, no ITC.
    lm = lesion_map(_read(xml, dims), MPP)
    assert lm.lesions == [1] and lm.lookup(np.array([[1000.0, 1000.0], [3500.0, 3500.0]])).tolist() == [1, 0]


def test_classes_choose_the_positive_annotations(tmp_path: Path) -> None:
    path = tmp_path / "s.geojson"
    feats = []
    for name, geom in (("Tumor", box(0, 0, 100, 100)), ("Stroma", box(200, 0, 300, 100))):
        feats.append({"type": "Feature", "geometry": json.loads(json.dumps(geom.__geo_interface__)),
                      "properties": {"objectType": "annotation", "classification": {"name": name}}})  # fmt: skip
    cell = {"objectType": "detection", "classification": {"name": "Tumor"}}  # a cell, not an annotation: skipped
    feats.append({"type": "Feature", "geometry": box(400, 0, 500, 100).__geo_interface__, "properties": cell})
    path.write_text(json.dumps(feats))  # QuPath's "list of features" export
    coords = np.array([[0, 0], [200, 0], [400, 0]])
    every = _read(path, (600, 100))
    assert every.classes == ("Stroma", "Tumor")
    assert patch_fractions(every, coords, 100).tolist() == [1, 1, 0]
    assert patch_fractions(_read(path, (600, 100), classes=("Tumor",)), coords, 100).tolist() == [1, 0, 0]


def test_no_file_is_negative_and_two_files_for_one_slide_are_refused(tmp_path: Path) -> None:
    assert _read(None, (100, 100)).is_empty
    (tmp_path / "a.geojson").write_text("[]")
    (tmp_path / "a.json").write_text('{"mpp": 1}')  # a sidecar, not an annotation
    assert list(index_annotations(tmp_path)) == ["a"]
    (tmp_path / "a.xml").write_text("<ASAP_Annotations/>")
    with pytest.raises(AnnotationError, match="a second annotation file for slide 'a'"):
        index_annotations(tmp_path)


BAD = {
    "truncated.xml": '<ASAP_Annotations><Annotations><Annotation PartOfGroup="_0"><Coordinates>',
    "wrongroot.xml": "<Annotations/>",
    "nonnumeric.xml": '<ASAP_Annotations><Annotations><Annotation Name="A" PartOfGroup="_0"><Coordinates>'
    '<Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="ten" Y="1"/></Coordinates></Annotation>'
    "</Annotations></ASAP_Annotations>",
    "notjson.geojson": '{"type": "FeatureCollection", "features": [',
    "badgeometry.geojson": '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},'
    ' "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]}',
    "notfeatures.geojson": '{"type": "FeatureCollection", "features": 3}',
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_file_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(BAD[name])
    with pytest.raises(AnnotationError) as info:
        _read(path, (100, 100))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_pyramidal_tiff_mask_is_read_at_a_level_fine_enough(tmp_path: Path) -> None:
    import tifffile

    m = np.zeros((64, 96), np.uint8)  # 32 level-0 px per mask pixel at full resolution
    m[8:24, 16:48] = 255
    path = tmp_path / "s.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(m, subifds=1)
        tw.write(m[::2, ::2], subfiletype=1)
    dims = (96 * 32, 64 * 32)
    coarse = read_annotation(path, "s", MPP, dims, mask_mpp=16.0)  # 16 µm/px = 32 level-0 px
    assert coarse.mask is not None and coarse.mask.shape == (64, 96) and coarse.downsample == 32
    box_ = np.array([[16 * 32, 8 * 32], [0, 0]])
    np.testing.assert_allclose(patch_fractions(coarse, box_, 16 * 32), [1, 0])
    half = read_mask(path, MPP, dims, mask_mpp=16.0, fine=64)
    assert half.mask is not None and half.mask.shape == (32, 48) and half.downsample == 64
    np.testing.assert_allclose(patch_fractions(half, box_, 16 * 32), [1, 0])
