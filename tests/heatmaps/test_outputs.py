"""The files of write_heatmaps: extent, pixel positions, GeoJSON, HDF5, Zarr, gallery."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from tests.heatmaps.conftest import CLASSES, Rendered
from wsi_mil.heatmaps import HeatmapOptions, render_heatmaps, write_heatmaps
from wsi_mil.heatmaps.png import GAP, gallery_indices
from wsi_mil.heatmaps.scores import colour_lut
from wsi_mil.io import h5
from wsi_mil.slide import open_slide

W, H, MPP = 8192, 6144, 0.5  # tumour_slide


def _mpp_from_tags(page: tifffile.TiffPage) -> tuple[float, float]:
    """µm/px from a page's resolution tags (pixels per centimetre)."""
    assert page.tags["ResolutionUnit"].value == 3  # centimetre
    xr, yr = page.tags["XResolution"].value, page.tags["YResolution"].value
    return 1e4 * xr[1] / xr[0], 1e4 * yr[1] / yr[0]


def _lut_rgb(value: float) -> np.ndarray:
    return colour_lut("jet")[round(value * 255), :3]


def test_tiff_physical_extent_equals_slide(rendered: Rendered) -> None:
    with tifffile.TiffFile(rendered.paths["tiff"]) as tif:
        assert len(tif.pages) >= 2
        for page in tif.pages:
            mx, my = _mpp_from_tags(page)
            h, w = page.shape[:2]
            assert w * mx == pytest.approx(W * MPP, rel=1e-6)
            assert h * my == pytest.approx(H * MPP, rel=1e-6)
            assert page.is_tiled and page.shape[2] == 4


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiff_opens_as_slide_with_matching_size(rendered: Rendered, backend: str) -> None:
    with open_slide(rendered.paths["tiff"], backend=backend) as s:
        w, h = s.dimensions
        assert w * s.mpp.x == pytest.approx(W * MPP, rel=1e-6)
        assert h * s.mpp.y == pytest.approx(H * MPP, rel=1e-6)
        assert s.level_count >= 2


def test_patch_value_lands_at_its_coords_in_tiff(rendered: Rendered) -> None:
    base = tifffile.imread(rendered.paths["tiff"], key=0)  # (h, w, 4)
    sx, sy = W / base.shape[1], H / base.shape[0]
    half = rendered.size / 2
    for i in np.random.default_rng(1).choice(len(rendered.coords), 60, replace=False):
        x, y = rendered.coords[i]
        for fx, fy in ((0.5, 0.5), (0.1, 0.1), (0.9, 0.9)):  # centre and near corners
            px = base[int((y + 2 * half * fy) / sy), int((x + 2 * half * fx) / sx)]
            assert px[3] == 255
            np.testing.assert_array_equal(px[:3], _lut_rgb(rendered.probs[i, 1]))
    assert base[0, 0, 3] == 0  # the slide's corner is glass: no patch, transparent


def test_patch_value_lands_at_its_coords_in_png(rendered: Rendered) -> None:
    png = cv2.imread(str(rendered.paths["png"]))[..., ::-1]
    scale = W / png.shape[1]  # level-0 pixels per PNG pixel (a colour bar is added below)
    assert png.shape[0] > round(H / scale)
    for i in np.random.default_rng(2).choice(len(rendered.coords), 60, replace=False):
        x, y = rendered.coords[i] + rendered.size / 2
        np.testing.assert_array_equal(
            png[int(y / scale), int(x / scale)], _lut_rgb(rendered.probs[i, 1])
        )


def test_geojson_squares_match_coords(rendered: Rendered) -> None:
    gj = json.loads(rendered.paths["geojson"].read_text())
    feats = gj["features"]
    assert gj["type"] == "FeatureCollection" and len(feats) == len(rendered.coords)
    s = rendered.size
    for i in (0, len(feats) // 2, len(feats) - 1):
        x, y = rendered.coords[i].tolist()
        ring = feats[i]["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        m = feats[i]["properties"]["measurements"]
        assert m["prob_tumour"] == pytest.approx(rendered.probs[i, 1], abs=1e-6)
        assert m["attention"] == pytest.approx(rendered.attention[i], rel=1e-4)
        assert set(m) >= {"attention", "attention_norm", "prob_normal", "prob_tumour"}


def test_h5_round_trip(rendered: Rendered) -> None:
    data = h5.read_heatmap_data(rendered.paths["h5"])
    np.testing.assert_array_equal(data.coords, rendered.coords)
    np.testing.assert_allclose(data.attention, rendered.attention, rtol=1e-6)
    np.testing.assert_allclose(data.instance_probs, rendered.probs, atol=1e-7)
    assert data.class_names == CLASSES
    assert data.attention_norm.min() == 0.0 and data.attention_norm.max() == 1.0
    assert data.patch_size_level0 == rendered.size
    assert data.attrs[h5.ATTR_SLIDE_DIMENSIONS] == [W, H]
    assert data.attrs[h5.ATTR_MPP] == pytest.approx(MPP)


def test_zarr_multiscales_valid_and_consistent(rendered: Rendered) -> None:
    import zarr

    group = zarr.open_group(str(rendered.paths["zarr"]), mode="r")
    ms = group.attrs["multiscales"]
    assert len(ms) == 1 and ms[0]["version"] == "0.4"
    assert [a["name"] for a in ms[0]["axes"]] == ["c", "y", "x"]
    assert [a["type"] for a in ms[0]["axes"]] == ["channel", "space", "space"]
    shapes = []
    for ds in ms[0]["datasets"]:
        arr = group[ds["path"]]
        (scale,) = (t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
        c, h, w = arr.shape
        assert c == 4 and arr.dtype == np.uint8
        assert w * scale[2] == pytest.approx(W * MPP, rel=1e-6)
        assert h * scale[1] == pytest.approx(H * MPP, rel=1e-6)
        shapes.append((h, w))
    for (h0, w0), (h1, w1) in itertools.pairwise(shapes):
        assert (h1, w1) == (-(-h0 // 2), -(-w0 // 2))
    with tifffile.TiffFile(rendered.paths["tiff"]) as tif:  # the same pyramid as the TIFF
        assert [p.shape[:2] for p in tif.pages] == shapes
        np.testing.assert_array_equal(group["0"][:].transpose(1, 2, 0), tif.pages[0].asarray())
    assert (Path(rendered.paths["zarr"]) / ".zattrs").exists()


def test_gallery_has_2k_tiles(rendered: Rendered) -> None:
    k, px = rendered.options.gallery_k, rendered.options.gallery_px
    img = cv2.imread(str(rendered.paths["gallery"]))
    cell = px + 2 * GAP
    assert img.shape[1] == k * cell and img.shape[0] == 2 * (cell + 14)
    top, bottom = gallery_indices(rendered.probs[:, 1], k)
    assert len(top) == len(bottom) == k
    assert rendered.probs[top, 1].min() >= rendered.probs[bottom, 1].max()


def test_rerender_from_stored_data_with_tissue_clip_and_smoothing(rendered: Rendered) -> None:
    from wsi_mil.heatmaps.clip import rasterise_polygons, read_tissue_polygons

    data = h5.read_heatmap_data(rendered.paths["h5"])
    opts = HeatmapOptions(
        score="attention",
        smooth_um=200.0,
        clip="tissue",
        gallery_k=0,
        normalise="percentile",
        interpolation="linear",
        backend="tiffslide",
    )
    paths = render_heatmaps(rendered.out, "run2", data, rendered.slide, opts)
    assert set(paths) == {"png", "tiff", "geojson"}
    base = tifffile.imread(paths["tiff"], key=0)
    mask = rasterise_polygons(
        read_tissue_polygons(rendered.out / "masks" / "tumour_a.geojson"), W, H
    )
    centres = (rendered.coords + rendered.size // 2) // 2  # mask unit: 2 level-0 px
    assert mask.mask[centres[:, 1], centres[:, 0]].mean() > 0.8  # every tissue piece is read
    tissue = mask.sample(0, 0, W / base.shape[1], H / base.shape[0], base.shape[1], base.shape[0])
    assert not base[..., 3][~tissue].any()  # nothing drawn off tissue
    assert (base[..., 3][tissue] == 255).mean() > 0.9  # smoothing fills tissue between patches


def test_mismatched_inputs_name_the_slide(rendered: Rendered) -> None:
    from wsi_mil.errors import SlideError

    with pytest.raises(SlideError, match="tumour_a"):
        write_heatmaps(
            rendered.out,
            "bad",
            "tumour_a",
            rendered.slide,
            rendered.coords,
            rendered.size,
            rendered.attention[:-1],
            rendered.probs,
            CLASSES,
        )


def test_overlay_describes_what_it_shows(rendered: Rendered) -> None:
    import zarr

    with tifffile.TiffFile(rendered.paths["tiff"]) as tif:
        info = json.loads(tif.pages[0].description)["wsi_mil_heatmap"]
    assert info["score"] == "prob_tumour" and info["slide_dimensions"] == [W, H]
    assert zarr.open_group(str(rendered.paths["zarr"]), mode="r").attrs["wsi_mil_heatmap"] == info


def test_render_without_the_slide_uses_the_stored_thumbnail(rendered: Rendered) -> None:
    data = h5.read_heatmap_data(rendered.paths["h5"])
    paths = render_heatmaps(rendered.out, "noslide", data, None, HeatmapOptions(alpha=0.0))
    assert set(paths) == {"png", "tiff", "geojson"}  # no gallery without the slide
    png = cv2.imread(str(paths["png"]))
    stored = cv2.imread(str(rendered.out / "thumbnails" / "tumour_a.png"))
    assert png.shape[1] == 2048
    assert abs(float(png[:1536].mean()) - float(stored.mean())) < 5  # the thumbnail, not white
