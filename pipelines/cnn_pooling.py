"""LossAttentionPool2d in a CNN, offline on synthetic slides (issue 17 item 7; docs/pool2d.md).

    .venv/bin/python pipelines/cnn_pooling.py           # a few minutes on 2 CPU cores
    .venv/bin/python pipelines/cnn_pooling.py --quick   # smoke test, well under a minute

1. **Patch classification**: 64×64 patches at 1 µm/px cut from synthetic slides
   (:class:`wsi_mil.synthetic.cohorts.HardSpec`, tumour plus lymphoid hard negatives),
   labelled from the generator's tumour mask (tumour: ≥ 30% of the patch, normal: none).
   One small CNN trunk (4 conv blocks, stride 8, an 8×8 feature map that lines up with the
   8 µm truth grid) is trained twice, with global average pooling + linear and with
   :class:`~wsi_mil.mil.pool2d.LossAttentionPool2d`. Reported on patches of held-out
   slides: accuracy and AUC; and inside tumour patches that are partly tumour, the AUC
   of each position's score against the mask (loss attention: α and the position's tumour
   probability; average pooling: its class activation map, the linear layer applied at
   each position).
2. **End-to-end MIL** (the paper's use): bags of 16 patch images, positive when one holds
   tumour; the same CNN trunk (average-pooled per patch) trained through
   :class:`~wsi_mil.mil.loss_attention.LossAttentionMIL` on bag labels only. Reported on
   bags of held-out slides: bag AUC and, within positive bags, the AUC of attention and of
   instance tumour probability against the patch labels.

Writes ``pipelines/results/cnn_pooling/cnn_pooling.json`` and ``montage.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "pipelines" / "results" / "cnn_pooling"
PATCH_L0, PATCH_PX = 128, 64  # 128 level-0 px at 0.5 µm/px → 64 px at 1 µm/px


def cut_patches(slide: Path, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patches (n, 64, 64, 3) uint8, labels (n,) and 8×8 tumour masks (n, 8, 8) of one slide."""
    import cv2
    import tiffslide

    from wsi_mil.synthetic import load_truth

    truth = load_truth(slide)
    d = truth.downsample
    assert PATCH_L0 % d == 0
    cells = PATCH_L0 // d
    H, W = truth.tissue.shape
    imgs, labels, masks = [], [], []
    with tiffslide.TiffSlide(slide) as sl:
        for gy in range(0, H - cells + 1, cells):
            for gx in range(0, W - cells + 1, cells):
                tis = truth.tissue[gy : gy + cells, gx : gx + cells]
                tum = truth.tumour[gy : gy + cells, gx : gx + cells]
                if tis.mean() < 0.9:
                    continue
                share = tum.mean()
                if 0 < share < 0.3:
                    continue
                rgb = np.asarray(sl.read_region((gx * d, gy * d), 0, (PATCH_L0, PATCH_L0)).convert("RGB"))
                imgs.append(cv2.resize(rgb, (PATCH_PX, PATCH_PX), interpolation=cv2.INTER_AREA))
                labels.append(int(share >= 0.3))
                m = cv2.resize(tum.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA) >= 0.5
                masks.append(m)
    return np.stack(imgs), np.array(labels), np.stack(masks)


def make_data(work: Path, n_slides: int, size: tuple[int, int]) -> dict[str, Any]:
    """Synthetic slides (all with tumour and lymphoid aggregates) cut into labelled patches."""
    from wsi_mil.synthetic import write_synthetic_slide
    from wsi_mil.synthetic.cohorts import HardSpec

    per_slide = []
    for i in range(n_slides):
        path = work / f"cnn_{i:02d}.tif"
        if not path.is_file():
            spec = HardSpec(width=size[0], height=size[1], tumour=True, tumour_share=0.2, tumour_foci=2,
                            lymphoid=6, seed=500 + i)
            write_synthetic_slide(path, spec)
        per_slide.append(cut_patches(path, i))
    return {"slides": per_slide}


def trunk(width: int = 16) -> Any:
    """Four conv blocks, stride 8: (B, 3, 64, 64) -> (B, 2·width, 8, 8) (32 channels by default)."""
    from torch import nn

    def block(i: int, o: int, s: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(3, width // 2, 1), *block(width // 2, width, 2), *block(width, 2 * width, 2),
                         *block(2 * width, 2 * width, 2))


def _tensor(x: np.ndarray) -> Any:
    import torch

    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - 0.5) / 0.25


class PatchNet:
    """A CNN trunk with either average pooling + linear, or LossAttentionPool2d."""

    def __init__(self, pooling: str, seed: int, lam: float = 0.1) -> None:
        import torch
        from torch import nn

        from wsi_mil.mil.pool2d import LossAttentionPool2d

        torch.manual_seed(seed)
        self.pooling = pooling
        self.trunk = trunk()
        self.head = LossAttentionPool2d(32, 2, lam=lam) if pooling == "loss_attention" else nn.Linear(32, 2)
        self.params = [*self.trunk.parameters(), *self.head.parameters()]

    def train(self, mode: bool) -> None:
        self.trunk.train(mode)
        self.head.train(mode)

    def loss(self, x: Any, y: Any) -> Any:
        import torch.nn.functional as F

        f = self.trunk(x)
        if self.pooling == "loss_attention":
            _, terms = self.head.compute_loss(y, f)
            return sum(terms.values())
        return F.cross_entropy(self.head(f.mean((2, 3))), y)

    def maps(self, x: Any) -> tuple[Any, dict[str, Any]]:
        """Tumour probability (B,) and per-position maps (B, 8, 8) by name."""
        f = self.trunk(x)
        if self.pooling == "loss_attention":
            out = self.head.outputs(f)
            return out.logits.softmax(-1)[:, 1], {"attention": out.attention,
                                                   "position_prob": out.position_logits.softmax(-1)[..., 1]}
        logits = self.head(f.mean((2, 3)))
        cam = self.head(f.permute(0, 2, 3, 1))  # (B, 8, 8, 2): the linear layer at each position
        return logits.softmax(-1)[:, 1], {"cam": cam[..., 1] - cam[..., 0]}


def _fit(net: Any, batches: Any, epochs: int, lr: float) -> float:
    import torch

    opt = torch.optim.Adam(net.params, lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train(True)
        for args in batches(epoch):
            opt.zero_grad()
            net.loss(*args).backward()
            opt.step()
    net.train(False)
    return time.perf_counter() - t0


def patch_experiment(train: tuple, test: tuple, epochs: int, seed: int) -> dict[str, Any]:
    """Average pooling vs loss-attention pooling on the same patches, trunk init and batches."""
    import torch
    from sklearn.metrics import roc_auc_score

    Xtr, ytr, _ = train
    Xte, yte, mte = test
    xtr, xte = _tensor(Xtr), _tensor(Xte)
    ttr = torch.from_numpy(ytr)

    def batches(epoch: int) -> Any:
        g = np.random.default_rng((seed, epoch))
        order = g.permutation(len(ytr))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            flip = torch.from_numpy(g.random(len(idx)) < 0.5)
            x = xtr[idx]
            yield torch.where(flip[:, None, None, None], x.flip(-1), x), ttr[idx]

    out: dict[str, Any] = {"n_train": len(ytr), "n_test": len(yte), "train_tumour_share": float(ytr.mean())}
    mixed = (yte == 1) & (mte.mean((1, 2)) < 0.95) & (mte.mean((1, 2)) > 0.05)
    out["n_mixed_test_patches"] = int(mixed.sum())
    maps_for_montage = {}
    for pooling in ("average", "loss_attention"):
        net = PatchNet(pooling, seed)
        fit_s = _fit(net, batches, epochs, 1e-3)
        with torch.no_grad():
            prob, maps = [], {}
            for i in range(0, len(yte), 256):
                p, m = net.maps(xte[i : i + 256])
                prob.append(p)
                for k, v in m.items():
                    maps.setdefault(k, []).append(v)
        p = torch.cat(prob).numpy()
        maps = {k: torch.cat(v).numpy() for k, v in maps.items()}
        r: dict[str, Any] = {"fit_s": fit_s, "accuracy": float(((p > 0.5) == yte).mean()),
                             "auc": float(roc_auc_score(yte, p))}
        for k, v in maps.items():  # within each partly-tumour patch: positions vs the mask
            aucs = [roc_auc_score(mte[i].ravel(), v[i].ravel()) for i in np.flatnonzero(mixed)]
            r[f"{k}_mask_auc"] = float(np.mean(aucs)) if aucs else float("nan")
        out[pooling] = r
        maps_for_montage.update(maps)
    out["_montage"] = (Xte[mixed][:6], mte[mixed][:6], {k: v[mixed][:6] for k, v in maps_for_montage.items()})
    return out


def mil_experiment(train: list[tuple], test: list[tuple], n_bags: int, epochs: int, seed: int,
                   bag_size: int = 16) -> dict[str, Any]:
    """The paper's end-to-end MIL: a CNN trunk trained through the loss-attention head on bags."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from wsi_mil.mil import LossAttentionMIL

    def bags(slides: list[tuple], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, bag_size, 64, 64, 3) images, bag labels, instance labels; half positive."""
        X, Y, inst = [], [], []
        for b in range(n):
            Xs, ys, _ = slides[rng.integers(len(slides))]
            neg, pos = np.flatnonzero(ys == 0), np.flatnonzero(ys == 1)
            k = int(rng.integers(1, 4)) if b % 2 and len(pos) else 0
            idx = np.concatenate([rng.choice(pos, k), rng.choice(neg, bag_size - k, replace=False)])
            idx = rng.permutation(idx)
            X.append(Xs[idx])
            inst.append(ys[idx])
            Y.append(int(k > 0))
        return np.stack(X), np.array(Y), np.stack(inst)

    rng = np.random.default_rng(seed)
    Xtr, Ytr, _ = bags(train, n_bags, rng)
    Xte, Yte, Ite = bags(test, max(n_bags // 2, 20), rng)
    torch.manual_seed(seed)
    cnn = nn.Sequential(trunk(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = LossAttentionMIL(32, 2, lam=0.1, trunk="identity")

    class Net:
        def __init__(self) -> None:
            self.params = [*cnn.parameters(), *head.parameters()]

        def train(self, mode: bool) -> None:
            cnn.train(mode)
            head.train(mode)

        def feats(self, x: np.ndarray) -> Any:
            B, N = x.shape[:2]
            return cnn(_tensor(x.reshape(B * N, *x.shape[2:]))).reshape(B, N, -1)

        def loss(self, x: np.ndarray, y: Any) -> Any:
            _, terms = head.compute_loss(y, self.feats(x))
            return sum(terms.values())

    net = Net()
    ytr = torch.from_numpy(Ytr)

    def batches(epoch: int) -> Any:
        order = np.random.default_rng((seed, epoch)).permutation(len(Ytr))
        for i in range(0, len(order), 4):
            idx = order[i : i + 4]
            yield Xtr[idx], ytr[idx]

    fit_s = _fit(net, batches, epochs, 5e-4)
    with torch.no_grad():
        preds = [head.predict(net.feats(Xte[i : i + 8])) for i in range(0, len(Yte), 8)]
    bag_p = torch.cat([p.bag_probs[:, 1] for p in preds]).numpy()
    att = torch.cat([p.attention for p in preds]).numpy()
    inst = torch.cat([p.instance_probs[..., 1] for p in preds]).numpy()
    pos = Yte == 1
    return {
        "n_train_bags": len(Ytr), "n_test_bags": len(Yte), "bag_size": bag_size, "fit_s": fit_s,
        "bag_accuracy": float(((bag_p > 0.5) == Yte).mean()), "bag_auc": float(roc_auc_score(Yte, bag_p)),
        "attention_instance_auc": float(roc_auc_score(Ite[pos].ravel(), att[pos].ravel())),
        "instance_prob_auc": float(roc_auc_score(Ite[pos].ravel(), inst[pos].ravel())),
    }


def montage(path: Path, imgs: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray]) -> None:
    """Rows: patch, tumour mask, then each map (jet), upscaled to the patch size."""
    import cv2

    from wsi_mil.io.atomic import atomic_path

    def up(m: np.ndarray) -> np.ndarray:
        m = (m - m.min()) / (np.ptp(m) + 1e-12)
        c = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        return cv2.resize(c, (PATCH_PX, PATCH_PX), interpolation=cv2.INTER_NEAREST)

    rows = [np.concatenate(list(imgs), 1),
            np.concatenate([up(m.astype(np.float32)) for m in masks], 1)]
    rows += [np.concatenate([up(m) for m in v], 1) for v in maps.values()]
    grid = np.concatenate(rows, 0)
    grid = cv2.resize(grid, (grid.shape[1] * 2, grid.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp.with_suffix(".png")), grid[..., ::-1])
        tmp.with_suffix(".png").rename(tmp)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both experiments; write JSON and the montage; return the results."""
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/cnn_pooling"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n_slides, size, epochs, n_bags, mil_epochs = (6, (4096, 3072), 8, 96, 6)
    if a.quick:
        n_slides, size, epochs, n_bags, mil_epochs = (3, (2048, 1536), 1, 16, 1)
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    slides = make_data(a.work, n_slides, size)["slides"]
    n_test = max(1, n_slides // 3)
    tr, te = slides[:-n_test], slides[-n_test:]
    train = tuple(np.concatenate([s[j] for s in tr]) for j in range(3))
    test = tuple(np.concatenate([s[j] for s in te]) for j in range(3))
    res: dict[str, Any] = {"settings": {"slides": n_slides, "held_out_slides": n_test, "size": list(size),
                                        "epochs": epochs, "bags": n_bags, "mil_epochs": mil_epochs,
                                        "seed": a.seed, "threads": a.threads},
                           "data_s": time.perf_counter() - t0}
    res["patches"] = patch_experiment(train, test, epochs, a.seed)
    imgs, masks, maps = res["patches"].pop("_montage")
    res["mil"] = mil_experiment(tr, te, n_bags, mil_epochs, a.seed)
    res["wall_s"] = time.perf_counter() - t0
    sys.path.insert(0, str(ROOT / "pipelines" / "benchmarks"))
    from _common import machine

    res["machine"] = machine()
    a.out.mkdir(parents=True, exist_ok=True)
    if len(imgs):
        montage(a.out / "montage.png", imgs, masks, maps)
    from wsi_mil.io.atomic import write_text_atomic

    write_text_atomic(a.out / "cnn_pooling.json", json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
