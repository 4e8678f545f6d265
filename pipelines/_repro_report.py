"""Turn saved reproduction jobs into docs/reproduction.md tables, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PAPER = {  # Shi et al. 2020, Table 1: loss attention, attention MIL (Ilse 2018)
    "musk1": (0.917, 0.066, 0.892),
    "musk2": (0.911, 0.063, 0.858),
    "elephant": (0.900, 0.069, 0.868),
}
TARGET_HONEST = {"musk1": 0.89, "musk2": 0.86, "elephant": 0.87}
NAMES = {
    "loss_attention": "loss attention",
    "attention": "attention MIL",
    "gated_attention": "gated attention MIL",
}


def _bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy per epoch; p (E, n), y (n,)."""
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)


def _first_best(err: np.ndarray, loss: np.ndarray) -> int:
    """Epoch with the lowest error, ties broken by the lowest loss (then the earliest)."""
    return int(np.lexsort((np.arange(len(err)), loss, err))[0])


def published_scores(z: dict) -> dict[str, list[float]]:
    """Per fold: best test accuracy over epochs, and test accuracy at the last epoch."""
    y = z["y"]
    best, last = [], []
    for p, te in zip(z["probs"], z["eval_sets"], strict=True):
        acc = ((p.astype(np.float32) > 0.5) == y[te]).mean(1)  # (E,)
        best.append(float(acc.max()))
        last.append(float(acc[-1]))
    return {"best_test_epoch": best, "last_epoch": last}


def honest_scores(z: dict) -> dict[str, list[float]]:
    """Per outer fold: val-split single model, inner-CV ensemble, ensemble at last epoch."""
    y, meta = z["y"], z["meta"]
    out: dict[str, list[float]] = {"val_split": [], "inner_cv_ensemble": [], "ensemble_last": []}
    keys = sorted({(int(r), int(k)) for r, k, *_ in meta})
    for r, k in keys:
        members = [i for i, m in enumerate(meta) if m[0] == r and m[1] == k]
        errs, losses, tests = [], [], []
        for i in members:
            n_val = int(meta[i][4])
            p = z["probs"][i].astype(np.float32)  # (E, n_val + n_test)
            es = z["eval_sets"][i]
            pv, yv = p[:, :n_val], y[es[:n_val]]
            errs.append(((pv > 0.5) != yv).mean(1))
            losses.append(_bce(pv, yv))
            tests.append(p[:, n_val:])
        y_te = y[z["eval_sets"][members[0]][int(meta[members[0]][4]) :]]
        e0 = _first_best(errs[0], losses[0])
        out["val_split"].append(float(((tests[0][e0] > 0.5) == y_te).mean()))
        e = _first_best(np.mean(errs, 0), np.mean(losses, 0))
        ens = np.mean(tests, 0)  # (E, n_test)
        out["inner_cv_ensemble"].append(float(((ens[e] > 0.5) == y_te).mean()))
        out["ensemble_last"].append(float(((ens[-1] > 0.5) == y_te).mean()))
    return out


def _fmt(v: list[float] | None) -> str:
    if not v:
        return "—"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}"


def benchmark_tables(results: Path) -> tuple[str, dict]:
    """Markdown table and JSON of every benchmark job found in ``results``."""
    lines = [
        "| dataset | model | paper | as published: best test epoch | published setup, epoch 100 "
        "| honest: val split | **honest: inner CV + ensemble** | honest: ensemble, epoch 100 "
        "| folds | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    js: dict = {}
    for d in ("musk1", "musk2", "elephant"):
        for a in ("loss_attention", "attention", "gated_attention"):
            pub_p, hon_p = results / f"{d}_{a}_published.npz", results / f"{d}_{a}_honest.npz"
            pubz_p = results / f"{d}_{a}_published_z.npz"
            # An empty file is a placeholder for a job not run (the runner skips it).
            pub_p, hon_p, pubz_p = (
                p if p.exists() and p.stat().st_size else results / "absent"
                for p in (pub_p, hon_p, pubz_p)
            )
            if not (pub_p.exists() or hon_p.exists() or pubz_p.exists()):
                continue
            paper = (
                PAPER[d][0] if a == "loss_attention" else PAPER[d][2] if a == "attention" else None
            )
            paper_s = "—" if paper is None else f"{paper:.3f}"
            if a == "loss_attention":
                paper_s += f" ± {PAPER[d][1]:.3f}"
            entry: dict = {"paper": paper, "train_seconds": 0.0}
            variants = [("", pub_p, hon_p), (" (z-scored input)", pubz_p, None)]
            for suffix, pp, hp in variants:
                pub = hon = None
                secs, folds = 0.0, []
                if pp.exists():
                    z = np.load(pp, allow_pickle=True)
                    pub = published_scores(z)
                    secs += float(z["seconds"])
                    folds.append(f"{len(pub['last_epoch'])} pub")
                if hp is not None and hp.exists():
                    z = np.load(hp, allow_pickle=True)
                    hon = honest_scores(z)
                    secs += float(z["seconds"])
                    folds.append(f"{len(hon['val_split'])} hon")
                if pub is None and hon is None:
                    continue
                lines.append(
                    f"| {d.upper()} | {NAMES[a]}{suffix} | {paper_s} "
                    f"| {_fmt(pub and pub['best_test_epoch'])} "
                    f"| {_fmt(pub and pub['last_epoch'])} | {_fmt(hon and hon['val_split'])} "
                    f"| {_fmt(hon and hon['inner_cv_ensemble'])} "
                    f"| {_fmt(hon and hon['ensemble_last'])} | {', '.join(folds)} "
                    f"| {secs / 60:.1f} min |"
                )
                tag = "published_z" if suffix else "published"
                entry.update({f"{tag}_{k}": v for k, v in (pub or {}).items()})
                entry.update({f"honest_{k}": v for k, v in (hon or {}).items()})
                entry["train_seconds"] += secs
            js[f"{d}/{a}"] = entry
    return "\n".join(lines), js


def digits_tables(results: Path, docs: Path) -> str:
    """Markdown for the digit-bag experiment, and the λ-sweep plot."""
    path = results / "digits.json"
    if not path.exists():
        return "_digit-bag experiment not run_\n"
    data = json.loads(path.read_text())
    rows = data["rows"]

    def agg(arch: str, lam: float | None, size: int, key: str, sub: str | None = None):
        v = [
            (r[key][sub] if sub else r[key])
            for r in rows
            if r["arch"] == arch and r["lam"] == lam and r["train_bags"] == size
        ]
        return (float(np.mean(v)), float(np.std(v))) if v else (np.nan, np.nan)

    sizes = sorted({r["train_bags"] for r in rows})
    out = [
        f"{data['repeats']} repeats, {data['epochs']} epochs, {data['n_test']} test bags; "
        "mean ± std over repeats.\n",
        "| train bags | model | bag AUC | att>0.5 P / R / F1 | att/max>0.5 P / R / F1 "
        "| softmax(z_t)>0.5 P / R / F1 |",
        "|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for arch, lam in (("loss_attention", 0.1), ("attention", None), ("gated_attention", None)):
            cells = []
            for key in ("att_gt_0.5", "att_rel_gt_0.5", "inst_prob_gt_0.5"):
                cells.append(
                    " / ".join(
                        f"{agg(arch, lam, size, key, s)[0]:.2f}"
                        for s in ("precision", "recall", "f1")
                    )
                )
            auc = agg(arch, lam, size, "bag_auc")
            name = NAMES[arch] + (f" (λ={lam})" if lam is not None else "")
            out.append(
                f"| {size} | {name} | {auc[0]:.3f} ± {auc[1]:.3f} | " + " | ".join(cells) + " |"
            )
    lams = sorted({r["lam"] for r in rows if r["arch"] == "loss_attention"})
    out += [
        "",
        "λ sweep (loss attention): bag AUC, and F1 of instances with attention > 0.5:",
        "",
        "| λ | " + " | ".join(f"{s} bags: AUC / F1" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for lam in lams:
        out.append(
            f"| {lam:g} | "
            + " | ".join(
                f"{agg('loss_attention', lam, s, 'bag_auc')[0]:.3f} / "
                f"{agg('loss_attention', lam, s, 'att_gt_0.5', 'f1')[0]:.2f}"
                for s in sizes
            )
            + " |"
        )
    out.append(
        "| attention MIL | "
        + " | ".join(
            f"{agg('attention', None, s, 'bag_auc')[0]:.3f} / "
            f"{agg('attention', None, s, 'att_gt_0.5', 'f1')[0]:.2f}"
            for s in sizes
        )
        + " |"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        xs = [max(lam, 1e-4) for lam in lams]
        for s in sizes:
            for ax, (key, sub) in zip(axes, (("bag_auc", None), ("att_gt_0.5", "f1")), strict=True):
                line = ax.plot(
                    xs,
                    [agg("loss_attention", lam, s, key, sub)[0] for lam in lams],
                    marker="o",
                    label=f"{s} train bags",
                )
                ax.axhline(
                    agg("attention", None, s, key, sub)[0],
                    ls="--",
                    color=line[0].get_color(),
                    lw=0.8,
                )
        for ax, t in zip(axes, ("test bag AUC", "instance F1 (attention > 0.5)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("λ (λ = 0 drawn at 1e-4); dashed: attention MIL")
            ax.set_title(t)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(docs / "digits_lambda_sweep.png", dpi=120)
        plt.close(fig)
        out += ["", "![λ sweep](digits_lambda_sweep.png)"]
    except ImportError:  # pragma: no cover
        pass
    return "\n".join(out) + "\n"


def write_report(results: Path, docs: Path, quick: bool = False) -> None:
    """Write ``reproduction_results.md`` (tables only) and ``reproduction_results.json``."""
    docs.mkdir(parents=True, exist_ok=True)
    table, js = benchmark_tables(results)
    digits = digits_tables(results, docs)
    head = "# Reproduction results (generated by pipelines/reproduce_paper.py)\n\n"
    if quick:
        head += "**Quick smoke mode: tiny settings, numbers are meaningless.**\n\n"
    text = (
        head
        + "## MUSK1, MUSK2, ELEPHANT (accuracy, mean ± std over outer folds)\n\n"
        + table
        + "\n\n## Digit bags\n\n"
        + digits
    )
    (docs / "reproduction_results.md").write_text(text)
    (docs / "reproduction_results.json").write_text(json.dumps(js, indent=1))
