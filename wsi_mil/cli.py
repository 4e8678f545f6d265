"""The ``wsi-mil`` command line: thin typed functions over the library.

Heavy imports (torch, OpenSlide, h5py) happen inside the commands, so ``wsi-mil --help``
is instant. A :class:`~wsi_mil.errors.WsiMilError` becomes one line on stderr and exit
code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from wsi_mil.errors import WsiMilError
from wsi_mil.mil.registry import HANDWRITTEN_MODELS, ZOO_MODELS  # names only: no torch

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="wsi-mil",
    help="Whole-slide pipeline: tile → extract → train (loss-based attention MIL) → predict / heatmap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", help="YAML file or preset name (configs/<stage>/); flags override it."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Cohort output folder.")]


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


def err(message: str) -> None:
    """Print one line to stderr."""
    typer.echo(message, err=True)


def handles_errors(fn: F) -> F:
    """Turn any error into one line on stderr and exit 1 (the traceback only with --debug).

    A :class:`WsiMilError` is the user's to fix and printed as it is; anything else is a
    bug of wsi-mil, printed as one line that says so.
    """
    import click

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            ctx = click_context()
            if ctx is not None and (ctx.find_root().obj or {}).get("debug"):
                raise
            text = " ".join(str(exc).split())  # one line, whatever the message held
            if not isinstance(exc, WsiMilError):
                text = f"unexpected {type(exc).__name__}: {text} (a bug in wsi-mil; --debug shows the traceback)"
            err(f"error: {text}")
            raise typer.Exit(1) from exc

    return wrapper  # type: ignore[return-value]


def click_context() -> Any:
    """The current click context, if any."""
    import click

    return click.get_current_context(silent=True)


@app.command(epilog="Example: wsi-mil tile slides/ extra.csv --out cohort --config biopsy")
@handles_errors
def tile(
    slides: Annotated[
        list[str], typer.Argument(help="Slide files, folders, or CSVs with a 'path' column (optional 'mpp').")
    ],
    out: OutOpt,
    config: ConfigOpt = None,
    backend: Annotated[str | None, typer.Option(help="Slide reader: auto (default), openslide or tiffslide.")] = None,
    mpp: Annotated[
        float | None, typer.Option(help="Level-0 µm/px for slides without metadata (a CSV 'mpp' column wins).")
    ] = None,
    patch_size: Annotated[int | None, typer.Option(help="Patch side in px at --target-mpp (default 256).")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="µm/px of the patches (default 0.5, i.e. 20×).")] = None,
    overlap: Annotated[float | None, typer.Option(help="Overlap between neighbouring patches, in [0, 1).")] = None,
    min_tissue: Annotated[float | None, typer.Option(help="Minimum tissue share of a kept patch.")] = None,
    qc: Annotated[
        str | None, typer.Option(help="Patch QC (blur, fold, debris): on (preset default) or off (keep every patch).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo slides already tiled.")] = False,
) -> None:
    """Stage 1: segment tissue and tile patches in µm; writes patches/, masks/, thumbnails/."""
    from wsi_mil.errors import ConfigError
    from wsi_mil.tiling.cohort import tile_cohort

    if qc not in (None, "on", "off"):
        raise ConfigError(f"--qc must be on or off, got {qc!r}")
    overrides = {
        "backend": backend,
        "patch_size": patch_size,
        "target_mpp": target_mpp,
        "overlap": overlap,
        "min_tissue": min_tissue,
        "qc.enabled": None if qc is None else qc == "on",
    }
    summary = tile_cohort(
        slides, out, config=config, overrides=overrides, mpp=mpp, overwrite=overwrite, echo=typer.echo
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command(
    epilog="Examples: wsi-mil extract --out cohort --encoder resnet50_trunc --weights r50.safetensors\n\n"
    "wsi-mil extract --out cohort --encoder texture   (built-in, no download)\n\n"
    "wsi-mil extract --out cohort --encoder uni,virchow2 --devices cuda:0,cuda:1   (one read, two bags; two GPUs)"
)
@handles_errors
def extract(
    out: OutOpt,
    encoder: Annotated[
        str | None,
        typer.Option(
            help="resnet50_trunc (default), texture, timm:<model>, hf-hub:<org>/<model>; several separated by "
            "commas read each patch once and write one bag per encoder."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Local .safetensors/.pth file, or 'random'; default: pretrained (needs network or cache)."),
    ] = None,
    config: ConfigOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per forward pass (default 64).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Reader processes, each with its own slide handle (default -1: 2 on CPU, up to 8 on GPU)."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")] = None,
    devices: Annotated[
        str | None,
        typer.Option(help="Several devices, e.g. cuda:0,cuda:1 (or cpu,cpu): one process each, slides shared out."),
    ] = None,
    precision: Annotated[str | None, typer.Option(help="auto (GPU: bf16/fp16; CPU: fp32), fp32, bf16, fp16.")] = None,
    backend: Annotated[str | None, typer.Option(help="Slide reader: auto (default), openslide or tiffslide.")] = None,
    decode: Annotated[
        str | None, typer.Option(help="Patch decoding: cpu (reader processes, default), gpu, auto (gpu on CUDA).")
    ] = None,
    pt: Annotated[bool | None, typer.Option("--pt/--no-pt", help="Also write CLAM's pt_files/<id>.pt.")] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile", help="torch.compile the encoder (about 10% faster on CPU, ~40 s to start)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo slides that already have a complete bag.")] = False,
) -> None:
    """Stage 2: encode every tiled patch; writes features/<encoder>/h5_files/<id>.h5."""
    from wsi_mil.features.cohort import extract_cohort

    overrides = {
        "batch_size": batch_size,
        "workers": workers,
        "device": device,
        "precision": precision,
        "backend": backend,
        "decode": decode,
        "pt": pt,
        "compile": compile,
    }
    summary = extract_cohort(
        out, encoder, weights=weights, config=config, overrides=overrides, overwrite=overwrite, echo=typer.echo,
        devices=devices,
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command(
    epilog="Examples: wsi-mil train --out cohort --labels labels.csv\n\n"
    "wsi-mil train --out cohort --labels labels.csv --encoder resnet50_trunc --model attention --folds 10"
)
@handles_errors
def train(
    out: OutOpt,
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", "-l", help="CSV slide_id,label (or case_id,slide_id,label); labels may be class names."
        ),
    ],
    encoder: Annotated[
        str | None, typer.Option(help="Feature folder under OUT/features (default: the only one there).")
    ] = None,
    config: ConfigOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="loss_attention (default); hand-written: "
            + ", ".join(HANDWRITTEN_MODELS[1:])
            + "; torchmil (binary tasks): "
            + ", ".join(ZOO_MODELS)
            + " (docs/mil_zoo.md)."
        ),
    ] = None,
    folds: Annotated[int | None, typer.Option(help="Outer cross-validation folds (default 5).")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs per fold; the epoch is chosen on validation (default 50).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-4).")] = None,
    lam: Annotated[
        float | None, typer.Option("--lambda", help="λ, weight of the attention-weighted instance loss (default 0.1).")
    ] = None,
    omega: Annotated[
        float | None, typer.Option(help="ω, weight of the attention consistency cost (default 0 = off).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of splits and initialisation (default 0).")] = None,
    run_name: Annotated[
        str | None, typer.Option(help="Folder name under OUT/models (default <encoder>_<model>_<time>).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA if present), cpu, cuda.")] = None,
) -> None:
    """Stage 3: cross-validate the loss-attention MIL head; writes OUT/models/<run>/."""
    from wsi_mil.mil.config import load_train_config
    from wsi_mil.mil.train import resolve_encoder, train_run

    overrides = {
        "model.name": model,
        "cv.folds": folds,
        "optim.epochs": epochs,
        "optim.lr": lr,
        "model.lam": lam,
        "optim.omega": omega,
        "cv.seed": seed,
        "run_name": run_name,
        "device": device,
    }
    cfg = load_train_config(config or "default", overrides)
    enc = resolve_encoder(out, encoder)
    run_dir = train_run(out, labels, enc, cfg)
    from wsi_mil.io.run_folder import read_metrics

    summary = read_metrics(run_dir)["summary"]
    scores = ", ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in summary.items())
    typer.echo(f"trained {cfg.model.name} on {enc} ({cfg.cv.folds}-fold CV: {scores}): {run_dir}")


ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="A trained run: OUT/models/<run> (its pipeline.yaml gives the settings).")
]
ScoreOpt = Annotated[
    str | None, typer.Option(help="What the overlays show: attention (default) or a class name (its probability).")
]
ZarrOpt = Annotated[bool | None, typer.Option("--zarr/--no-zarr", help="Also write the OME-Zarr pyramid.")]
HeatmapConfigOpt = Annotated[
    str | None, typer.Option("--config", help="Heatmap YAML file or preset (configs/heatmap/); flags override it.")
]


def _heatmap_overrides(score: str | None, zarr: bool | None, smooth_um: float | None) -> dict[str, Any]:
    return {"score": score, "zarr": zarr, "smooth_um": smooth_um}


@app.command(
    epilog="Examples: wsi-mil predict new_slides/ --model cohort/models/run1 --out diagnosis\n\n"
    "wsi-mil predict a.svs b.svs --model cohort/models/run1 --out diagnosis --score tumour --zarr"
)
@handles_errors
def predict(
    slides: Annotated[
        list[str], typer.Argument(help="Slide files, folders, or CSVs with a 'path' column (optional 'mpp').")
    ],
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for patches, bags, heatmaps, predictions.")],
    mpp: Annotated[float | None, typer.Option(help="Level-0 µm/px for slides without metadata.")] = None,
    config: HeatmapConfigOpt = None,
    score: ScoreOpt = None,
    zarr: ZarrOpt = None,
    smooth_um: Annotated[float | None, typer.Option(help="Gaussian smoothing of the overlays, σ in µm.")] = None,
    device: Annotated[str | None, typer.Option(help="Extraction device: auto, cpu, cuda, cuda:N.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per forward pass at extraction.")] = None,
    workers: Annotated[int | None, typer.Option(help="Reader processes at extraction.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo slides already tiled and extracted in --out.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Stage 4: diagnose new slides with a trained run; writes predictions.csv and heatmaps/<run>/.

    Slides are tiled and extracted exactly as the run's training bags were. Exit 1 if any
    slide failed (it is listed in predictions.csv with its reason; the others complete).
    """
    from wsi_mil.predict import predict_cohort

    summary = predict_cohort(
        slides,
        model,
        out,
        mpp=mpp,
        heatmap_config=config,
        heatmap_overrides=_heatmap_overrides(score, zarr, smooth_um),
        extract_overrides={"device": device, "batch_size": batch_size, "workers": workers},
        overwrite=overwrite,
        echo=typer.echo,
        progress=progress,
    )
    for row in summary.rows:
        if row.get("status") == "ok":
            probs = ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("prob_"))
            typer.echo(f"{row['slide_id']}: {row['prediction']} ({probs}; {row['n_patches']} patches)")
    if summary.failed:
        raise typer.Exit(1)


@app.command(
    epilog="Examples: wsi-mil heatmap --out cohort --model cohort/models/run1\n\n"
    "wsi-mil heatmap --out cohort --model cohort/models/run1 --slides case-1,case-7 --score tumour --zarr"
)
@handles_errors
def heatmap(
    out: OutOpt,
    model: ModelOpt,
    slides: Annotated[
        str | None, typer.Option(help="Comma-separated slide ids (default: every bag of the run's encoder).")
    ] = None,
    config: HeatmapConfigOpt = None,
    score: ScoreOpt = None,
    zarr: ZarrOpt = None,
    smooth_um: Annotated[float | None, typer.Option(help="Gaussian smoothing of the overlays, σ in µm.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """Heatmaps of slides whose bags are in OUT; writes heatmaps/<run>/ and its index.csv. Exit 1 on any failure."""
    from wsi_mil.predict import heatmap_cohort

    ids = [s.strip() for s in slides.split(",") if s.strip()] if slides else None
    summary = heatmap_cohort(
        out,
        model,
        slide_ids=ids,
        heatmap_config=config,
        heatmap_overrides=_heatmap_overrides(score, zarr, smooth_um),
        echo=typer.echo,
        progress=progress,
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command(
    epilog="Examples: wsi-mil run configs/cohort/example.yaml\n\n"
    "wsi-mil run cohort.yaml --scheduler tcp://10.0.0.5:8786 --retry-failed\n\n"
    "wsi-mil run cohort.yaml --stages tile,extract --scheduler sequential"
)
@handles_errors
def run(
    config: Annotated[Path, typer.Argument(help="Cohort config (see configs/cohort/example.yaml, docs/cohort.md).")],
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Dask scheduler address or scheduler .json file; 'sequential' runs in this process "
            "(default: the config's, else an embedded LocalCluster)."
        ),
    ] = None,
    retry_failed: Annotated[bool, typer.Option(help="Also redo slides that failed in an earlier run.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Redo tiles and bags made with other settings or from another slide file.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (overrides the config's).")] = None,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated subset of tile,extract,train,heatmap,predict.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
) -> None:
    """All stages over a cohort on Dask, one task per slide; re-running resumes. Exit 1 if any slide failed."""
    from wsi_mil.cohort import load_cohort_config, run_cohort

    cfg = load_cohort_config(config, {"out": out, "stages": stages})
    summary = run_cohort(
        cfg, scheduler=scheduler, retry_failed=retry_failed, overwrite=overwrite, echo=typer.echo, progress=progress
    )
    if not summary.ok:
        raise typer.Exit(1)


@app.command(epilog="Example: wsi-mil demo --out demo_out")
@handles_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo cohort goes.")] = Path("demo_out"),
    n_slides: Annotated[int, typer.Option(help="Number of synthetic slides.")] = 24,
    n_heldout: Annotated[int, typer.Option(help="Slides held out for prediction (the last ones).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic slides.")] = 0,
    size: Annotated[str, typer.Option(help="Level-0 size of each slide, WIDTHxHEIGHT.")] = "6144x4608",
    epochs: Annotated[int, typer.Option(help="Training epochs per fold.")] = 30,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 4,
) -> None:
    """The embedded default: synthetic slides → tile → extract → train → predict held-out → heatmaps.

    Re-running with the same options resumes; other options regenerate the slides or retrain.
    """
    from wsi_mil.demo import run_demo
    from wsi_mil.errors import ConfigError

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected WIDTHxHEIGHT such as 6144x4608, got {size!r}") from None
    if min(w, h) < 1024:
        raise ConfigError(f"--size: slides need at least 1024 px a side, got {size}")
    # Bars only on a terminal: in a log (CI, `make demo > log`) they are blank lines.
    run_demo(
        out, n_slides=n_slides, n_heldout=n_heldout, epochs=epochs, folds=folds, slide_size=(w, h), seed=seed,
        echo=typer.echo, progress=sys.stdout.isatty(),
    )


@app.command(
    epilog="Examples: wsi-mil view demo_out\n\nwsi-mil view cohort --run texture_loss_attention_0101 --port 8800 --open"
)
@handles_errors
def view(
    out: Annotated[Path, typer.Argument(help="Cohort output folder (OUT) with heatmaps/<run>/.")],
    host: Annotated[
        str, typer.Option(help="Interface to bind; 127.0.0.1 keeps the slides private to this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    run: Annotated[str | None, typer.Option(help="Heatmap run under OUT/heatmaps (default: the newest).")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser.")] = False,
    backend: Annotated[str, typer.Option(help="Slide reader of the tiles: auto, openslide or tiffslide.")] = "auto",
    colormap: Annotated[str, typer.Option(help="matplotlib colormap of the overlay.")] = "jet",
    token: Annotated[
        str | None,
        typer.Option(
            envvar="WSI_MIL_VIEW_TOKEN",
            help="Access token (16+ URL-safe characters). Off loopback one is generated when not given.",
        ),
    ] = None,
    max_open: Annotated[int, typer.Option(min=1, help="Slides kept open at once.")] = 8,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Worker threads of the tiles (default: 4 per core, 8 to 32).")
    ] = None,
) -> None:
    """Local, read-only web viewer: slides with heatmap overlays, patch scores, top-k patches.

    Bound to anything but loopback it answers only requests with its access token, printed in
    the address as ?token=... (as Jupyter does).
    """
    from wsi_mil.viewer import serve

    serve(
        out, host, port, run, open_browser, backend=backend, colormap=colormap, token=token, max_open=max_open,
        threads=threads, echo=typer.echo,
    )  # fmt: skip


@app.command(
    epilog="Examples: wsi-mil evaluate --heatmaps cohort/heatmaps/run1 --annotations annotations --out eval\n\n"
    "wsi-mil evaluate --heatmaps cohort/heatmaps/run1 --annotations camelyon16_xml --out eval --threshold 0.9\n\n"
    "wsi-mil evaluate --heatmaps cohort/heatmaps/run1 --annotations qupath --out eval --class Tumor"
)
@handles_errors
def evaluate(
    heatmaps: Annotated[Path, typer.Option("--heatmaps", help="A run's heatmap folder, OUT/heatmaps/<run>.")],
    annotations: Annotated[
        Path,
        typer.Option(
            "--annotations", help="Folder of <slide_id>.geojson / .xml / .png / .tif; a slide without one is negative."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where summary.json, per_slide.csv and the plots go.")],
    classes: Annotated[
        list[str] | None,
        typer.Option("--class", help="Positive annotation class (repeatable; default: any annotation)."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Dice threshold (probabilities; attention / its slide's max). Default 0.5.")
    ] = None,
    mask_mpp: Annotated[float | None, typer.Option("--mask-mpp", help="µm/px of mask images.")] = None,
    slides: Annotated[
        str | None, typer.Option(help="Comma-separated slide ids (default: every heatmap file).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", help="Evaluate YAML file or preset (configs/evaluate/); flags override it."),
    ] = None,
) -> None:
    """Localisation scored against annotations: patch AUC, average precision, lesion FROC, dice (docs/evaluate.md)."""
    from wsi_mil.evaluate import evaluate as run_evaluate
    from wsi_mil.evaluate import load_evaluate_config

    overrides = {"classes": tuple(classes) if classes else None, "threshold": threshold, "mask_mpp": mask_mpp}
    cfg = load_evaluate_config(config, overrides)
    ids = [s.strip() for s in slides.split(",") if s.strip()] if slides else None
    ev = run_evaluate(heatmaps, annotations, out, cfg, echo=typer.echo, slide_ids=ids)
    n_pos = sum(s.positive for s in ev.slides)
    typer.echo(f"{len(ev.slides)} slides ({n_pos} positive) → {out}")
    for name, m in ev.summary.items():
        typer.echo(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


@app.command(epilog="Examples: wsi-mil encoders\n\nwsi-mil encoders --json > encoders.json")
@handles_errors
def encoders(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets as JSON instead of a table.")] = False,
) -> None:
    """The encoder presets: width, input size, native mpp, hub repo, gated, licence (docs/encoders.md).

    Use a name with `wsi-mil extract --encoder NAME`; `--weights random` builds it offline,
    `--weights PATH` loads its published state dict (strictly).
    """
    import json

    from wsi_mil.features.presets import preset_rows

    rows = preset_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    cols = ("name", "dim", "input_size", "native_mpp", "pooling", "params", "hub_repo", "gated", "licence")
    heads = ("name", "D", "input", "mpp", "pooling", "params", "hub repo", "gated", "licence")
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    for row in (list(heads), *cells):
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    typer.echo("Also: resnet50_trunc, texture, timm:<model>, hf-hub:<org>/<model>; sources: docs/encoders.md.")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="wsi-mil")


if __name__ == "__main__":  # pragma: no cover
    main()
