"""``wsi-mil demo``: a synthetic cohort through every stage built so far."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from wsi_mil.synthetic import SyntheticSpec, write_synthetic_slide


def make_cohort(folder: str | Path, n_slides: int, seed: int = 0, size: tuple[int, int] = (6144, 4608)) -> list[Path]:
    """Write ``n_slides`` synthetic slides, alternating tumour / normal; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_slides):
        tumour = i % 2 == 0
        p = folder / f"{'tumour' if tumour else 'normal'}_{i:03d}.tif"
        if not p.exists():
            pen = ("green",) if i % 3 == 0 else ()
            write_synthetic_slide(
                p,
                SyntheticSpec(width=size[0], height=size[1], tumour=tumour, pen=pen, n_tissue=2 + i % 2, seed=seed + i),
            )
        paths.append(p)
    return paths


def run_demo(out: str | Path, n_slides: int = 4, echo: Callable[[str], None] = print) -> None:
    """Generate a synthetic cohort in ``OUT/slides`` and run the pipeline on it."""
    from wsi_mil.tiling.cohort import tile_cohort

    out = Path(out)
    echo(f"writing {n_slides} synthetic slides to {out / 'slides'} ...")
    make_cohort(out / "slides", n_slides)
    tile_cohort([out / "slides"], out, echo=echo)
    from wsi_mil.features import extract_cohort

    extract_cohort(out, "texture", echo=echo)
    echo(
        f"outputs: patches in {out / 'patches'}, tissue masks (GeoJSON, QuPath) in {out / 'masks'}, "
        f"thumbnails in {out / 'thumbnails'}, feature bags in {out / 'features' / 'texture' / 'h5_files'}, "
        f"status in {out / 'status.csv'}"
    )
