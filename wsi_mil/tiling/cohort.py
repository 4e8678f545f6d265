"""Stage 1 over many slides: skip done ones, isolate failures, record status, summarise."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.config import dump_config, load_config
from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.harness.inputs import SlideInput, collect_slides
from wsi_mil.harness.lock import locks_output
from wsi_mil.harness.runner import SlideOutcome, StageSummary, run_slides
from wsi_mil.io.layout import Layout
from wsi_mil.tiling.run import TileConfig, TileResult, check_tiled, is_tiled, tile_inputs, tile_slide

STAGE = "tile"


@dataclass
class CohortSummary(StageSummary):
    """Outcome of tiling over a cohort (``results`` maps slide ids to :class:`TileResult`)."""

    results: dict[str, TileResult] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


def check_mpp(mpp: float | None) -> float | None:
    """The run-wide ``--mpp`` override, refused up front unless a positive, finite µm/px.

    Examples
    --------
    >>> check_mpp(0.25)
    0.25
    >>> check_mpp(-1)
    Traceback (most recent call last):
    ...
    wsi_mil.errors.ConfigError: --mpp must be a positive level-0 µm/px such as 0.25 (40×) or 0.5 (20×), got -1
    """
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"--mpp must be a positive level-0 µm/px such as 0.25 (40×) or 0.5 (20×), got {mpp:g}")
    return mpp


def tile_one(
    item: SlideInput, out: Path, cfg: TileConfig, mpp: float | None = None, overwrite: bool = False
) -> SlideOutcome:
    """Tile one slide unless it already has a complete patch file; the per-slide work of the stage.

    Parameters
    ----------
    item : SlideInput
        The slide (a CSV ``mpp`` wins over ``mpp``).
    out : Path
        Cohort folder.
    cfg : TileConfig
        Settings.
    mpp : float, optional
        Run-wide level-0 µm/px override.
    overwrite : bool
        Redo a slide that already has a complete patch file.

    Raises
    ------
    StaleOutputError
        Its patch file was made with other settings or from another file (and not ``overwrite``).
    """
    override, source = (item.mpp, "csv") if item.mpp is not None else (mpp, "cli")
    if not overwrite and is_tiled(out, item.slide_id):
        # Reused only if made from this very slide file with these settings; else refused.
        check_tiled(out, item.slide_id, tile_inputs(cfg, item.path, override))
        return SlideOutcome(item.slide_id, STAGE, "skipped")
    t0 = time.perf_counter()
    res = tile_slide(item.path, out, cfg, mpp=override, mpp_source=source, slide_id=item.slide_id)
    detail = f"mpp={res.mpp:g} ({res.mpp_source}); " + " ".join(f"{k}={v:.3f}s" for k, v in res.timings.items())
    if res.qc:
        detail += f"; {res.qc}"
    empty = res.state != "done"
    return SlideOutcome(
        item.slide_id,
        STAGE,
        res.state,
        reason="no tissue found: zero patches" if empty else "",
        n_patches=res.n_patches,
        seconds=time.perf_counter() - t0,
        detail=detail,
        note="no tissue found (zero patches)" if empty else "",
        result=res,
    )


@locks_output("wsi-mil tile")
def tile_cohort(
    slides: list[str | Path],
    out: str | Path,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = _quiet,
    progress: bool = True,
) -> CohortSummary:
    """Tile every slide; one bad slide is reported and does not stop the others.

    Parameters
    ----------
    slides : list
        Files, folders and CSVs (see :func:`~wsi_mil.harness.inputs.collect_slides`).
    out : path-like
        Cohort output folder; ``OUT/tile_config.yaml`` records the resolved settings.
    config : str or path, optional
        Preset name (``default``, ``biopsy``) or YAML file.
    overrides : mapping, optional
        Flag values (``None`` = not given).
    mpp : float, optional
        Run-wide level-0 µm/px override; a CSV ``mpp`` column wins for its slide.
    overwrite : bool
        Redo slides that already have a complete patch file.

    Examples
    --------
    >>> summary = tile_cohort(["slides/"], "out", config="biopsy")  # doctest: +SKIP
    """
    check_mpp(mpp)
    cfg = load_config(TileConfig, "tile", config, overrides)
    out = Path(out)
    inputs = collect_slides(list(slides))
    if not inputs:
        raise WsiMilError(f"no slides found in {', '.join(map(str, slides))}")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(Layout(out).tile_config, {"tile": cfg})
    summary = CohortSummary()
    by_id = {item.slide_id: item for item in inputs}
    run_slides(  # under OUT's lock (locks_output), as is the config written above
        out,
        STAGE,
        list(by_id),
        lambda sid: tile_one(by_id[sid], out, cfg, mpp=mpp, overwrite=overwrite),
        summary,
        echo=echo,
        progress=progress,
        label="tiling",
    )
    n_patches = sum(r.n_patches for r in summary.results.values())
    echo(f"tile: {len(summary.done)} done ({n_patches} patches), {len(summary.empty)} without tissue, "
         f"{len(summary.skipped)} already done, {len(summary.failed)} failed → {out}")
    return summary

