"""Paths confined: ids read from OUT are checked, and a slide is served only from the file
its tiling recorded, while that file is still the one that was tiled.

Hostile rows in OUT's CSVs (an id ``../../x``, a ``slide_path`` naming another image), a
slide replaced after tiling, links out of ``OUT/slides/``: real files, real app.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.viewer.conftest import RUN, ViewerOut, record_slide
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.viewer.app import create_app
from wsi_mil.viewer.tiles import dz_level_dimensions

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def other_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another slide image (same size, other tissue): what a hostile path points at."""
    path = tmp_path_factory.mktemp("other") / "other.tif"
    write_synthetic_slide(path, SyntheticSpec(width=4096, height=3072, n_tissue=1, seed=99))
    return path


@pytest.fixture
def out(tmp_path: Path, viewer_out: ViewerOut) -> Path:
    """A copy of the viewer's OUT (its patch file still records the original slide)."""
    dst = tmp_path / "out"
    shutil.copytree(viewer_out.out, dst)
    return dst


def _client(out: Path) -> Iterator[TestClient]:
    with TestClient(create_app(out, require_static=False)) as c:
        yield c


def _overview(c: TestClient, vo: ViewerOut) -> np.ndarray:
    """The Deep Zoom level that fits one tile: the whole slide, small."""
    dims = dz_level_dimensions(vo.width, vo.height)
    level = max(i for i, (w, h) in enumerate(dims) if w <= 254 and h <= 254)
    r = c.get(f"/slides/case_1_files/{level}/0_0.jpeg")
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)), np.float32)


def _reference(slide: Path, size: tuple[int, int]) -> np.ndarray:
    from wsi_mil.slide import open_slide

    with open_slide(slide, backend="tiffslide") as s:
        return s.read_resized((0, 0), s.dimensions, size).astype(np.float32)


def test_hostile_id_in_predictions_is_skipped_with_a_warning(out: Path, viewer_out: ViewerOut) -> None:
    # What masks/<id>.geojson would resolve to for the id ../../x: outside OUT.
    outside = out / "masks" / "../../x.geojson"
    outside.write_text('{"type": "FeatureCollection", "features": [], "secret": "outside OUT"}')
    (out / "predictions.csv").write_text(
        "slide_id,prediction,prob_normal,prob_tumour\ncase_1,tumour,0.2,0.8\n../../x,normal,0.9,0.1\n"
    )
    app = create_app(out, require_static=False)
    warnings = app.state.data.warnings
    assert len(warnings) == 1
    assert f"{out / 'predictions.csv'}:3" in warnings[0] and "'../../x' skipped" in warnings[0]
    assert "contains '..'" in warnings[0]
    with TestClient(app) as c:
        ids = [s["slide_id"] for s in c.get("/api/slides").json()["slides"]]
        assert ids == ["case_1"]  # the rest still shown
        for url in ("/api/slides/..%2F..%2Fx/tissue", "/api/slides/../../x/tissue", "/api/slides/..%2F..%2Fx"):
            r = c.get(url)
            assert r.status_code == 404 and b"outside OUT" not in r.content


def test_hostile_ids_in_every_source_are_skipped(out: Path, tmp_path: Path) -> None:
    (out / "status.csv").write_text("slide_id,stage,status,path\ncase_1,tile,ok,\nsub/dir,tile,ok,/etc/passwd\n")
    (out / "heatmaps" / RUN / "index.csv").write_text("slide_id,prediction,prob_normal,prob_tumour\n..,normal,1,0\n")
    shutil.copy(out / "heatmaps" / RUN / "case_1.h5", out / "heatmaps" / RUN / ".hidden.h5")
    shutil.copy(out / "patches" / "case_1.h5", out / "patches" / "a*b.h5")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\ncase_1,tumour\n../etc,normal\n")
    (out / "models" / RUN).mkdir(parents=True)
    (out / "models" / RUN / "config.yaml").write_text(f"labels_csv: {labels}\n")
    data = create_app(out, require_static=False).state.data
    assert sorted(data.slides) == ["case_1", "ghost_2"]
    assert data.slides["case_1"].label == "tumour"
    text = "\n".join(data.warnings)
    assert len(data.warnings) == 5, text
    for bad in ("'sub/dir'", "'..'", "'.hidden'", "'a*b'", "'../etc'"):
        assert bad in text
    assert f"{out / 'status.csv'}:3" in text and f"{labels}:3" in text


def test_slide_path_column_does_not_choose_the_file(out: Path, viewer_out: ViewerOut, other_image: Path) -> None:
    (out / "predictions.csv").write_text(
        f"slide_id,prediction,prob_normal,prob_tumour,slide_path\ncase_1,tumour,0.2,0.8,{other_image}\n"
    )
    (out / "status.csv").write_text(f"slide_id,stage,status,path\ncase_1,tile,ok,{other_image}\n")
    app = create_app(out, require_static=False)
    rec = app.state.data.slides["case_1"]
    assert rec.path == viewer_out.slide.resolve()
    assert any(f"slide_path {str(other_image)!r} of 'case_1' ignored" in w for w in app.state.data.warnings)
    with TestClient(app) as c:
        tile = _overview(c, viewer_out)
    size = (tile.shape[1], tile.shape[0])
    mine, other = (float(np.abs(tile - _reference(p, size)).mean()) for p in (viewer_out.slide, other_image))
    assert mine < 6 and other > 2 * mine + 3, (mine, other)  # the tiled slide's pixels, not the other's


def test_agreeing_slide_path_column_is_fine(out: Path, viewer_out: ViewerOut) -> None:
    (out / "predictions.csv").write_text(f"slide_id,prediction,slide_path\ncase_1,tumour,{viewer_out.slide}\n")
    assert create_app(out, require_static=False).state.data.warnings == []


def test_slide_replaced_after_tiling_is_not_served(out: Path, tmp_path: Path, other_image: Path) -> None:
    slide = tmp_path / "case_1.tif"
    shutil.copy(_tiled_slide(out), slide)
    record_slide(out, "case_1", slide)
    with TestClient(create_app(out, require_static=False)) as c:
        assert c.get("/slides/case_1.dzi").status_code == 200  # before: served
    shutil.copy(other_image, slide)  # same name, other content
    with TestClient(create_app(out, require_static=False)) as c:
        r = c.get("/slides/case_1.dzi")
        assert r.status_code == 409
        msg = r.json()["error"]
        assert str(slide) in msg and "not the file that was tiled" in msg and "wsi-mil tile" in msg
        assert c.get("/slides/case_1_files/0/0_0.jpeg").status_code == 409
        info = c.get("/api/slides/case_1").json()
        assert info["dzi"] is None and "not the file that was tiled" in info["slide_error"]
        assert c.get("/overlay/case_1/attention.dzi").status_code == 200  # the heatmap alone


def _tiled_slide(out: Path) -> Path:
    from wsi_mil.io import h5

    return Path(str(h5.read_patches(out / "patches" / "case_1.h5").attrs["slide_path"]))


def test_patch_file_without_fingerprint_is_not_served(out: Path) -> None:
    import h5py

    with h5py.File(out / "patches" / "case_1.h5", "r+") as f:
        for attrs in (f.attrs, f["coords"].attrs):
            del attrs["slide_fingerprint"]
    with TestClient(create_app(out, require_static=False)) as c:
        r = c.get("/slides/case_1.dzi")
        assert r.status_code == 404 and "records no slide_fingerprint" in r.json()["error"]
        assert "re-run 'wsi-mil tile'" in c.get("/api/slides/case_1").json()["slide_error"]


def test_untiled_slide_only_from_out_slides_inside_out(out: Path, other_image: Path) -> None:
    """Without a patch file, ``OUT/slides/<id>.*`` is the slide, unless it links out of OUT."""
    (out / "patches" / "case_1.h5").unlink()
    (out / "slides").mkdir()
    (out / "slides" / "case_1.tif").symlink_to(other_image)  # a link out of OUT
    with TestClient(create_app(out, require_static=False)) as c:
        assert c.get("/slides/case_1.dzi").status_code == 404
    (out / "slides" / "case_1.tif").unlink()
    shutil.copy(other_image, out / "slides" / "case_1.tif")
    with TestClient(create_app(out, require_static=False)) as c:
        assert c.get("/slides/case_1.dzi").status_code == 200


def test_wsi_mil_view_prints_one_warning_per_hostile_row_and_serves_the_rest(out: Path, tmp_path: Path) -> None:
    import json

    from wsi_mil.viewer import _load as load

    (out / "predictions.csv").write_text("slide_id,prediction\ncase_1,tumour\n../../x,normal\nsub/dir,normal\n")
    port, log = load.free_port(), tmp_path / "server.log"
    proc = load.start_server(load.server_command(out, port), f"http://127.0.0.1:{port}", log)
    try:
        status, body = load.get(f"http://127.0.0.1:{port}/api/slides")
    finally:
        load.stop_server(proc)
    assert status == 200 and [s["slide_id"] for s in json.loads(body)["slides"]] == ["case_1"]
    warnings = [ln for ln in log.read_text().splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2
    assert "predictions.csv:3: slide id '../../x' skipped" in warnings[0]
    assert "predictions.csv:4: slide id 'sub/dir' skipped: it contains '/'" in warnings[1]
