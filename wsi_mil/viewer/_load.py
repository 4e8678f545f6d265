"""Load on a viewer in a child process: a synthetic cohort, the server, N keep-alive clients.

Used by ``pipelines/benchmarks/viewer_load.py`` and ``tests/viewer/test_viewer_load.py``.
The server runs as ``python -m wsi_mil.cli view`` in its own process, so an abort there
(a native assertion, a segfault) is seen as its exit code rather than killing the caller.
The clients are asyncio tasks, each on one persistent HTTP/1.1 connection (as a browser
keeps them), fetching slide and overlay tiles of every slide in random order. Everything
is loopback, bounded in time and in requests.
"""

from __future__ import annotations

import asyncio
import csv
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from wsi_mil.viewer.tiles import OVERLAY_TILE, SLIDE_TILE, dz_level_dimensions

CLASSES = ("normal", "tumour")
RUN = "load"
#: Seconds one request may take before it counts as dropped.
REQUEST_TIMEOUT_S = 15.0


def build_cohort(root: str | Path, n_slides: int, size: tuple[int, int] = (4096, 3072), seed: int = 0) -> Path:
    """Write ``n_slides`` synthetic slides, tile them and write heatmaps of made-up scores; return OUT.

    Parameters
    ----------
    root : path-like
        Folder that receives ``slides/`` and ``out/``.
    n_slides : int
        Slides in the cohort.
    size : tuple of int
        Level-0 (width, height) of each slide.
    seed : int
        Seed of the slides and scores.

    Examples
    --------
    >>> out = build_cohort("/tmp/load", 6)  # doctest: +SKIP
    """
    from wsi_mil.heatmaps import HeatmapOptions, write_heatmaps
    from wsi_mil.io import h5
    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.run import TileConfig, tile_slide

    root = Path(root)
    out = root / "out"
    rng = np.random.default_rng(seed)
    rows = []
    options = HeatmapOptions(gallery_k=0, backend="tiffslide", png_max=128)
    for i in range(n_slides):
        sid = f"load_{i:03d}"
        slide = root / "slides" / f"{sid}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        spec = SyntheticSpec(width=size[0], height=size[1], tumour=i % 2 == 1, n_tissue=2, seed=seed + i)
        write_synthetic_slide(slide, spec)
        tile_slide(slide, out, TileConfig(backend="tiffslide"))
        patches = h5.read_patches(out / "patches" / f"{sid}.h5")
        n = len(patches.coords)
        p = np.clip(rng.uniform(0, 1, n), 0, 1)
        attention = np.exp(3 * p) / np.exp(3 * p).sum()
        probs = np.stack([1 - p, p], 1)
        write_heatmaps(out, RUN, sid, slide, patches.coords, patches.patch_size_level0, attention, probs,
                       list(CLASSES), options)  # fmt: skip
        rows.append([sid, CLASSES[int(p.mean() > 0.5)], 1 - p.mean(), p.mean(), n])
    with (out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "prediction", "prob_normal", "prob_tumour", "n_patches"])
        w.writerows(rows)
    return out


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(out: str | Path, port: int, *extra: str, host: str = "127.0.0.1") -> list[str]:
    """``python -m wsi_mil.cli view OUT --host HOST --port PORT ...`` (loopback by default)."""
    return [sys.executable, "-m", "wsi_mil.cli", "view", str(out), "--host", host, "--port", str(port), *extra]


def get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and body of one GET (HTTP errors included)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_server(command: list[str], base: str, log: Path, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """Start the server ``command``, wait until ``base/api/slides`` answers at all; output goes to ``log``.

    Raises
    ------
    RuntimeError
        The server exited or did not answer within ``timeout_s``.
    """
    fh = log.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"viewer exited with {proc.returncode} at start: {log.read_text()[-2000:]}")
        try:
            get(f"{base}/api/slides", 2.0)  # any HTTP answer (a 403 without the token too): it is up
            return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"viewer did not answer within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """Interrupt the server (as Ctrl-C does) and return its exit code; None if it had to be killed."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


@dataclass(frozen=True)
class Pyramid:
    """One slide as the page sees it: its URL id, Deep Zoom level sizes, and what it has."""

    quoted_id: str
    levels: list[tuple[int, int]]
    slide: bool
    overlay: bool

    def tiles(self, level: int) -> list[str]:
        """Every slide and overlay (attention, prob1) tile path of ``level``."""
        w, h = self.levels[level]
        q, urls = self.quoted_id, []
        if self.slide:
            urls += [f"/slides/{q}_files/{level}/{c}_{r}.jpeg" for c, r in _grid(w, h, SLIDE_TILE)]
        if self.overlay:
            for score in ("attention", "prob1"):
                urls += [f"/overlay/{q}/{score}_files/{level}/{c}_{r}.png" for c, r in _grid(w, h, OVERLAY_TILE)]
        return urls


def _grid(w: int, h: int, tile: int) -> list[tuple[int, int]]:
    return [(c, r) for c in range(-(-w // tile)) for r in range(-(-h // tile))]


def pyramids(base: str) -> list[Pyramid]:
    """The slides the server lists, with a slide or heatmap to show."""
    import json

    found = []
    for s in json.loads(get(f"{base}/api/slides")[1])["slides"]:
        q = quote(s["slide_id"], safe="")
        info = json.loads(get(f"{base}/api/slides/{q}")[1])
        if info.get("dimensions") and (info.get("dzi") or info.get("scores")):
            levels = dz_level_dimensions(*info["dimensions"])
            found.append(Pyramid(q, levels, bool(info.get("dzi")), bool(info.get("scores"))))
    return found


def uniform(slides: list[Pyramid]) -> Callable[[random.Random], Iterator[str]]:
    """Workload ``cold``: any tile of any slide, equally likely (nearly every request a cache miss)."""
    urls = [u for p in slides for lv in range(len(p.levels)) for u in p.tiles(lv)]

    def work(rng: random.Random) -> Iterator[str]:
        while True:
            yield rng.choice(urls)

    return work


def browsing(slides: list[Pyramid], views: int = 4, view_tiles: tuple[int, int] = (4, 3)) -> Callable[
    [random.Random], Iterator[str]
]:  # fmt: skip
    """Workload ``browse``: what OpenSeadragon asks while a reader looks at slides.

    Each client opens a random slide (every tile of the levels that fit in 2 × 2 tiles, as
    the page does on opening), then looks at ``views`` random viewports of ``view_tiles``
    tiles at one of the three finest levels, slide and overlay tiles together, and moves on
    to another slide. Overview tiles are shared by all readers; viewports rarely are.
    """

    def work(rng: random.Random) -> Iterator[str]:
        while True:
            p = rng.choice(slides)
            for level, (w, h) in enumerate(p.levels):
                if -(-w // SLIDE_TILE) * -(-h // SLIDE_TILE) <= 4:
                    yield from p.tiles(level)
            for _ in range(views):
                level = rng.randrange(max(0, len(p.levels) - 3), len(p.levels))
                w, h = p.levels[level]
                cols, rows = -(-w // SLIDE_TILE), -(-h // SLIDE_TILE)
                ov_cols, ov_rows = -(-w // OVERLAY_TILE), -(-h // OVERLAY_TILE)  # 256 px: maybe one fewer
                c0, r0 = rng.randrange(cols), rng.randrange(rows)
                for c in range(c0, min(cols, c0 + view_tiles[0])):
                    for r in range(r0, min(rows, r0 + view_tiles[1])):
                        if p.slide:
                            yield f"/slides/{p.quoted_id}_files/{level}/{c}_{r}.jpeg"
                        if p.overlay and c < ov_cols and r < ov_rows:
                            yield f"/overlay/{p.quoted_id}/attention_files/{level}/{c}_{r}.png"

    return work


@dataclass
class LoadResult:
    """What the clients saw."""

    clients: int
    seconds: float
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    dropped: int = 0
    refused: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: counts, 5xx, drops, latency percentiles (ms), requests per second."""
        lat = np.asarray(self.latencies_ms or [np.nan])
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)}
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "per_second": round(self.requests / max(self.seconds, 1e-9), 1),
            "status": {str(k): v for k, v in sorted(self.statuses.items())},
            "4xx": sum(v for k, v in self.statuses.items() if 400 <= k < 500),
            "5xx": sum(v for k, v in self.statuses.items() if k >= 500),
            "dropped": self.dropped,
            "refused": self.refused,
            **pct,
            "max_ms": round(float(np.max(lat)), 1),
            "errors": dict(self.errors.most_common(5)),
        }


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; (status, server closes the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" not in headers:
        raise ValueError("response without Content-Length")
    await reader.readexactly(int(headers["content-length"]))
    return status, headers.get("connection", "").lower() == "close"


async def _client(port: int, urls: Iterator[str], deadline: float, budget: list[int], res: LoadResult) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                res.refused += 1
                res.errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        url = next(urls)
        t0 = time.perf_counter()
        try:
            writer.write(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            status, close = await asyncio.wait_for(_response(reader), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            res.dropped += 1
            res.errors[type(exc).__name__] += 1
            writer.close()
            reader = writer = None
            continue
        res.requests += 1
        res.latencies_ms.append((time.perf_counter() - t0) * 1000)
        res.statuses[status] += 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def run_load(
    port: int,
    workload: Callable[[random.Random], Iterator[str]],
    clients: int,
    seconds: float,
    max_requests: int,
    seed: int = 0,
) -> LoadResult:
    """``clients`` keep-alive clients, each following ``workload``, for ``seconds`` (at most ``max_requests``).

    Examples
    --------
    >>> base = "http://127.0.0.1:8765"  # doctest: +SKIP
    >>> run_load(8765, browsing(pyramids(base)), clients=4, seconds=2, max_requests=100).summary()  # doctest: +SKIP
    """
    res = LoadResult(clients, seconds)
    budget = [max_requests]

    async def main() -> None:
        deadline = time.monotonic() + seconds
        streams = [workload(random.Random(seed * 1000 + i)) for i in range(clients)]
        await asyncio.gather(*(_client(port, s, deadline, budget, res) for s in streams))

    t0 = time.monotonic()
    asyncio.run(main())
    res.seconds = time.monotonic() - t0
    return res
