"""LossAttentionPool2d: the loss-attention head on a CNN feature map's positions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_mil.mil import LossAttentionMIL
from wsi_mil.mil.pool2d import LossAttentionPool2d


def _pool(C: int = 6, K: int = 3, lam: float = 0.1) -> LossAttentionPool2d:
    torch.manual_seed(0)
    return LossAttentionPool2d(C, K, lam=lam).double()


def _fmap(B: int = 3, C: int = 6, H: int = 4, W: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2


def test_shapes_and_attention_sums_to_one_per_image() -> None:
    pool, fmap = _pool(), _fmap()
    out = pool.outputs(fmap)
    assert out.logits.shape == (3, 3)
    assert out.attention.shape == (3, 4, 5)
    assert out.position_logits.shape == (3, 4, 5, 3)
    torch.testing.assert_close(out.attention.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    assert torch.all(out.attention > 0)
    torch.testing.assert_close(pool.attention_map(fmap), out.attention)
    torch.testing.assert_close(pool(fmap), out.logits)


def test_attention_is_the_papers_formula_per_position() -> None:
    pool, fmap = _pool(), _fmap()
    out = pool.outputs(fmap)
    h = fmap.permute(0, 2, 3, 1)  # (B, H, W, C): position (i, j) is instance t = i·W + j
    z = h @ pool.classifier.weight.T + pool.classifier.bias  # (B, H, W, K)
    e = z.exp().sum(-1)  # Σ_c exp(z_tc)
    torch.testing.assert_close(out.attention, e / e.sum((1, 2), keepdim=True))
    torch.testing.assert_close(out.position_logits, z)


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_equals_the_mil_head_on_the_flattened_bag(lam: float) -> None:
    pool, fmap = _pool(lam=lam), _fmap()
    mil = LossAttentionMIL(6, 3, lam=lam, trunk="identity").double()
    mil.classifier.load_state_dict(pool.classifier.state_dict())
    bag = fmap.flatten(2).transpose(1, 2)  # (B, H·W, C)
    y = torch.tensor([0, 2, 1])
    mo = mil.outputs(bag)
    po = pool.outputs(fmap)
    torch.testing.assert_close(po.logits, mo.bag_logits)
    torch.testing.assert_close(po.attention.flatten(1), mo.attention)
    torch.testing.assert_close(po.position_logits.flatten(1, 2), mo.instance_logits)
    _, pl = pool.compute_loss(y, fmap)
    _, ml = mil.compute_loss(y, bag)
    assert set(pl) == {"bag", "instance"}
    torch.testing.assert_close(pl["bag"], ml["bag"])
    torch.testing.assert_close(pl["instance"], ml["instance"])
    if lam > 0:
        assert pl["instance"] > 0


def test_large_logits_do_not_overflow() -> None:
    pool, fmap = _pool(), _fmap() * 1e3
    out = pool.outputs(fmap)
    assert torch.isfinite(out.attention).all() and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention.sum((1, 2)), torch.ones(3, dtype=torch.float64))


def test_gradients_flow_to_a_cnn_trunk_through_both_terms() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    pool = LossAttentionPool2d(6, 2, lam=0.5)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([0, 1])
    for term in ("bag", "instance"):
        conv.zero_grad()
        pool.zero_grad()
        _, losses = pool.compute_loss(y, conv(x))
        losses[term].backward()
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, term
        assert pool.classifier.weight.grad.abs().sum() > 0, term


def test_bad_shapes_are_refused() -> None:
    pool = _pool()
    with pytest.raises(ValueError, match="feature map"):
        pool(torch.randn(2, 5, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_classes"):
        LossAttentionPool2d(4, 1)


@pytest.mark.slow
def test_cnn_pooling_demo_quick(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipelines/cnn_pooling.py --quick`` runs end to end and writes its JSON and montage."""
    import json
    from pathlib import Path

    import cv2

    root = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(root))
    from pipelines.cnn_pooling import main

    res = main(["--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--threads", "1"])
    saved = json.loads((tmp_path / "out" / "cnn_pooling.json").read_text())
    assert saved["patches"]["n_test"] == res["patches"]["n_test"] > 0
    for pooling in ("average", "loss_attention"):
        assert 0.0 <= saved["patches"][pooling]["accuracy"] <= 1.0
        assert 0.0 <= saved["patches"][pooling]["auc"] <= 1.0
    assert 0.0 <= saved["patches"]["loss_attention"]["attention_mask_auc"] <= 1.0
    assert 0.0 <= saved["mil"]["bag_auc"] <= 1.0 and saved["mil"]["n_test_bags"] >= 20
    png = cv2.imread(str(tmp_path / "out" / "montage.png"))
    n = min(saved["patches"]["n_mixed_test_patches"], 6)
    assert png.shape[:2] == (2 * 64 * 5, 2 * 64 * n)  # patch, mask, cam, attention, position prob
