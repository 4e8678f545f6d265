"""The viewer's HTTP surface on a real OUT: lists, Deep Zoom, overlay, scores, refusals."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from tests.viewer.conftest import CLASSES, RUN, ViewerOut, record_slide
from wsi_mil.heatmaps.scores import colour_lut
from wsi_mil.viewer.app import STATIC_DIR, create_app
from wsi_mil.viewer.data import ViewerError
from wsi_mil.viewer.tiles import OVERLAY_TILE, dz_level_dimensions

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def client(viewer_out: ViewerOut) -> Iterator[TestClient]:
    with TestClient(create_app(viewer_out.out, require_static=False)) as c:
        yield c


def _patch_centre(vo: ViewerOut, i: int) -> tuple[float, float]:
    x, y = vo.data.coords[i]
    p = vo.data.patch_size_level0
    return x + p / 2, y + p / 2


# -- lists and slide info ------------------------------------------------------------------
def test_slide_list_has_predictions_and_flags(client: TestClient, viewer_out: ViewerOut) -> None:
    r = client.get("/api/slides")
    assert r.status_code == 200
    body = r.json()
    assert body["run"] == RUN
    rows = {s["slide_id"]: s for s in body["slides"]}
    assert set(rows) == {"case_1", "ghost_2"}
    case = rows["case_1"]
    assert case["prediction"] == "tumour"
    assert case["probs"] == pytest.approx({"normal": 0.2, "tumour": 0.8})
    assert case["n_patches"] == len(viewer_out.data.coords)
    assert case["has_slide"] and case["has_heatmap"] and case["has_tissue"]
    ghost = rows["ghost_2"]
    assert not (ghost["has_slide"] or ghost["has_heatmap"] or ghost["has_tissue"])


def test_slide_info(client: TestClient, viewer_out: ViewerOut) -> None:
    info = client.get("/api/slides/case_1").json()
    assert info["dimensions"] == [viewer_out.width, viewer_out.height]
    assert info["classes"] == CLASSES
    assert [s["key"] for s in info["scores"]] == ["attention", "prob0", "prob1"]
    assert info["dzi"] == "/slides/case_1.dzi"
    assert len(info["legend"]) == 32 and info["legend"][0].startswith("#")


def test_labels_and_prediction_sources(tmp_path: Path, viewer_out: ViewerOut) -> None:
    """Labels come from the run's labels CSV; predict beats out-of-fold beats in-sample."""
    out = tmp_path / "out"
    shutil.copytree(viewer_out.out, out)
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\np1,case_1,tumour\np2,ghost_2,normal\np3,third_3,normal\n")
    run_dir = out / "models" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"labels_csv: {labels}\n")
    (run_dir / "predictions.csv").write_text(
        "slide_id,label,fold,prediction,prob_normal,prob_tumour\nghost_2,normal,0,tumour,0.4,0.6\n"
    )
    (out / "heatmaps" / RUN / "index.csv").write_text(
        "slide_id,prediction,prob_normal,prob_tumour,n_patches,status,error,slide_path\n"
        "case_1,normal,0.7,0.3,5,ok,,\nghost_2,normal,0.99,0.01,5,ok,,\nthird_3,,,,0,failed,unreadable,\n"
    )
    with TestClient(create_app(out, require_static=False)) as c:
        rows = {s["slide_id"]: s for s in c.get("/api/slides").json()["slides"]}
    assert rows["case_1"]["label"] == "tumour" and rows["ghost_2"]["label"] == "normal"
    assert (rows["case_1"]["prediction"], rows["case_1"]["prediction_source"]) == ("tumour", "predict")
    assert rows["ghost_2"]["prediction_source"] == "predict"  # OUT/predictions.csv names it too
    assert rows["third_3"]["prediction"] is None and rows["third_3"]["label"] == "normal"
    (out / "predictions.csv").unlink()
    with TestClient(create_app(out, require_static=False)) as c:
        rows = {s["slide_id"]: s for s in c.get("/api/slides").json()["slides"]}
    assert (rows["case_1"]["prediction"], rows["case_1"]["prediction_source"]) == ("normal", "in-sample")
    assert rows["ghost_2"]["probs"] == {"normal": 0.4, "tumour": 0.6}
    assert rows["ghost_2"]["prediction_source"] == "out-of-fold"


# -- Deep Zoom of the slide ----------------------------------------------------------------
def test_dzi_describes_the_slide(client: TestClient, viewer_out: ViewerOut) -> None:
    r = client.get("/slides/case_1.dzi")
    assert r.status_code == 200 and "xml" in r.headers["content-type"]
    root = ET.fromstring(r.text)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (viewer_out.width, viewer_out.height)
    assert root.get("Format") == "jpeg" and root.get("TileSize") == "254" and root.get("Overlap") == "1"


def test_slide_tiles_are_jpegs_of_the_right_size(client: TestClient, viewer_out: ViewerOut) -> None:
    dims = dz_level_dimensions(viewer_out.width, viewer_out.height)
    top = len(dims) - 1
    # Top level, first tile: 254 + right/bottom overlap of 1.
    img = Image.open(io.BytesIO(client.get(f"/slides/case_1_files/{top}/0_0.jpeg").content))
    assert img.format == "JPEG" and img.size == (255, 255)
    # Top level, an interior tile: overlap on both sides.
    img = Image.open(io.BytesIO(client.get(f"/slides/case_1_files/{top}/1_1.jpeg").content))
    assert img.size == (256, 256)
    # Level whose whole image fits one tile: the tile is the level.
    lv = max(i for i, (w, h) in enumerate(dims) if w <= 254 and h <= 254)
    img = Image.open(io.BytesIO(client.get(f"/slides/case_1_files/{lv}/0_0.jpeg").content))
    assert img.size == dims[lv]
    # The whole-slide tile shows tissue, not a blank.
    assert np.asarray(img).std() > 5


def test_slide_tile_matches_the_slide_pixels(client: TestClient, viewer_out: ViewerOut) -> None:
    from wsi_mil.slide import open_slide

    top = len(dz_level_dimensions(viewer_out.width, viewer_out.height)) - 1
    tile = np.asarray(Image.open(io.BytesIO(client.get(f"/slides/case_1_files/{top}/2_2.jpeg").content)), np.float32)
    with open_slide(viewer_out.slide, backend="tiffslide") as s:
        ref = s.read_region((2 * 254 - 1, 2 * 254 - 1), 0, (256, 256)).astype(np.float32)
    assert np.abs(tile - ref).mean() < 8  # JPEG, twice


# -- overlay ---------------------------------------------------------------------------------
def test_overlay_colour_at_a_patch_is_its_score(client: TestClient, viewer_out: ViewerOut) -> None:
    """At every zoom level the overlay pixel under a patch centre has the colour of its score."""
    data = viewer_out.data
    lut = colour_lut("jet")
    dims = dz_level_dimensions(viewer_out.width, viewer_out.height)
    top = len(dims) - 1
    rng = np.random.default_rng(0)
    for key, values in (("attention", data.attention_norm), ("prob1", data.instance_probs[:, 1])):
        for level in (top, top - 2):  # 1 and 4 level-0 px per overlay pixel (a patch is 256)
            lw, lh = dims[level]
            sx, sy = viewer_out.width / lw, viewer_out.height / lh
            for i in rng.choice(len(data.coords), 5, replace=False):
                cx, cy = _patch_centre(viewer_out, i)
                px, py = int(cx / sx), int(cy / sy)
                col, row = px // OVERLAY_TILE, py // OVERLAY_TILE
                r = client.get(f"/overlay/case_1/{key}_files/{level}/{col}_{row}.png")
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                tile = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
                got = tile[py - row * OVERLAY_TILE, px - col * OVERLAY_TILE]
                want = lut[round(float(values[i]) * 255)]
                assert got[3] == 255
                np.testing.assert_array_equal(got[:3], want[:3])


def test_overlay_is_transparent_off_the_patches(client: TestClient, viewer_out: ViewerOut) -> None:
    dims = dz_level_dimensions(viewer_out.width, viewer_out.height)
    level = max(i for i, (w, h) in enumerate(dims) if w <= OVERLAY_TILE and h <= OVERLAY_TILE)
    tile = np.asarray(Image.open(io.BytesIO(client.get(f"/overlay/case_1/attention_files/{level}/0_0.png").content)))
    assert tile.shape[:2] == dims[level][::-1]
    alpha = tile[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any()
    covered = len(viewer_out.data.coords) * viewer_out.data.patch_size_level0**2
    assert (alpha == 255).mean() == pytest.approx(covered / (viewer_out.width * viewer_out.height), abs=0.05)


def test_overlay_dzi_matches_slide_extent(client: TestClient, viewer_out: ViewerOut) -> None:
    root = ET.fromstring(client.get("/overlay/case_1/prob0.dzi").text)
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (viewer_out.width, viewer_out.height)
    assert root.get("Format") == "png"


# -- patch scores ------------------------------------------------------------------------------
def test_score_lookup_returns_stored_scores(client: TestClient, viewer_out: ViewerOut) -> None:
    data = viewer_out.data
    for i in (0, len(data.coords) // 2, len(data.coords) - 1):
        x, y = data.coords[i]
        for qx, qy in ((x + 1, y + 1), _patch_centre(viewer_out, i), (x + 255, y + 255)):
            p = client.get("/api/slides/case_1/patch", params={"x": qx, "y": qy}).json()["patch"]
            assert p["index"] == i and (p["x"], p["y"]) == (x, y)
            assert np.float32(p["attention"]) == data.attention[i]
            assert np.float32(p["attention_norm"]) == data.attention_norm[i]
            assert [np.float32(p["probs"][c]) for c in CLASSES] == list(data.instance_probs[i])
    assert client.get("/api/slides/case_1/patch", params={"x": -5, "y": -5}).json() == {"patch": None}


def test_top_k_is_sorted_by_the_score(client: TestClient, viewer_out: ViewerOut) -> None:
    data = viewer_out.data
    top = client.get("/api/slides/case_1/top", params={"score": "prob1", "k": 5}).json()["patches"]
    assert [p["index"] for p in top] == list(np.argsort(-data.instance_probs[:, 1], kind="stable")[:5])
    top = client.get("/api/slides/case_1/top", params={"k": 3}).json()["patches"]
    assert top[0]["index"] == int(np.argmax(data.attention))


def test_tissue_contours(client: TestClient) -> None:
    r = client.get("/api/slides/case_1/tissue")
    assert r.status_code == 200
    assert r.json()["type"] == "FeatureCollection" and r.json()["features"]


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "/api/slides/nope",
        "/api/slides/nope/patch?x=1&y=1",
        "/api/slides/ghost_2/patch?x=1&y=1",  # listed, but no heatmap
        "/api/slides/ghost_2/tissue",
        "/slides/nope.dzi",
        "/slides/ghost_2.dzi",  # listed, but no slide file
        "/slides/nope_files/0/0_0.jpeg",
        "/slides/case_1_files/99/0_0.jpeg",  # bad level
        "/slides/case_1_files/-1/0_0.jpeg",
        "/slides/case_1_files/12/99_0.jpeg",  # column outside the level (12 = level 0 of 4096 px)
        "/slides/case_1_files/0/0_0.png",  # wrong format
        "/slides/case_1_files/x/0_0.jpeg",
        "/overlay/case_1/nope.dzi",
        "/overlay/case_1/prob7_files/0/0_0.png",
        "/overlay/case_1/attention_files/99/0_0.png",
        "/overlay/case_1/attention_files/12/0_99.png",
        "/api/slides/case_1/top?score=nope",
        "/static/nope.js",
    ],
)
def test_unknown_things_are_404(client: TestClient, url: str) -> None:
    assert client.get(url).status_code == 404


def test_bad_query_is_400(client: TestClient) -> None:
    assert client.get("/api/slides/case_1/patch?x=a&y=1").status_code == 400
    assert client.get("/api/slides/case_1/patch?x=nan&y=1").status_code == 400
    assert client.get("/api/slides/case_1/top?k=many").status_code == 400


TRAVERSALS = [
    "/static/../pyproject.toml",
    "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
    "/static/..%2f..%2f..%2fpyproject.toml",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/slides/..%2f..%2fetc%2fpasswd.dzi",
    "/slides/%2e%2e.dzi",
    "/api/slides/..%2fpatches%2fcase_1.h5",
    "/api/slides/%2e%2e/tissue",
    "/slides//etc/passwd.dzi",
    "/overlay/%2e%2e/attention.dzi",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_path_traversal_is_refused(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code in (400, 404)
    assert b"root:" not in r.content and b"[project]" not in r.content


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
@pytest.mark.parametrize("url", ["/api/slides", "/slides/case_1.dzi", "/static/viewer.js", "/"])
def test_writes_are_refused(client: TestClient, method: str, url: str) -> None:
    assert getattr(client, method)(url).status_code == 405


def test_security_headers(client: TestClient) -> None:
    h = client.get("/api/slides").headers
    assert h["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in h["content-security-policy"]


# -- starting ----------------------------------------------------------------------------------
def test_missing_openseadragon_is_a_clear_error(tmp_path: Path, viewer_out: ViewerOut) -> None:
    with pytest.raises(ViewerError, match="run 'make install'"):
        create_app(viewer_out.out, static_dir=tmp_path)


def test_missing_out_and_unknown_run_are_errors(tmp_path: Path, viewer_out: ViewerOut) -> None:
    with pytest.raises(ViewerError, match="no such output folder"):
        create_app(tmp_path / "nowhere", require_static=False)
    with pytest.raises(ViewerError, match="no heatmaps for run 'other'"):
        create_app(viewer_out.out, "other", require_static=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ViewerError, match="no slides found"):
        create_app(tmp_path / "empty", require_static=False)


def test_page_references_only_local_assets() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


# -- a real server, raw HTTP (no client-side URL normalisation) -----------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(viewer_out: ViewerOut) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread; yields ``host:port``."""
    import uvicorn

    app = create_app(viewer_out.out, require_static=False, allowed_hosts=["127.0.0.1", "localhost"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _raw_get(hostport: str, target: str, host_header: str | None = None) -> tuple[int, bytes]:
    host, port = hostport.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host_header or hostport}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize(
    "target",
    [
        "/static/../../../../etc/passwd",
        "/static/../../pyproject.toml",
        "/static/..%2f..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/slides/../../../etc/passwd",
        "/../../../../etc/passwd",
        "/static/openseadragon/../../../../pyproject.toml",
        "/static/%2fetc%2fpasswd",
    ],
)
def test_raw_traversal_against_a_live_server(live_server: str, target: str) -> None:
    status, data = _raw_get(live_server, target)
    assert status in (400, 404)
    assert b"root:" not in data and b"[project]" not in data


def test_live_server_serves_and_checks_host(live_server: str) -> None:
    status, data = _raw_get(live_server, "/api/slides")
    assert status == 200 and b"case_1" in data
    status, _ = _raw_get(live_server, "/api/slides", host_header="evil.example:80")
    assert status == 400  # DNS rebinding guard of a loopback server


def test_unreadable_slide_file_is_a_500_naming_it(tmp_path: Path, viewer_out: ViewerOut) -> None:
    out = tmp_path / "out"
    shutil.copytree(viewer_out.out, out)
    bad = tmp_path / "case_1.svs"
    bad.write_text("not a slide")
    record_slide(out, "case_1", bad)
    with TestClient(create_app(out, require_static=False)) as c:
        info = c.get("/api/slides/case_1").json()
        assert info["dzi"] is None and str(bad) in info["slide_error"]
        assert info["scores"]  # the heatmap is still there
        r = c.get("/slides/case_1.dzi")
        assert r.status_code == 500 and str(bad) in r.json()["error"]
        assert c.get("/overlay/case_1/attention.dzi").status_code == 200


def test_slide_ids_needing_url_quoting(tmp_path: Path, viewer_out: ViewerOut) -> None:
    """An id with a space and a '#' round-trips through the URLs the page is given."""
    out = tmp_path / "out"
    shutil.copytree(viewer_out.out, out)
    sid = "case #1 (a)"
    for sub, ext in (("heatmaps/" + RUN, ".h5"), ("patches", ".h5"), ("masks", ".geojson")):
        (out / sub / f"case_1{ext}").rename(out / sub / f"{sid}{ext}")
    (out / "predictions.csv").unlink()
    with TestClient(create_app(out, require_static=False)) as c:
        assert sid in [s["slide_id"] for s in c.get("/api/slides").json()["slides"]]
        info = c.get(f"/api/slides/{quote(sid, safe='')}").json()
        assert info["dzi"] == "/slides/case%20%231%20%28a%29.dzi"
        assert c.get(info["dzi"]).status_code == 200
        assert c.get(info["dzi"].replace(".dzi", "_files/0/0_0.jpeg")).status_code == 200
        assert c.get(f"/api/slides/{quote(sid, safe='')}/tissue").status_code == 200
