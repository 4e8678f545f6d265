"""CUDA tests (marker ``gpu``; skipped where no CUDA device is visible).

Run them on a GPU machine with ``pytest -m gpu tests/gpu``; GPU features are compared with
the CPU fp32 features of the same patches, row by row
(:func:`~wsi_mil.features.runtime.feature_agreement`), so a shuffle of rows fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

#: Applied by every module here.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="session")
def tiled_gpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with one tiled synthetic slide ``g`` (tumour regions, a few hundred patches)."""
    from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide
    from wsi_mil.tiling.cohort import tile_cohort

    root = tmp_path_factory.mktemp("gpu")
    (root / "slides").mkdir()
    write_synthetic_slide(
        root / "slides" / "g.tif",
        SyntheticSpec(width=6144, height=4096, tumour=True, tumour_fraction=0.3, n_tissue=2, seed=7),
    )
    out = root / "out"
    assert not tile_cohort([root / "slides"], out, progress=False).failed
    return out


def ihc_patches(size: int = 224) -> torch.Tensor:
    """16 patches of distinct content: scikit-image's IHC image cut 4 × 4, resized (uint8 NHWC)."""
    import cv2
    from skimage.data import immunohistochemistry

    img = immunohistochemistry()  # (512, 512, 3) uint8
    cuts = [img[y : y + 128, x : x + 128] for y in range(0, 512, 128) for x in range(0, 512, 128)]
    return torch.from_numpy(np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR) for c in cuts]))
