"""Fixtures for stage 2: a tiny tiled cohort, and slides with corrupted JPEG tiles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_mil.io import h5
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_mil.tiling.cohort import tile_cohort

TILE = 256  # JPEG tile side == patch side, so one corrupted tile spoils exactly one patch


def corrupt_tiles(path: Path, coords: np.ndarray) -> None:
    """Overwrite the JPEG header of the level-0 tiles whose top-left corners are ``coords``."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        offsets, counts = page.dataoffsets, page.databytecounts
        index = [int(y // page.tilelength) * per_row + int(x // page.tilewidth) for x, y in coords]
    with open(path, "r+b") as fh:
        for i in index:
            fh.seek(offsets[i])
            fh.write(b"\x00" * min(64, counts[i]))


@pytest.fixture(scope="session")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT folder with two tiled slides: ``tum`` (tumour regions) and ``nor`` (normal)."""
    root = tmp_path_factory.mktemp("extract")
    slides = root / "slides"
    slides.mkdir()
    write_synthetic_slide(
        slides / "tum.tif",
        SyntheticSpec(
            width=3072,
            height=2560,
            tumour=True,
            tumour_fraction=0.4,
            n_tissue=2,
            tile=TILE,
            seed=21,
        ),
    )
    write_synthetic_slide(
        slides / "nor.tif", SyntheticSpec(width=2560, height=2048, n_tissue=1, tile=TILE, seed=22)
    )
    out = root / "out"
    tile_cohort([slides], out, progress=False)
    return out


@pytest.fixture
def out(tiled: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiled cohort (patches only) for one test."""
    dst = tmp_path / "out"
    shutil.copytree(tiled / "patches", dst / "patches")
    return dst


@pytest.fixture(scope="session")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with three slides: ``few`` (1 corrupted tile), ``many`` (> 5 %), ``good``."""
    root = tmp_path_factory.mktemp("damaged")
    slides = root / "slides"
    slides.mkdir()
    for name, seed in (("few", 31), ("many", 31), ("good", 32)):
        write_synthetic_slide(
            slides / f"{name}.tif",
            SyntheticSpec(width=3072, height=2560, n_tissue=2, tile=TILE, seed=seed),
        )
    out = root / "out"
    tile_cohort([slides], out, progress=False)  # tiling reads a low level: untouched below
    for name, k in (("few", 1), ("many", 8)):
        coords = h5.read_patches(out / "patches" / f"{name}.h5").coords
        assert len(coords) >= 20, "fixture needs enough patches for a 5 % threshold"
        corrupt_tiles(
            slides / f"{name}.tif", coords[np.linspace(0, len(coords) - 1, k).astype(int)]
        )
    return out
