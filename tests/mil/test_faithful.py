"""The method as the paper has it: α̃ per instance, the EMA from the loss's own attention, fresh subsets.

Real HDF5 bags (``conftest.make_cohort``), the real trainer loop (``fit_fold``) and a
real model; the only instrumentation is forward hooks and a recording subclass of the
real ``AttentionTargets``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsi_mil.io.h5 import read_bag, write_bag
from wsi_mil.mil import LossAttentionMIL, load_train_config
from wsi_mil.mil.data import BagDataset, collate_bags
from wsi_mil.mil.fit import fit_fold
from wsi_mil.mil.loss_attention import AttentionTargets


def _one_bag(tmp: Path, n: int = 20, D: int = 3) -> Path:
    p = tmp / "b.h5"
    feats = np.repeat(np.arange(n, dtype=np.float32)[:, None], D, 1)  # row r holds r
    write_bag(p, feats, np.zeros((n, 2)), {})
    return p


def test_a_subsampled_bag_keeps_each_instances_own_target(tmp_path: Path) -> None:
    n, keep = 20, 6
    ds = BagDataset([_one_bag(tmp_path, n)], np.array([1]), max_instances=keep, seed=3)
    targets = AttentionTargets(beta=0.5)
    targets.update([0], torch.arange(n)[None], torch.arange(n, dtype=torch.float32)[None])  # α̃(row r) = r
    seen = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        b = collate_bags([ds[0]])
        rows = b.rows[0]
        assert len(rows) == keep and bool((rows.diff() > 0).all())
        # The features are the rows named (row r holds the value r) and each meets its own target.
        torch.testing.assert_close(b.X[0, :, 0], rows.float())
        torch.testing.assert_close(targets.get([0], b.rows)[0], rows.float())
        seen.add(tuple(rows.tolist()))
    assert len(seen) > 1  # the kept instances change over epochs: position t is another instance
    # The update of a subset moves exactly the kept rows.
    ds.set_epoch(0)
    b = collate_bags([ds[0]])
    targets.update([0], b.rows, torch.zeros(1, keep))
    after = targets.get([0], torch.arange(n)[None])[0]
    kept = b.rows[0]
    torch.testing.assert_close(after[kept], kept.float() * 0.5)
    others = torch.ones(n, dtype=torch.bool)
    others[kept] = False
    torch.testing.assert_close(after[others], torch.arange(n, dtype=torch.float32)[others])


def _subsets(ds: BagDataset, epochs: int, workers: int) -> list[list[tuple[int, ...]]]:
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        dl = DataLoader(ds, batch_size=1, collate_fn=collate_bags, num_workers=workers)
        out.append([tuple(b.rows[0].tolist()) for b in dl])
    return out


def test_subsets_differ_across_epochs_are_seeded_and_do_not_depend_on_workers(tmp_path: Path, cohort) -> None:
    cohort(tmp_path, n=4)
    paths = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    y = np.zeros(len(paths))
    a = _subsets(BagDataset(paths, y, max_instances=8, seed=1), 3, 0)
    assert all(len(set(per_epoch)) == 3 for per_epoch in zip(*a, strict=True))  # each bag: a new subset each epoch
    assert a == _subsets(BagDataset(paths, y, max_instances=8, seed=1), 3, 0)  # same seed: same subsets
    assert a != _subsets(BagDataset(paths, y, max_instances=8, seed=2), 3, 0)
    # Two reader workers (each with its own copy of the dataset) draw what one process draws.
    assert a == _subsets(BagDataset(paths, y, max_instances=8, seed=1), 3, 2)


class _Recording(AttentionTargets):
    """The real EMA store, also keeping every update it was given."""

    def __init__(self, beta: float) -> None:
        super().__init__(beta)
        self.calls: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def update(self, bag_ids, rows, attention) -> None:  # type: ignore[override]
        self.calls.append((list(bag_ids), rows.clone(), attention.clone()))
        super().update(bag_ids, rows, attention)


def test_ema_uses_the_training_forwards_own_attention(tmp_path: Path, cohort, one_thread) -> None:
    cohort(tmp_path, n=6)
    paths = sorted((tmp_path / "features" / "toyenc" / "h5_files").glob("*.h5"))
    y = np.array([i % 2 for i in range(6)])
    cfg = load_train_config(
        "default",
        {"optim.epochs": 3, "optim.omega": 1.0, "optim.rampup_epochs": 2, "optim.max_instances": 10,
         "optim.batch_size": 2, "optim.lr": 1e-2, "optim.ema_beta": 0.6},
    )
    torch.manual_seed(0)
    model = LossAttentionMIL(16, 2, trunk="mlp", hidden=[8], dropout=0.5)  # another forward would differ
    train_ds, val_ds = BagDataset(paths[:4], y[:4], 10, seed=7), BagDataset(paths[4:], y[4:])
    training_inst_logits: list[torch.Tensor] = []
    trunk_calls = {"train": 0, "eval": 0}

    def on_trunk(module, inputs, output) -> None:
        trunk_calls["train" if module.training else "eval"] += 1

    def on_classifier(module, inputs, output) -> None:
        if module.training and output.dim() == 3:  # the instance logits (B, N, K), not the pooled bag's
            training_inst_logits.append(output.detach().clone())

    model.trunk.register_forward_hook(on_trunk)
    model.classifier.register_forward_hook(on_classifier)
    targets = _Recording(0.6)
    fit_fold(model, train_ds, val_ds, cfg, torch.device("cpu"), seed=7, targets=targets)

    steps = 3 * 2  # 3 epochs × (4 bags / batch size 2)
    assert trunk_calls == {"train": steps, "eval": 3 * 2}  # one forward per step; val: 2 bags per epoch
    assert len(targets.calls) == steps and len(training_inst_logits) == steps
    expected: dict[tuple[int, int], float] = {}
    for (ids, rows, att), z in zip(targets.calls, training_inst_logits, strict=True):
        mask = rows >= 0
        # α of this forward from its own instance logits: softmax_t(logsumexp_c z_tc) over real instances.
        want = torch.logsumexp(z, -1).masked_fill(~mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(att, want)
        for i, bag in enumerate(ids):
            for r, a in zip(rows[i][mask[i]].tolist(), att[i][mask[i]].tolist(), strict=True):
                old = expected.get((bag, r))
                expected[(bag, r)] = a if old is None else 0.6 * old + 0.4 * a
            n_real = len(read_bag(paths[bag]).features)
            assert int(mask[i].sum()) == min(10, n_real)
    for (bag, r), v in expected.items():
        got = targets.get([bag], torch.tensor([[r]]))[0, 0].item()
        assert abs(got - v) < 1e-6
