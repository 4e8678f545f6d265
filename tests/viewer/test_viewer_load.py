"""The viewer under concurrent load with constant eviction of open slides (issue 15).

A real ``wsi-mil view`` in a child process (so an OpenSlide abort shows as its exit code),
more slides than ``--max-open``, clients fetching slide and overlay tiles of every slide.
Before handles were reference-counted, eviction closed a slide another thread was reading
and OpenSlide aborted the process (``tc->outstanding == 0``) within seconds.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.viewer import _load as load
from wsi_mil.viewer.tiles import SlideTiles

pytest.importorskip("openslide")

N_SLIDES, MAX_OPEN = 5, 2


@pytest.fixture(scope="module")
def load_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return load.build_cohort(tmp_path_factory.mktemp("load"), N_SLIDES, size=(2048, 1536), seed=3)


def _slides(out: Path) -> list[tuple[str, Path]]:
    return sorted((p.stem, p) for p in (out.parent / "slides").glob("*.tif"))


def test_evicted_handle_stays_open_while_borrowed(load_out: Path) -> None:
    """A borrowed slide evicted by others still reads; it is closed when given back."""
    tiles = SlideTiles("openslide", max_open=1)
    (sid, path), *others = _slides(load_out)
    with tiles.borrow(sid, path) as gen:
        for other_id, other in others:  # each open evicts the one before
            with tiles.borrow(other_id, other):
                pass
        level = gen.level_count - 1
        img = gen.get_tile(level, (1, 1))  # would be "Passing closed slide object" (or an abort)
        assert np.asarray(img).std() > 0
        source = gen._osr
        assert source._slide._osr is not None  # still open
    assert source._slide._osr is None  # closed once returned: it had been evicted
    assert tiles.open_count() == 1


def test_concurrent_tiles_with_constant_eviction_in_process(load_out: Path) -> None:
    """Threads reading tiles of more slides than max_open: every tile right, none fails."""
    tiles = SlideTiles("openslide", max_open=MAX_OPEN, max_tiles=1)  # no cache: every tile is read
    slides = _slides(load_out)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                sid, path = slides[rng.integers(len(slides))]
                geom = tiles.geometry(sid, path)
                level = geom.level_count - 1 - int(rng.integers(3))
                cols, rows = geom.level_tiles[level]
                jpeg = tiles.tile(sid, path, level, int(rng.integers(cols)), int(rng.integers(rows)))
                assert jpeg is not None and Image.open(io.BytesIO(jpeg)).format == "JPEG"
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def test_real_server_holds_under_load_with_constant_eviction(load_out: Path, tmp_path: Path) -> None:
    port = load.free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = load.server_command(load_out, port, "--backend", "openslide", "--max-open", str(MAX_OPEN), "--threads", "8")
    proc = load.start_server(cmd, base, log)
    try:
        slides = load.pyramids(base)
        assert len(slides) == N_SLIDES > MAX_OPEN
        res = load.run_load(port, load.uniform(slides), clients=8, seconds=5, max_requests=20_000)
        s = res.summary()
        assert proc.poll() is None, f"viewer died with {proc.returncode}: {log.read_text()[-1500:]}"
        assert s["5xx"] == 0 and s["dropped"] == 0 and s["refused"] == 0, s
        assert s["requests"] > 100 and set(s["status"]) == {"200"}, s
        assert load.get(f"{base}/api/slides")[0] == 200  # still answers afterwards
    finally:
        code = load.stop_server(proc)
    assert code == 0, log.read_text()[-1500:]
