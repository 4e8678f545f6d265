"""Stage 2 over a cohort: every slide tiled in OUT, resumable, failures isolated per slide.

One process runs the slides one after another, starting the next slide's readers while the
current one's last batches run (:mod:`wsi_mil.features.lookahead`); with several encoders
each patch is read once for all of them (:mod:`wsi_mil.features.pipeline`); with several
devices one process per device takes slides from a shared queue
(:mod:`wsi_mil.features.devices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.config import dump_config, load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.features.extract import ExtractConfig, ExtractResult
from wsi_mil.features.lookahead import STAGE, Extractor, outcome, plan_slide
from wsi_mil.features.lookahead import slide_bar as _bar
from wsi_mil.harness.lock import locks_output
from wsi_mil.harness.runner import SlideOutcome, add_outcome, report
from wsi_mil.io.layout import Layout

if TYPE_CHECKING:
    from wsi_mil.features.runtime import Runner

__all__ = ["STAGE", "ExtractSummary", "extract_cohort", "extract_one", "make_runner"]


@dataclass
class ExtractSummary:
    """Outcome of extraction over a cohort.

    ``encoder``, ``features_dir`` and ``dim`` are those of the first encoder when several
    ran (``encoders``, ``features_dirs``, ``dims`` hold every one); ``events`` is the
    timeline of a one-process run (:class:`~wsi_mil.features.pipeline.Timeline`),
    ``processes`` what each device process of a ``devices`` run saw
    (:func:`~wsi_mil.features.devices.run_on_devices`).
    """

    encoder: str
    features_dir: Path
    dim: int = 0
    done: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, ExtractResult] = field(default_factory=dict)
    encoders: tuple[str, ...] = ()
    features_dirs: dict[str, Path] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)


def _quiet(_: str) -> None:
    pass


def make_runner(cfg: ExtractConfig, name: str) -> Runner:
    """Encoder ``name`` with ``cfg``'s weights, ready on ``cfg``'s device and precision."""
    from wsi_mil.features.registry import create_encoder
    from wsi_mil.features.runtime import Runner

    enc = create_encoder(name, weights=cfg.weights)
    return Runner(enc, cfg.device, cfg.precision, cfg.fold_bn, cfg.channels_last, cfg.compile)


def write_settings(out: Path, cfg: ExtractConfig, runners: Sequence[Runner]) -> None:
    """``OUT/features/<enc>/extract_config.yaml`` of each encoder, as a one-encoder run writes it."""
    layout = Layout(out)
    for r in runners:
        name = r.encoder.name
        layout.features_dir(name).mkdir(parents=True, exist_ok=True)
        dump_config(
            layout.extract_config(name),
            {"extract": dataclasses.replace(cfg, encoder=name), "encoder": {**r.encoder.attrs(), **r.describe()}},
        )


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
    devices: str | Sequence[str] | None = None,
) -> ExtractSummary:
    """Extract a feature bag for every slide tiled in ``OUT/patches``.

    Parameters
    ----------
    out : path-like
        Cohort folder (stage 1 output). Bags go to ``OUT/features/<encoder>/h5_files``,
        the resolved settings to ``OUT/features/<encoder>/extract_config.yaml``.
    encoder : str, optional
        Encoder name, or several separated by commas (one read, one bag each); overrides
        the config's.
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
    devices : str or sequence of str, optional
        Several devices (``"cuda:0,cuda:1"``, ``"cpu,cpu"``): one process per device, each
        seeing only its own GPU, slides handed out from a shared queue. One device is the
        same as ``device``.

    Examples
    --------
    >>> s = extract_cohort("out", "texture", echo=print)  # doctest: +SKIP
    >>> s.done, s.failed  # doctest: +SKIP
    >>> extract_cohort("out", "uni,virchow2", devices="cuda:0,cuda:1")  # doctest: +SKIP
    """
    from wsi_mil.features.decoding import check_decode
    from wsi_mil.features.devices import parse_devices, run_on_devices

    given = {**(overrides or {}), "encoder": encoder, "weights": weights}
    cfg = load_config(ExtractConfig, "extract", config, given)
    devs = parse_devices(devices) if devices else []
    if len(devs) == 1:
        cfg = dataclasses.replace(cfg, device=devs[0])
    out = Path(out)
    layout = Layout(out)
    patch_dir = layout.patches_dir
    ids = slide_ids if slide_ids is not None else sorted(p.stem for p in patch_dir.glob("*.h5"))
    if not ids:
        raise WsiMilError(f"{patch_dir}: no patch files; run `wsi-mil tile ... --out {out}` first")
    names = cfg.encoders
    dirs = {n: layout.features_dir(n) for n in names}
    summary = ExtractSummary(cfg.encoder, dirs[names[0]], encoders=names, features_dirs=dirs)

    def take(o: SlideOutcome) -> None:
        add_outcome(summary, o)
        report(o, echo)

    if len(devs) > 1:
        echo(f"extract: {len(ids)} slide(s) with {cfg.encoder}, one process per device: {','.join(devs)}")
        summary.processes = run_on_devices(
            out, ids, cfg, devs, overwrite=overwrite, on_outcome=take, echo=echo, dims=summary.dims
        )
    else:
        runners = [make_runner(cfg, n) for n in names]
        check_decode(cfg.decode, runners[0].device)
        write_settings(out, cfg, runners)  # under OUT's lock (locks_output)
        summary.dims.update({r.encoder.name: r.encoder.dim for r in runners})
        device = f"{runners[0].device.type} {runners[0].precision}"
        echo(f"extract: {len(ids)} slide(s) with {_describe(runners)} on {device}")
        ex = Extractor(out, runners, cfg, overwrite=overwrite, progress=progress)
        ex.run(ids, take)
        summary.events = ex.timeline.events
    summary.dim = summary.dims.get(names[0], 0)
    n = sum(r.n_patches for r in summary.results.values())
    where = ", ".join(str(d) for d in dirs.values())
    echo(
        f"extract: {len(summary.done)} done ({n} patches), {len(summary.empty)} empty, "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed → {where}"
    )
    return summary


def _describe(runners: Sequence[Runner]) -> str:
    return ", ".join(f"{r.encoder.name} ({r.encoder.weights_id}, {r.encoder.dim}-d)" for r in runners)


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
    from wsi_mil.features.pipeline import SlideReader, encode_slide

    targets, patches = plan_slide(Path(out), sid, [runner], cfg, overwrite)
    if not targets:
        return SlideOutcome(sid, STAGE, "skipped")
    reader = SlideReader(Layout(out).patches(sid), [runner], cfg, patches=patches)
    with _bar(sid, reader.n, progress) as tick:
        return outcome(encode_slide(reader, targets, progress=tick))
