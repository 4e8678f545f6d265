"""Digit bags: the paper's MNIST-bags experiment on scikit-learn's 8×8 digits.

A bag holds round(N(10, 2)) (at least 2) digit images drawn at random; it is positive when
it holds a '9'. Training and test bags draw from disjoint halves of the 1,797 images.
Each instance is the 64-pixel vector / 16 through the paper's fc-256/128/64 trunk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LAMBDAS = (0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0)
SIZES = (50, 100, 150, 200)
TARGET = 9


def make_bags(
    X: np.ndarray, digits: np.ndarray, n_bags: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """``n_bags`` bags from images ``X`` (n, 64): features, bag labels, instance labels."""
    bags, labels, inst = [], [], []
    for _ in range(n_bags):
        n = max(2, round(rng.normal(10, 2)))
        idx = rng.integers(0, len(X), n)
        is_t = digits[idx] == TARGET
        bags.append(X[idx])
        labels.append(int(is_t.any()))
        inst.append(is_t)
    return bags, np.array(labels, np.int64), inst


def _prf(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    tp = float((pred & true).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max(true.sum(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def digits_experiment(out: Path, quick: bool = False) -> str:
    """Train loss-attention (λ sweep), attention and gated attention MIL on digit bags."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    from wsi_mil.mil import create_model
    from wsi_mil.mil.lockstep import train_lockstep

    torch.set_num_threads(1)
    path = out / "digits.json"
    if path.exists():
        return f"{path.name}: exists"
    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)  # (1797, 64)
    tr_img, te_img = train_test_split(
        np.arange(len(X)), test_size=0.5, stratify=data.target, random_state=0
    )
    repeats, epochs = (1, 2) if quick else (3, 40)
    sizes = SIZES[:1] if quick else SIZES
    n_test = 100 if quick else 1000
    configs = [("loss_attention", lam) for lam in LAMBDAS] + [
        ("attention", None),
        ("gated_attention", None),
    ]
    rows = []
    t0 = __import__("time").time()
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        test_b, test_y, test_inst = make_bags(X[te_img], data.target[te_img], n_test, rng)
        for size in sizes:
            train_b, train_y, _ = make_bags(X[tr_img], data.target[tr_img], size, rng)
            bags = train_b + test_b
            y = np.concatenate([train_y, test_y])
            test_idx = np.arange(size, size + n_test)
            for arch, lam in configs:

                def make(m: int, arch: str = arch, lam: float | None = lam, r: int = r):
                    torch.manual_seed(7 * r + m)
                    return create_model(arch, 64, 2, lam=lam or 0.0, trunk="paper", dropout=0.0)

                res = train_lockstep(
                    make,
                    bags,
                    y,
                    [np.arange(size)],
                    [test_idx],
                    epochs=epochs,
                    lr=5e-4,
                    weight_decay=1e-4,
                    seed=r,
                    eval_every=epochs,
                    return_attention=True,
                )
                p = res.probs[0][-1][:, 1]  # (n_test,)
                att = res.attention[0]
                true = np.concatenate(test_inst)
                a = np.concatenate(att)
                rel = np.concatenate([x / x.max() for x in att])
                row = {
                    "arch": arch,
                    "lam": lam,
                    "train_bags": size,
                    "repeat": r,
                    "bag_auc": float(roc_auc_score(test_y, p)),
                    "bag_accuracy": float(((p > 0.5) == test_y).mean()),
                    "att_gt_0.5": _prf(a > 0.5, true),
                    "att_rel_gt_0.5": _prf(rel > 0.5, true),
                    "seconds": res.seconds,
                }
                ins = np.concatenate(res.instance_probs[0])
                row["inst_prob_gt_0.5"] = _prf(ins > 0.5, true)
                rows.append(row)
    tmp = path.with_suffix(".partial")
    tmp.write_text(
        json.dumps(
            {
                "rows": rows,
                "repeats": repeats,
                "epochs": epochs,
                "n_test": n_test,
                "seconds": __import__("time").time() - t0,
            },
            indent=1,
        )
    )
    os.replace(tmp, path)
    return f"{path.name}: {len(rows)} models"
