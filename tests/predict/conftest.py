"""A small synthetic cohort, tiled, extracted (built-in texture encoder) and trained once.

The first ``N_TRAIN`` slides are the training cohort; the last ``N_HELD`` are never seen by
training and are only written as slides, for ``predict`` to tile, extract and diagnose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from wsi_mil.demo import label_of
from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide

N_TRAIN = 8
N_HELD = 4
ENCODER = "texture"
RUN = "r1"


@dataclass
class Trained:
    """The training cohort folder, its run, and the held-out slides."""

    out: Path
    run_dir: Path
    train: list[Path]
    held: list[Path]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from wsi_mil.features import extract_cohort
    from wsi_mil.mil import load_train_config, train_run
    from wsi_mil.tiling.cohort import tile_cohort

    root = tmp_path_factory.mktemp("predict_cohort")
    slides = []
    for i in range(N_TRAIN + N_HELD):
        tumour = i % 2 == 0
        path = root / "slides" / f"{'tumour' if tumour else 'normal'}_{i:02d}.tif"
        path.parent.mkdir(exist_ok=True)
        write_synthetic_slide(
            path, SyntheticSpec(width=4096, height=3072, tumour=tumour, tumour_fraction=0.4, n_tissue=2, seed=500 + i)
        )
        slides.append(path)
    train, held = slides[:N_TRAIN], slides[N_TRAIN:]
    out = root / "out"
    tile_cohort(list(train), out, progress=False)
    extract_cohort(out, ENCODER, overrides={"batch_size": 32}, progress=False)
    labels = root / "labels.csv"
    pd.DataFrame({"slide_id": [p.stem for p in train], "label": [label_of(p) for p in train]}).to_csv(
        labels, index=False
    )
    cfg = load_train_config("default", {"run_name": RUN, "cv.folds": 2, "cv.val_fraction": 0.4, "optim.epochs": 20})
    run_dir = train_run(out, labels, ENCODER, cfg, progress=False)
    return Trained(out, run_dir, train, held)
