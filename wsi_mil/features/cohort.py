"""Stage 2 over a cohort: every slide tiled in OUT, resumable, failures isolated per slide."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.config import dump_config, load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.features.extract import (
    ExtractConfig,
    ExtractResult,
    bag_inputs,
    extract_slide,
    is_extracted,
)
from wsi_mil.harness.lock import locks_output
from wsi_mil.harness.runner import SlideOutcome, run_slides
from wsi_mil.io import h5
from wsi_mil.io.layout import Layout
from wsi_mil.io.provenance import check

if TYPE_CHECKING:
    from wsi_mil.features.runtime import Runner

STAGE = "extract"


@dataclass
class ExtractSummary:
    """Outcome of extraction over a cohort."""

    encoder: str
    features_dir: Path
    dim: int = 0
    done: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, ExtractResult] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


@locks_output("wsi-mil extract", create=False)
def extract_cohort(
    out: str | Path,
    encoder: str | None = None,
    *,
    weights: str | None = None,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    slide_ids: list[str] | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = _quiet,
    progress: bool = True,
) -> ExtractSummary:
    """Extract a feature bag for every slide tiled in ``OUT/patches``.

    Parameters
    ----------
    out : path-like
        Cohort folder (stage 1 output). Bags go to ``OUT/features/<encoder>/h5_files``,
        the resolved settings to ``OUT/features/<encoder>/extract_config.yaml``.
    encoder : str, optional
        Encoder name (overrides the config's).
    weights : str, optional
        ``"random"`` or a local weights file (overrides the config's; None = pretrained).
    config : str or path, optional
        Preset name or YAML file (default ``configs/extract/default.yaml``).
    overrides : mapping, optional
        Other :class:`ExtractConfig` fields from flags (``None`` = not given).
    slide_ids : list of str, optional
        Only these slides (default: every ``OUT/patches/*.h5``).
    overwrite : bool
        Redo slides that already have a complete bag.
    echo : callable
        Receives one-line messages (failures, the summary).
    progress : bool
        Show a progress bar per slide.

    Examples
    --------
    >>> s = extract_cohort("out", "texture", echo=print)  # doctest: +SKIP
    >>> s.done, s.failed  # doctest: +SKIP
    """
    from wsi_mil.features.registry import create_encoder
    from wsi_mil.features.runtime import Runner

    given = {**(overrides or {}), "encoder": encoder, "weights": weights}
    cfg = load_config(ExtractConfig, "extract", config, given)
    out = Path(out)
    layout = Layout(out)
    patch_dir = layout.patches_dir
    ids = slide_ids if slide_ids is not None else sorted(p.stem for p in patch_dir.glob("*.h5"))
    if not ids:
        raise WsiMilError(f"{patch_dir}: no patch files; run `wsi-mil tile ... --out {out}` first")
    enc = create_encoder(cfg.encoder, weights=cfg.weights)
    runner = Runner(enc, cfg.device, cfg.precision, cfg.fold_bn, cfg.channels_last, cfg.compile)
    feat_dir = layout.features_dir(cfg.encoder)
    feat_dir.mkdir(parents=True, exist_ok=True)
    dump_config(
        layout.extract_config(cfg.encoder),
        {
            "extract": cfg,
            "encoder": {**enc.attrs(), **runner.describe()},
        },
    )
    summary = ExtractSummary(cfg.encoder, feat_dir, enc.dim)
    echo(
        f"extract: {len(ids)} slide(s) with {cfg.encoder} ({enc.weights_id}, {enc.dim}-d) on "
        f"{runner.device.type} {runner.precision}"
    )
    run_slides(  # under OUT's lock (locks_output), as is the config written above
        out,
        STAGE,
        ids,
        lambda sid: extract_one(out, sid, runner, cfg, overwrite=overwrite, progress=progress),
        summary,
        echo=echo,
        progress=False,  # one bar per slide's patches instead
    )
    n = sum(r.n_patches for r in summary.results.values())
    echo(
        f"extract: {len(summary.done)} done ({n} patches), {len(summary.empty)} empty, "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed → {feat_dir}"
    )
    return summary


def extract_one(
    out: Path, sid: str, runner: Runner, cfg: ExtractConfig, overwrite: bool = False, progress: bool = False
) -> SlideOutcome:
    """Extract one slide's bag unless a complete one exists; the per-slide work of the stage.

    Parameters
    ----------
    out : Path
        Cohort folder.
    sid : str
        Slide id (``OUT/patches/<sid>.h5`` must exist).
    runner : Runner
        The prepared encoder.
    cfg : ExtractConfig
        Settings.
    overwrite : bool
        Redo a slide that already has a complete bag.
    progress : bool
        Show a bar over the slide's patches.
    """
    layout = Layout(out)
    pfile = layout.patches(sid)
    bag = layout.bag(cfg.encoder, sid)
    pt = layout.pt(cfg.encoder, sid)
    patches = h5.read_patches(pfile)  # read once: its row count and its provenance
    n_tiled = len(patches.coords)
    pt_ok = not cfg.pt or pt.exists()
    if not overwrite and is_extracted(bag):
        # A finished bag is reused only if made from this patch file with this encoder,
        # weights and precision; one made differently is refused, naming what changed.
        check(sid, bag, h5.read_bag(bag, load_features=False).attrs, bag_inputs(patches.attrs, runner))
        if pt_ok and is_extracted(bag, runner.encoder.weights_id, n_tiled):
            return SlideOutcome(sid, STAGE, "skipped")
    with _bar(sid, n_tiled, progress) as tick:
        res = extract_slide(
            pfile, bag, runner, cfg, pt=pt if cfg.pt else None, progress=tick
        )
    detail = f"{res.patches_per_s:.1f} patches/s; {cfg.encoder}"
    note = ""
    if res.n_unreadable:
        detail += f"; {res.n_unreadable} unreadable patches dropped"
        note = f"{res.n_unreadable} unreadable patch(es) dropped from the bag"
    return SlideOutcome(
        sid,
        STAGE,
        res.state,
        reason="" if res.state == "done" else "no patches to extract",
        n_patches=res.n_patches,
        seconds=res.seconds,
        detail=detail,
        note=note,
        result=res,
    )


class _bar:  # noqa: N801 - used like a function
    """A transient rich progress bar over one slide's patches (a no-op when disabled)."""

    def __init__(self, sid: str, total: int, enabled: bool) -> None:
        self.sid, self.total, self.enabled = sid, total, enabled and total > 0
        self._p: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.start()
        task = self._p.add_task(f"extract {self.sid}", total=self.total)
        return lambda done: self._p.update(task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()
