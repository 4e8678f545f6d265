"""Tiling a flat (single-level) slide needs memory for one band, not for the whole level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.io import h5
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide


def _peak_mb(script: str, *args: str) -> tuple[int, float]:
    """Exit code and peak RSS (MB) of a Python ``script`` run in a fresh interpreter.

    The child reports its own ``VmHWM``: ``ru_maxrss`` of a child would include the
    pytest process's memory at fork, which Linux carries across ``exec``.
    """
    report = "import atexit; atexit.register(lambda: print(open('/proc/self/status').read()))\n"
    proc = subprocess.run([sys.executable, "-c", report + script, *args], capture_output=True, text=True)
    hwm = [line for line in proc.stdout.splitlines() if line.startswith("VmHWM:")]
    return proc.returncode, int(hwm[0].split()[1]) / 1024 if hwm else float("nan")


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_flat_slide_is_tiled_in_far_less_memory_than_its_level_0(tmp_path: Path, backend: str) -> None:
    # 16,000 × 12,000 px: level 0 is 549 MB as RGB and 732 MB more as OpenSlide's RGBA, so
    # a whole-level read cannot stay under the limit below (before bands this took 2.3 GB);
    # bands take about 150 MB above the interpreter's own.
    width, height = 16_000, 12_000
    slide = tmp_path / "flat_big.tif"
    spec = SyntheticSpec(width=width, height=height, levels=(1,), n_tissue=3, tissue_scale=0.1,
                         plain_background=True, truth_downsample=64, seed=9)
    write_synthetic_slide(slide, spec)
    level0_mb = width * height * 3 / 2**20
    script = (
        "import sys; from wsi_mil.tiling.run import tile_slide, TileConfig; "
        "r = tile_slide(sys.argv[1], sys.argv[2], TileConfig(backend=sys.argv[3])); "
        "assert r.n_patches > 0"
    )
    out = tmp_path / "out"
    rc, peak = _peak_mb(script, str(slide), str(out), backend)
    assert rc == 0, f"{backend}: tiling failed (rc {rc})"
    assert peak < 0.75 * level0_mb, f"{backend}: peak RSS {peak:.0f} MB for a {level0_mb:.0f} MB level 0"
    assert len(h5.read_patches(out / "patches" / "flat_big.h5").coords) > 0
