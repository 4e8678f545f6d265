"""The viewer in a real browser: Debian's headless Chromium driven by Playwright.

Skipped cleanly when Chromium, Playwright or the installed OpenSeadragon is missing. Set
``WSI_MIL_VIEWER_SCREENSHOT=docs/viewer.png`` to also write the screenshot for the docs.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.viewer.conftest import ViewerOut
from wsi_mil.heatmaps.scores import colour_lut
from wsi_mil.viewer.app import OSD_FILE, STATIC_DIR, create_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(viewer_out: ViewerOut) -> Iterator[str]:
    if not (STATIC_DIR / OSD_FILE).is_file():
        pytest.skip("OpenSeadragon not installed into the package (run make install)")
    import uvicorn

    app = create_app(viewer_out.out, allowed_hosts=["127.0.0.1", "localhost"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _pixel(page: Any, x: float, y: float) -> np.ndarray:
    """RGB of the page at CSS pixel (x, y) (device scale factor 1)."""
    import io

    from PIL import Image

    png = page.screenshot(clip={"x": int(x) - 1, "y": int(y) - 1, "width": 3, "height": 3})
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[1, 1].astype(int)


def _wait_idle(page: Any) -> None:
    page.wait_for_function("window.wsiMil && window.wsiMil.idle()", timeout=TIMEOUT_MS)
    page.wait_for_timeout(150)  # one more frame drawn after the last tile


def test_open_slide_overlay_scores_screenshot(
    browser: Any, base_url: str, viewer_out: ViewerOut, tmp_path: Path
) -> None:
    data = viewer_out.data
    lut = colour_lut("jet")
    # bypass_csp: Playwright polls its wait_for_function predicates with eval, which our CSP forbids.
    page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    # The page and the slide list.
    page.goto(base_url + "/", timeout=TIMEOUT_MS)
    row = page.locator("#slides tbody tr[data-slide='case_1']")
    row.wait_for(timeout=TIMEOUT_MS)
    assert "tumour" in row.inner_text()
    assert page.locator("#slides tbody tr[data-slide='ghost_2']").get_attribute("class") == "disabled"

    # Open the slide: slide + overlay tiles load.
    row.click()
    _wait_idle(page)
    assert page.evaluate("wsiMil.state.viewer.world.getItemCount()") == 2
    assert page.evaluate("wsiMil.state.overlayItem.getOpacity()") == pytest.approx(0.5)

    # Jump to the top patch: the panel shows its stored scores.
    best = int(np.argmax(data.attention))
    page.locator("#top li").first.click()
    _wait_idle(page)
    panel = page.locator("#patch table")
    assert panel.get_attribute("data-index") == str(best)
    text = panel.inner_text()
    assert f"{data.attention_norm[best]:.3f}" in text
    assert f"{data.instance_probs[best, 1]:.3f}" in text

    # Opaque overlay: the pixel at the patch centre has exactly the colour of its score.
    page.locator("#opacity").fill("1")
    _wait_idle(page)
    cx, cy = (float(v) + data.patch_size_level0 / 2 for v in data.coords[best])
    xy = page.evaluate(f"wsiMil.pageXY({cx}, {cy})")
    want = lut[round(float(data.attention_norm[best]) * 255), :3].astype(int)
    assert np.abs(_pixel(page, xy["x"], xy["y"]) - want).max() <= 3
    overlay_on = _pixel(page, xy["x"], xy["y"])

    # Toggle the overlay off: the slide shows through; on again: the colour is back.
    page.locator("#overlay-on").uncheck()
    _wait_idle(page)
    assert page.evaluate("wsiMil.state.overlayItem.getOpacity()") == 0
    assert np.abs(_pixel(page, xy["x"], xy["y"]) - overlay_on).max() > 20
    page.locator("#overlay-on").check()
    _wait_idle(page)
    assert np.abs(_pixel(page, xy["x"], xy["y"]) - overlay_on).max() <= 3

    # Switch to P(tumour): legend and colours follow.
    page.locator("#score").select_option("prob1")
    _wait_idle(page)
    assert "P(tumour)" in page.locator("#legend-label").inner_text()
    want = lut[round(float(data.instance_probs[best, 1]) * 255), :3].astype(int)
    assert np.abs(_pixel(page, xy["x"], xy["y"]) - want).max() <= 3

    # Hover a neighbouring patch: the panel reads its scores.
    p = data.patch_size_level0
    near = np.flatnonzero(np.abs(data.coords - data.coords[best]).max(1) == p)
    other = int(near[0]) if len(near) else best
    ox, oy = (float(v) + p / 2 for v in data.coords[other])
    oxy = page.evaluate(f"wsiMil.pageXY({ox}, {oy})")
    page.mouse.move(oxy["x"], oxy["y"])
    page.wait_for_function(f"document.querySelector('#patch table')?.dataset.index === '{other}'", timeout=TIMEOUT_MS)
    assert f"{data.instance_probs[other, 1]:.3f}" in page.locator("#patch").inner_text()

    # Tissue contours: drawn on the annotation canvas.
    page.locator("#tissue-on").check()
    page.wait_for_function("wsiMil.state.tissue !== null", timeout=TIMEOUT_MS)
    page.locator("#opacity").fill("0.5")
    page.evaluate("wsiMil.state.viewer.viewport.goHome(true)")
    _wait_idle(page)
    inked = page.evaluate(
        "(() => { const c = document.getElementById('annotations');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()"
    )
    assert inked > 100

    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("WSI_MIL_VIEWER_SCREENSHOT"):
        shutil.copyfile(shot, target)

    # Offline by construction: every request went to this server.
    elsewhere = [u for u in requests if not u.startswith(base_url)]
    assert requests and not elsewhere, elsewhere
    assert not errors, errors
    page.close()


def test_deep_link_opens_the_slide(browser: Any, base_url: str) -> None:
    page = browser.new_page(bypass_csp=True)
    page.goto(base_url + "/#slide=case_1", timeout=TIMEOUT_MS)
    _wait_idle(page)
    assert page.locator("#slide-title").inner_text() == "case_1"
    page.close()
