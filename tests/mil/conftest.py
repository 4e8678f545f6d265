"""Fixtures: small cohorts of real HDF5 feature bags."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_mil.io.h5 import write_bag

ENC = "toyenc"
D = 16


def make_cohort(root: Path, n: int = 24, classes: tuple[str, ...] = ("normal", "tumor")) -> Path:
    """Bags of 20-60 instances; class k > 0 shifts a few instances along axis k - 1."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        N = int(rng.integers(20, 60))
        feats = rng.normal(size=(N, D)).astype(np.float32)
        k = classes.index(label)
        if k:
            feats[: max(2, N // 8), k - 1] += 4.0
        coords = np.stack([np.arange(N) * 256, np.zeros(N)], 1)
        path = root / "features" / ENC / "h5_files" / f"s{i:02d}.h5"
        write_bag(path, feats, coords, {"encoder": ENC})
        rows.append({"case_id": f"c{i}", "slide_id": f"s{i:02d}", "label": label})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test: tiny models run fastest so, and two threads spin
    against other work on a busy machine. The previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cohort() -> Callable[..., Path]:
    """``cohort(root, n=24, classes=(...))`` writes bags + labels.csv, returns the CSV."""
    return make_cohort
