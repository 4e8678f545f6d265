"""Screenshot of ``wsi-mil view`` for the docs (``docs/viewer.png``), in headless Chromium.

With ``--out OUT`` (e.g. ``demo_out`` after ``make demo``) it shows that folder's heatmaps;
without, it builds a small synthetic OUT whose per-patch scores are *made up* from the
synthetic slides' ground-truth tumour masks (no model), enough to show the viewer.

Usage::

    .venv/bin/python pipelines/viewer_screenshot.py --png docs/viewer.png
    .venv/bin/python pipelines/viewer_screenshot.py --out demo_out --png docs/viewer.png
"""

from __future__ import annotations

import argparse
import csv
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def synthetic_out(root: Path, n: int = 3) -> Path:
    """Slides, tiling and heatmaps with scores made up from the ground truth (no model)."""
    from wsi_mil.heatmaps import HeatmapOptions, write_heatmaps
    from wsi_mil.io import h5
    from wsi_mil.io.layout import Layout
    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.run import TileConfig, tile_slide

    out = root / "out"
    rows = []
    for i in range(n):
        tumour = i % 2 == 0
        sid = f"{'tumour' if tumour else 'normal'}_{i:03d}"
        slide = root / "slides" / f"{sid}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        spec = SyntheticSpec(width=12288, height=9216, tumour=tumour, n_tissue=2 + i % 2, seed=40 + i)
        truth = write_synthetic_slide(slide, spec)
        tile_slide(slide, out, TileConfig(backend="tiffslide"))
        patches = h5.read_patches(Layout(out).patches(sid))
        coords, size = patches.coords, patches.patch_size_level0
        rng = np.random.default_rng(i)
        frac = np.array([truth.fraction_in(int(x), int(y), size, "tumour") for x, y in coords])
        p = np.clip(0.08 + 0.85 * frac + rng.normal(0, 0.06, len(coords)), 0, 1)
        att = np.exp(4 * p + rng.normal(0, 0.2, len(coords)))
        att /= att.sum()
        opts = HeatmapOptions(gallery_k=0, backend="tiffslide", png_max=512)
        write_heatmaps(
            out, "made_up_scores", sid, slide, coords, size, att, np.stack([1 - p, p], 1), ["normal", "tumour"], opts
        )
        q = float(np.clip(0.1 + 0.8 * frac.mean() * 5, 0.02, 0.98))
        rows.append([sid, "tumour" if q > 0.5 else "normal", 1 - q, q, len(coords), "ok", "", str(slide)])
    with Layout(out).predictions.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["slide_id", "prediction", "prob_normal", "prob_tumour", "n_patches", "status", "error", "slide_path"]
        )
        w.writerows(rows)
    return out


def screenshot(out: Path, png: Path, slide_id: str | None = None) -> None:
    """Serve ``out``, open a slide in Chromium, hover its top patch, save ``png``."""
    import uvicorn
    from playwright.sync_api import sync_playwright

    from wsi_mil.viewer.app import create_app

    app = create_app(out)
    data = app.state.data
    if slide_id is None:
        with_heatmap = [s for s in data.slides.values() if s.heatmap is not None and s.path is not None]
        slide_id = next(
            (s.slide_id for s in with_heatmap if s.prediction not in (None, "normal")), with_heatmap[0].slide_id
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    idle = "window.wsiMil && wsiMil.idle()"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 820}, bypass_csp=True)
            page.goto(f"http://127.0.0.1:{port}/#slide={slide_id}")
            page.wait_for_function(idle, timeout=60_000)
            page.locator("#tissue-on").check()
            page.wait_for_function("wsiMil.state.tissue !== null")
            page.locator("#score").select_option("prob1")
            page.wait_for_function(idle, timeout=60_000)
            top = page.evaluate("wsiMil.state.top[0]")
            xy = page.evaluate(f"wsiMil.pageXY({top['x'] + top['size'] / 2}, {top['y'] + top['size'] / 2})")
            page.mouse.move(xy["x"], xy["y"])
            page.wait_for_function(f"document.querySelector('#patch table')?.dataset.index === '{top['index']}'")
            page.wait_for_timeout(300)
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png))
            browser.close()
    finally:
        server.should_exit = True
    print(f"wrote {png} ({slide_id} of {out})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="OUT folder with heatmaps (default: a synthetic one)")
    ap.add_argument("--slide", help="slide id to show (default: a tumour slide)")
    ap.add_argument("--png", type=Path, default=Path("docs/viewer.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out if args.out is not None else synthetic_out(Path(tmp))
        screenshot(out, args.png, args.slide)


if __name__ == "__main__":
    main()
