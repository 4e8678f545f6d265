"""Stage 1 over many slides: skip done ones, isolate failures, record status, summarise."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.cohort import status
from wsi_mil.cohort.inputs import collect_slides
from wsi_mil.config import dump_config, load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.tiling.run import TileConfig, TileResult, is_tiled, tile_slide

STAGE = "tile"


@dataclass
class CohortSummary:
    """Outcome of a stage over a cohort."""

    done: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, TileResult] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


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
        Files, folders and CSVs (see :func:`~wsi_mil.cohort.inputs.collect_slides`).
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
    cfg = load_config(TileConfig, "tile", config, overrides)
    out = Path(out)
    inputs = collect_slides(list(slides))
    if not inputs:
        raise WsiMilError(f"no slides found in {', '.join(map(str, slides))}")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(out / "tile_config.yaml", {"tile": cfg})
    summary = CohortSummary()
    for item in _progress(inputs, "tiling", progress):
        if not overwrite and is_tiled(out, item.slide_id):
            summary.skipped.append(item.slide_id)
            continue
        t0 = time.perf_counter()
        override, source = (item.mpp, "csv") if item.mpp is not None else (mpp, "cli")
        try:
            res = tile_slide(item.path, out, cfg, mpp=override, mpp_source=source, slide_id=item.slide_id)
        except WsiMilError as exc:
            reason = getattr(exc, "reason", str(exc))
            summary.failed[item.slide_id] = reason
            status.record(out, item.slide_id, STAGE, "failed", reason=reason, seconds=time.perf_counter() - t0)
            echo(f"{item.slide_id}: failed: {reason}")
            continue
        except Exception as exc:  # an unexpected bug must not stop the cohort either
            reason = f"{type(exc).__name__}: {exc}"
            summary.failed[item.slide_id] = reason
            status.record(out, item.slide_id, STAGE, "failed", reason=reason, seconds=time.perf_counter() - t0)
            echo(f"{item.slide_id}: failed: {reason}")
            continue
        summary.results[item.slide_id] = res
        (summary.done if res.state == "done" else summary.empty).append(item.slide_id)
        detail = f"mpp={res.mpp:g} ({res.mpp_source}); " + " ".join(f"{k}={v:.3f}s" for k, v in res.timings.items())
        status.record(out, item.slide_id, STAGE, res.state, n_patches=res.n_patches,
                      seconds=time.perf_counter() - t0, detail=detail,
                      reason="" if res.state == "done" else "no tissue found: zero patches")
        if res.state == "empty":
            echo(f"{item.slide_id}: no tissue found (zero patches)")
    n_patches = sum(r.n_patches for r in summary.results.values())
    echo(f"tile: {len(summary.done)} done ({n_patches} patches), {len(summary.empty)} without tissue, "
         f"{len(summary.skipped)} already done, {len(summary.failed)} failed → {out}")
    return summary


def _progress(items: list[Any], label: str, enabled: bool) -> Any:
    if not enabled or len(items) < 2:
        return items
    from rich.progress import track

    return track(items, description=label, transient=True)
