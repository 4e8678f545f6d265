"""Session fixtures: small synthetic slides with ground truth, written once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.synthetic import SyntheticSpec, SyntheticTruth, write_synthetic_slide


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def tumour_slide(slide_dir: Path) -> tuple[Path, SyntheticTruth]:
    """8192 × 6144 at 0.5 µm/px, tumour regions and green + black pen marks."""
    path = slide_dir / "tumour_a.tif"
    truth = write_synthetic_slide(path, SyntheticSpec(width=8192, height=6144, tumour=True,
                                                      pen=("green", "black"), seed=3))
    return path, truth


@pytest.fixture(scope="session")
def plain_slide(slide_dir: Path) -> tuple[Path, SyntheticTruth]:
    """6144 × 4096 at 0.25 µm/px (a '40×' scan), blue pen, no tumour."""
    path = slide_dir / "plain_b.tif"
    truth = write_synthetic_slide(path, SyntheticSpec(width=6144, height=4096, mpp=0.25, n_tissue=2,
                                                      pen=("blue",), seed=11))
    return path, truth


@pytest.fixture(scope="session")
def no_mpp_slide(slide_dir: Path) -> Path:
    path = slide_dir / "nompp_c.tif"
    write_synthetic_slide(path, SyntheticSpec(width=2048, height=2048, mpp=None, n_tissue=1, seed=5))
    return path


@pytest.fixture(scope="session")
def blank_slide(slide_dir: Path) -> Path:
    """Glass only: no tissue at all."""
    path = slide_dir / "blank_d.tif"
    write_synthetic_slide(path, SyntheticSpec(width=2048, height=2048, n_tissue=0, seed=6))
    return path


@pytest.fixture(scope="session")
def tiny_slide(slide_dir: Path) -> Path:
    """Smaller than one 256-px patch."""
    path = slide_dir / "tiny_e.tif"
    write_synthetic_slide(path, SyntheticSpec(width=200, height=180, n_tissue=1, tile=256, seed=7))
    return path
