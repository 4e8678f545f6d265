"""Stage 3 training: stratified k-fold CV grouped by case, selection on validation only, fold ensemble.

``train_run`` writes ``OUT/models/<run>/``; its files are listed in :mod:`wsi_mil.io.run_folder`.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsi_mil.errors import BagError, ConfigError
from wsi_mil.harness.lock import locks_output
from wsi_mil.io.h5 import read_bag
from wsi_mil.io.layout import Layout
from wsi_mil.io.provenance import PROVENANCE, SLIDE_FINGERPRINT, changes, digest, recorded, settings_only
from wsi_mil.mil.config import TrainConfig
from wsi_mil.mil.data import BagDataset, LabelTable, bag_paths, collate_bags, feature_stats, read_labels
from wsi_mil.mil.loss_attention import AttentionTargets, consistency_weight
from wsi_mil.mil.metrics import CASE_AGGREGATION, aggregate_cases, classification_metrics, summarize
from wsi_mil.mil.registry import create_model


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for :func:`create_model` from a config."""
    m = cfg.model
    return {
        "trunk": m.trunk,
        "hidden": list(m.hidden),
        "dropout": m.dropout,
        "lam": m.lam,
        "attention_dim": m.attention_dim,
        "input_norm": cfg.standardize,
    }


def make_splits(
    y: np.ndarray, cfg: TrainConfig, where: str, groups: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Outer folds and, inside each training part, a validation split — both grouped by case.

    ``StratifiedGroupKFold`` keeps all slides of one case (``groups``) in one split of
    every fold, so each case is tested exactly once; the validation split is the first
    fold of a ``StratifiedGroupKFold`` of the training part with ``round(1 / val_fraction)``
    splits (fewer when no class has that many slides, so small cohorts get a larger
    validation share). Without ``groups`` every slide is its own case.

    Parameters
    ----------
    y : ndarray
        (S,) class index of each slide.
    cfg : TrainConfig
        ``cv.folds``, ``cv.val_fraction`` and ``cv.seed`` are used.
    where : str
        Named in errors (the labels CSV).
    groups : sequence of str, optional
        (S,) case id of each slide.

    Returns
    -------
    list of dict
        Per fold, sorted slide indices under ``"train"``, ``"val"`` and ``"test"``.

    Examples
    --------
    >>> from wsi_mil.mil.config import CVConfig
    >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    >>> cases = ["a", "a", "b", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    >>> cfg = TrainConfig(cv=CVConfig(folds=2, val_fraction=0.34))
    >>> folds = make_splits(y, cfg, "labels.csv", cases)
    >>> sorted(np.concatenate([f["test"] for f in folds]).tolist())  # each slide tested once
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    >>> all(any({0, 1} <= set(f[s]) for s in ("train", "val", "test")) for f in folds)  # case "a" kept together
    True
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    g = np.asarray(list(groups) if groups is not None else [str(i) for i in range(len(y))])
    unit = "cases" if groups is not None and len(set(g)) < len(g) else "slides"
    per_class = [len(set(g[y == c])) for c in range(int(y.max()) + 1)]
    if min(per_class) < cfg.cv.folds:
        raise ConfigError(
            f"{where}: the smallest class has {min(per_class)} {unit}, fewer than cv.folds="
            f"{cfg.cv.folds}; lower cv.folds or add {unit}"
        )
    n_val = max(2, round(1 / cfg.cv.val_fraction))
    outer = StratifiedGroupKFold(cfg.cv.folds, shuffle=True, random_state=cfg.cv.seed)
    folds = []
    for k, (train_val, test) in enumerate(outer.split(np.zeros(len(y)), y, g)):
        if len(set(g[train_val])) < n_val:
            raise ConfigError(
                f"{where}: fold {k} has {len(set(g[train_val]))} {unit} to train on, too few for a "
                f"validation split of cv.val_fraction={cfg.cv.val_fraction}; add {unit} or lower cv.folds"
            )
        # Small cohorts: sklearn needs a class with at least n_splits slides, so fewer inner
        # splits (a larger validation share) rather than refusing to train.
        n_inner = min(n_val, int(np.bincount(y[train_val]).max()))
        inner = StratifiedGroupKFold(max(2, n_inner), shuffle=True, random_state=cfg.cv.seed + k)
        try:
            with warnings.catch_warnings():  # few cases of a class: the split is as stratified as it can be
                warnings.simplefilter("ignore", UserWarning)
                candidates = list(inner.split(np.zeros(len(train_val)), y[train_val], g[train_val]))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: fold {k}: cannot make a validation split of cv.val_fraction="
                f"{cfg.cv.val_fraction} ({exc}); add {unit}, lower cv.folds or raise cv.val_fraction"
            ) from exc
        # The first inner split that leaves every class to train on (tiny cohorts: not always the first).
        usable = [(tr, va) for tr, va in candidates if len(set(y[train_val[tr]].tolist())) == len(per_class)]
        if not usable:
            raise ConfigError(
                f"{where}: fold {k}'s training part lacks a class after the validation split; "
                f"add {unit} or lower cv.folds"
            )
        tr, va = usable[0]
        train, val = train_val[tr], train_val[va]
        folds.append({"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)})
    return folds


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Bag probabilities (S, K) in dataset order."""
    model.eval()
    out: dict[int, np.ndarray] = {}
    for X, mask, _, idx in loader:
        pred = model.predict(X.to(device), mask.to(device), return_instance=False)
        for i, p in zip(idx.tolist(), pred.bag_probs.cpu().numpy(), strict=True):
            out[i] = p
    return np.stack([out[i] for i in range(len(out))])


def fit_fold(
    model: torch.nn.Module,
    train_ds: BagDataset,
    val_ds: BagDataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    progress: Any = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train one fold and return the weights with the lowest validation error.

    Ties in validation error go to the lower validation loss (the paper's "lowest
    validation error and loss"). The test fold is never seen here.
    """
    o = cfg.optim
    gen = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(
        train_ds,
        batch_size=o.batch_size,
        shuffle=True,
        collate_fn=collate_bags,
        generator=gen,
        num_workers=cfg.num_workers,
    )
    val_dl = DataLoader(val_ds, batch_size=1, collate_fn=collate_bags, num_workers=cfg.num_workers)
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    targets = AttentionTargets(o.ema_beta) if o.omega > 0 else None
    best: tuple[float, float] = (np.inf, np.inf)
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    since_best = 0
    for epoch in range(o.epochs):
        model.train()
        omega = consistency_weight(epoch, o.rampup_epochs, o.omega)
        sums = {"bag": 0.0, "instance": 0.0, "consistency": 0.0}
        for X, mask, y, idx in train_dl:
            X, mask, y = X.to(device), mask.to(device), y.to(device)
            kwargs: dict[str, Any] = {}
            if targets is not None:
                with torch.no_grad():
                    att = model.outputs(X, mask).attention
                ids = idx.tolist()
                kwargs = {
                    "attention_target": targets.get(ids, att, mask),
                    "consistency_weight": omega,
                }
            _, terms = model.compute_loss(y, X, mask, **kwargs)
            loss = terms["bag"] + terms["instance"] + terms["consistency"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if targets is not None:
                with torch.no_grad():
                    targets.update(ids, model.outputs(X, mask).attention, mask)
            for k in sums:
                sums[k] += float(terms[k].detach()) * len(y) / len(train_ds)
        probs = predict_loader(model, val_dl, device)  # (V, K)
        y_val = torch.as_tensor(val_ds.y)
        val_loss = float(F.nll_loss(torch.as_tensor(probs).clamp_min(1e-12).log(), y_val))
        val_err = float((probs.argmax(1) != val_ds.y).mean())
        history.append(
            {
                "epoch": epoch,
                **{f"train_{k}": v for k, v in sums.items()},
                "val_loss": val_loss,
                "val_error": val_err,
            }
        )
        if (val_err, val_loss) < best:
            best, since_best = (val_err, val_loss), 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        if progress is not None:
            progress(epoch, val_err, val_loss)
        if o.patience and since_best >= o.patience:
            break
    return best_state, history


def _case_metrics(case_ids: list[str], y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Classification metrics over cases (mean slide probability); mixed-label cases left out."""
    _, y_case, p_case, _ = aggregate_cases(case_ids, y, probs)
    keep = y_case >= 0
    out: dict[str, Any] = classification_metrics(y_case[keep], p_case[keep]) if keep.any() else {
        "n": 0, "accuracy": float("nan"), "balanced_accuracy": float("nan"), "auc": float("nan"), "f1": float("nan")
    }
    out["n_mixed_label_cases"] = int((~keep).sum())
    return out


def case_table(
    case_ids: list[str],
    y: np.ndarray | None,
    probs: np.ndarray,
    classes: list[str],
    fold: np.ndarray | None = None,
) -> Any:
    """Per-case predictions: ``case_id, n_slides, [label], [fold], prediction, prob_<class>...``.

    The case's probabilities are the mean of its slides' (:data:`CASE_AGGREGATION`); its
    label is empty when its slides disagree, its fold the fold that tested it.
    """
    import pandas as pd

    cases, y_case, p_case, n = aggregate_cases(case_ids, y, probs)
    df = pd.DataFrame({"case_id": cases, "n_slides": n})
    if y is not None:
        df["label"] = [classes[i] if i >= 0 else "" for i in y_case]
    if fold is not None:
        tested_in = {c: int(f) for c, f in zip(case_ids, fold, strict=True)}  # a case's slides share one test fold
        df["fold"] = [tested_in[c] for c in cases]
    df["prediction"] = [classes[i] for i in p_case.argmax(1)]
    for c, name in enumerate(classes):
        df[f"prob_{name}"] = p_case[:, c]
    return df


def same_settings(paths: Sequence[Path], attrs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The tiling and extraction settings every bag records (None for bags that predate them).

    Raises
    ------
    ConfigError
        Two bags were made differently (other tiling, encoder, weights or precision).
    """
    first = settings_only(recorded(attrs[0]))
    for p, a in zip(paths[1:], attrs[1:], strict=True):
        other = settings_only(recorded(a))
        if other != first:
            both = first is not None and other is not None
            diff = changes(first, other) if both else ["provenance recorded in one only"]
            raise ConfigError(
                f"{p}: made differently from {paths[0]} ({'; '.join(diff[:3])}); one run trains on bags "
                "made the same way: re-extract them with `wsi-mil extract --overwrite`"
            )
    return first


def run_inputs(labels: LabelTable, bag_attrs: Sequence[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """What makes a run: each bag's provenance, the labels and cases, and the training settings.

    Speed-only settings (device, threads, workers) and the run's name are left out.
    """
    train = {k: v for k, v in cfg.to_dict().items() if k not in ("run_name", "device", "num_threads", "num_workers")}
    return {
        "bags": {s: str(a.get(PROVENANCE, "")) for s, a in zip(labels.slide_ids, bag_attrs, strict=True)},
        "labels": [
            [c, s, labels.classes[int(y)]]
            for c, s, y in zip(labels.case_ids, labels.slide_ids, labels.y, strict=True)
        ],
        "train": train,
    }


def resolve_encoder(out_dir: str | os.PathLike[str], encoder: str | None) -> str:
    """The feature folder to train on: ``encoder``, or the only one under ``OUT/features``."""
    layout = Layout(out_dir)
    root = layout.features_root
    found = layout.encoder_folders()
    if encoder:
        if encoder not in found:
            listed = ", ".join(found) or "none"
            raise ConfigError(f"{layout.bags_dir(encoder)}: no such feature folder; found: {listed}")
        return encoder
    if len(found) != 1:
        what = "no feature folders" if not found else "several encoders: " + ", ".join(found)
        raise ConfigError(f"{root}: {what}; pass --encoder (and run `wsi-mil extract` first)")
    return found[0]


def _run_name(cfg: TrainConfig, encoder: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    return f"{encoder}_{cfg.model.name}_{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@locks_output("wsi-mil train", "out_dir", create=False)
def train_run(
    out_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    encoder: str,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Cross-validate a MIL model on ``OUT/features/<encoder>/h5_files`` and save the run.

    Parameters
    ----------
    out_dir : path-like
        The cohort folder OUT.
    labels_csv : path-like
        ``slide_id,label`` (or ``case_id,slide_id,label``).
    encoder : str
        Feature folder name under ``OUT/features``.
    config : TrainConfig, optional
        Defaults to ``TrainConfig()``.
    progress : bool
        Show a progress bar per fold.

    Returns
    -------
    Path
        ``OUT/models/<run>``, written atomically (it appears only when complete).

    Examples
    --------
    >>> run_dir = train_run("OUT", "labels.csv", "resnet50")  # doctest: +SKIP
    >>> ens = load_model(run_dir)  # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from wsi_mil.io.run_folder import checkpoint_name, collect_settings, write_run

    cfg = config or TrainConfig()
    out_dir = Path(out_dir)
    layout = Layout(out_dir)
    labels = read_labels(labels_csv)
    paths = bag_paths(layout.bags_dir(encoder), labels.slide_ids)
    bags = [read_bag(p, load_features=False) for p in paths]  # attributes and coords only
    widths = Counter(int(b.features.shape[1]) for b in bags)
    in_dim = widths.most_common(1)[0][0]
    odd = next((p for p, b in zip(paths, bags, strict=True) if b.features.shape[1] != in_dim), None)
    if odd is not None:
        raise BagError(f"{odd}: {len(widths)} feature widths among the bags ({', '.join(map(str, sorted(widths)))}; "
                       f"most have {in_dim}): a bag of another encoder? re-extract it")
    bag_settings = same_settings(paths, [b.attrs for b in bags])
    folds = make_splits(labels.y, cfg, str(labels_csv), labels.case_ids)
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    K = len(labels.classes)
    kwargs = model_kwargs(cfg)
    run_dir = layout.run_dir(_run_name(cfg, encoder))
    if run_dir.exists():
        raise ConfigError(f"{run_dir}: run folder already exists; choose another run_name")

    t0 = time.time()
    oof = np.full((len(labels.y), K), np.nan, np.float32)
    oof_fold = np.full(len(labels.y), -1)
    per_fold: list[dict[str, Any]] = []
    case_folds: list[dict[str, Any]] = []
    histories, states, split_rows = [], [], []
    for k, fold in enumerate(folds):
        seed = cfg.cv.seed * 1000 + k
        torch.manual_seed(seed)
        model = create_model(cfg.model.name, in_dim, K, **kwargs).to(device)
        if cfg.standardize:
            mean, std, _ = feature_stats([paths[i] for i in fold["train"]])
            model.set_input_stats(torch.from_numpy(mean), torch.from_numpy(std))
        ds = {
            s: BagDataset(
                [paths[i] for i in fold[s]],
                labels.y[fold[s]],
                cfg.optim.max_instances if s == "train" else 0,
                seed,
            )
            for s in ("train", "val", "test")
        }
        bar = tqdm(
            total=cfg.optim.epochs,
            desc=f"fold {k + 1}/{len(folds)}",
            disable=None if progress else True,  # None: no bar when not a terminal (logs, CI)
            leave=False,
        )

        def tick(epoch: int, err: float, loss: float, bar: Any = bar) -> None:
            bar.set_postfix(val_err=f"{err:.3f}", val_loss=f"{loss:.3f}")
            bar.update(1)

        state, hist = fit_fold(model, ds["train"], ds["val"], cfg, device, seed, tick)
        bar.close()
        model.load_state_dict(state)
        test_dl = DataLoader(ds["test"], batch_size=1, collate_fn=collate_bags)
        probs = predict_loader(model, test_dl, device)
        oof[fold["test"]] = probs
        oof_fold[fold["test"]] = k
        best = min(hist, key=lambda h: (h["val_error"], h["val_loss"]))
        per_fold.append(
            {
                "fold": k,
                "selected_epoch": int(best["epoch"]),
                "val_error": best["val_error"],
                "val_loss": best["val_loss"],
                **classification_metrics(labels.y[fold["test"]], probs),
            }
        )
        case_folds.append({"fold": k, **_case_metrics([labels.case_ids[i] for i in fold["test"]],
                                                     labels.y[fold["test"]], probs)})
        histories += [{"fold": k, **h} for h in hist]
        states.append({n: t.detach().cpu().contiguous() for n, t in state.items()})
        split_rows += [
            {
                "case_id": labels.case_ids[i],
                "slide_id": labels.slide_ids[i],
                "fold": k,
                "split": s,
                SLIDE_FINGERPRINT: str(bags[i].attrs.get(SLIDE_FINGERPRINT, "")),
            }
            for s in ("train", "val", "test")
            for i in fold[s]
        ]

    fold_metrics = [
        {m: f[m] for m in ("accuracy", "balanced_accuracy", "auc", "f1")} for f in per_fold
    ]
    metrics = {
        "classes": labels.classes,
        "selection": (
            "per fold: epoch with the lowest validation error, ties by lowest validation loss"
        ),
        "folds": per_fold,
        "summary": summarize(fold_metrics),
        "out_of_fold": classification_metrics(labels.y, oof),
        "case": {
            "aggregation": CASE_AGGREGATION,
            "n_cases": len(set(labels.case_ids)),
            "folds": case_folds,
            "summary": summarize(
                [{m: f[m] for m in ("accuracy", "balanced_accuracy", "auc", "f1")} for f in case_folds]
            ),
            "out_of_fold": _case_metrics(labels.case_ids, labels.y, oof),
        },
        "seconds": round(time.time() - t0, 2),
    }
    model_json = {
        "model": cfg.model.name,
        "kwargs": kwargs,
        "in_dim": in_dim,
        "n_classes": K,
        "classes": labels.classes,
        "encoder": encoder,
        "folds": len(folds),
        "checkpoints": [checkpoint_name(k) for k in range(len(folds))],
        "ensemble": "mean of the fold models' probabilities",
        "bag_settings": digest(bag_settings) if bag_settings is not None else "",
        "provenance": digest(run_inputs(labels, [b.attrs for b in bags], cfg)),
    }
    pred = pd.DataFrame(
        {
            "case_id": labels.case_ids,
            "slide_id": labels.slide_ids,
            "label": [labels.classes[i] for i in labels.y],
            "fold": oof_fold,
            "prediction": [labels.classes[i] for i in oof.argmax(1)],
        }
    )
    for c, name in enumerate(labels.classes):
        pred[f"prob_{name}"] = oof[:, c]
    case_pred = case_table(labels.case_ids, labels.y, oof, labels.classes, oof_fold)
    resolved = {**cfg.to_dict(), "encoder": encoder, "labels_csv": str(labels_csv)}
    pipeline = collect_settings(out_dir, encoder, bags[0].attrs)
    pipeline["bag_settings"] = bag_settings
    return write_run(
        run_dir,
        states=states,
        model_spec=model_json,
        config=resolved,
        pipeline=pipeline,
        metrics=metrics,
        predictions=pred,
        case_predictions=case_pred,
        splits=split_rows,
        history=histories,
    )
