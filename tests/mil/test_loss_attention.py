"""The loss-attention equations, checked one by one (DESIGN.md, Shi et al. 2020)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.mil import AttentionTargets, LossAttentionMIL, consistency_weight


def _model(D: int = 6, K: int = 3, lam: float = 0.1, trunk: str = "identity") -> LossAttentionMIL:
    torch.manual_seed(0)
    return LossAttentionMIL(D, K, lam=lam, trunk=trunk).double()


def _batch(B: int = 4, N: int = 7, D: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 1:] = False
    return X, mask


def test_attention_sums_to_one_and_is_zero_on_padding() -> None:
    model = _model()
    X, mask = _batch()
    att = model.outputs(X, mask).attention
    torch.testing.assert_close(att.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.all(att[~mask] == 0)
    assert att[3, 0] == 1.0


def test_attention_is_the_papers_formula() -> None:
    model = _model()
    X, _ = _batch()
    out = model.outputs(X)
    z = X @ model.classifier.weight.T + model.classifier.bias  # (B, N, K) z_t = h_t W + b
    e = z.exp().sum(-1)  # (B, N)   Σ_c exp(z_tc)
    torch.testing.assert_close(out.attention, e / e.sum(1, keepdim=True))
    torch.testing.assert_close(out.instance_logits, z)


def test_bag_logits_are_pooled_features_through_the_same_layer() -> None:
    model = _model(trunk="paper")
    X, mask = _batch()
    model.eval()
    out = model.outputs(X, mask)
    h = model.trunk(X)  # (B, N, 64)
    pooled = (out.attention.unsqueeze(-1) * h).sum(1)  # (B, 64)
    torch.testing.assert_close(out.bag_logits, model.classifier(pooled))
    torch.testing.assert_close(out.instance_logits, model.classifier(h))


def _grads(model: LossAttentionMIL, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_instance_term_changes_the_gradient_by_lambda_times_its_own() -> None:
    X, mask = _batch()
    y = torch.tensor([0, 1, 2, 1])
    m0 = _model(lam=0.0)
    _, t0 = m0.compute_loss(y, X, mask)
    assert t0["instance"] == 0
    g0 = _grads(m0, t0["bag"])
    m1 = _model(lam=0.7)
    _, t1 = m1.compute_loss(y, X, mask)
    g1 = _grads(m1, t1["bag"] + t1["instance"])
    # The instance term written independently: Σ_t α_t CE(z_t, y), averaged over bags.
    m2 = _model(lam=0.7)
    out = m2.outputs(X, mask)
    terms = []
    for b in range(4):
        n = int(mask[b].sum())
        ce = F.cross_entropy(out.instance_logits[b, :n], y[b].repeat(n), reduction="none")
        terms.append((out.attention[b, :n] * ce).sum())
    g_inst = _grads(m2, torch.stack(terms).mean())
    torch.testing.assert_close(g1, g0 + 0.7 * g_inst)
    assert g_inst.abs().sum() > 0


def test_single_instance_bag_loss_is_one_plus_lambda_times_bag_loss() -> None:
    model = _model(lam=0.5)
    X = torch.randn(1, 1, 6, dtype=torch.float64)
    _, t = model.compute_loss(torch.tensor([2]), X)
    torch.testing.assert_close(t["instance"], 0.5 * t["bag"])


def test_consistency_term_pulls_attention_towards_the_targets() -> None:
    X, mask = _batch()
    y = torch.tensor([0, 1, 2, 1])
    model = _model(lam=0.0)
    att = model.outputs(X, mask).attention.detach()
    # Targets equal to the current attention: the term and its gradient vanish.
    _, t = model.compute_loss(y, X, mask, attention_target=att, consistency_weight=2.0)
    assert t["consistency"].item() == pytest.approx(0.0, abs=1e-14)
    g_bag = _grads(model, t["bag"])
    _, t = model.compute_loss(y, X, mask, attention_target=att, consistency_weight=2.0)
    torch.testing.assert_close(_grads(model, t["bag"] + t["consistency"]), g_bag)
    # Uniform targets: a small step on the term alone moves attention towards them.
    target = mask.double() / mask.sum(1, keepdim=True)
    _, t = model.compute_loss(y, X, mask, attention_target=target, consistency_weight=1.0)
    before = t["consistency"].item()
    assert before > 0
    model.zero_grad()
    t["consistency"].backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    _, t = model.compute_loss(y, X, mask, attention_target=target, consistency_weight=1.0)
    assert t["consistency"].item() < before
    # ω = 0 switches it off.
    _, t = model.compute_loss(y, X, mask, attention_target=target, consistency_weight=0.0)
    assert t["consistency"].item() == 0.0


def test_ramp_up_and_ema_targets() -> None:
    assert consistency_weight(0, 10, 2.0) == pytest.approx(2.0 * math.exp(-5.0))
    assert consistency_weight(5, 10, 2.0) == pytest.approx(2.0 * math.exp(-5.0 * 0.25))
    assert consistency_weight(50, 10, 2.0) == 2.0
    assert consistency_weight(3, 10, 0.0) == 0.0
    ema = AttentionTargets(beta=0.5)
    rows = torch.tensor([[0, 1, -1]])  # two instances and a padded slot
    a1 = torch.tensor([[0.2, 0.8, 0.0]])
    assert torch.isnan(ema.get(["s"], rows)).all()  # no target before the first observation
    ema.update(["s"], rows, a1)
    ema.update(["s"], rows, torch.tensor([[0.6, 0.4, 0.0]]))
    got = ema.get(["s"], rows)
    torch.testing.assert_close(got[:, :2], torch.tensor([[0.4, 0.6]]))
    assert torch.isnan(got[0, 2])  # padding has no target


def test_instances_without_a_target_add_no_consistency_cost() -> None:
    X, mask = _batch()
    y = torch.tensor([0, 1, 2, 1])
    model = _model(lam=0.0)
    att = model.outputs(X, mask).attention.detach()
    target = mask.double() / mask.sum(1, keepdim=True)  # (B, N) uniform
    partial = target.clone()
    partial[0, :3] = float("nan")  # bag 0's first three instances: not seen yet
    mixed = target.clone()
    mixed[0, :3] = att[0, :3]  # the same as a target equal to their own attention
    _, t_nan = model.compute_loss(y, X, mask, attention_target=partial, consistency_weight=1.0)
    _, t_own = model.compute_loss(y, X, mask, attention_target=mixed, consistency_weight=1.0)
    torch.testing.assert_close(t_nan["consistency"], t_own["consistency"])
    torch.testing.assert_close(_grads(model, t_nan["consistency"]), _grads(model, t_own["consistency"]))
    _, t_none = model.compute_loss(y, X, mask, attention_target=torch.full_like(target, float("nan")),
                                   consistency_weight=1.0)
    assert t_none["consistency"].item() == 0.0


def test_huge_bag_with_large_logits_is_finite() -> None:
    torch.manual_seed(0)
    model = LossAttentionMIL(8, 3, trunk="identity")
    with torch.no_grad():
        model.classifier.weight.mul_(500.0)  # logits in the thousands: exp() would overflow
    X = torch.randn(1, 200_000, 8) * 10
    _, terms = model.compute_loss(torch.tensor([1]), X)
    pred = model.predict(X)
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(pred.attention).all() and torch.isfinite(pred.bag_probs).all()
    assert float(pred.attention.sum()) == pytest.approx(1.0, abs=1e-4)
    (terms["bag"] + terms["instance"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_padded_batch_equals_bags_one_by_one() -> None:
    model = _model(trunk="paper")
    model.eval()
    X, mask = _batch()
    y = torch.tensor([0, 1, 2, 1])
    pred = model.predict(X, mask)
    _, terms = model.compute_loss(y, X, mask)
    losses = []
    for b in range(4):
        n = int(mask[b].sum())
        one = model.predict(X[b : b + 1, :n])
        torch.testing.assert_close(pred.bag_probs[b], one.bag_probs[0])
        torch.testing.assert_close(pred.attention[b, :n], one.attention[0])
        torch.testing.assert_close(pred.instance_probs[b, :n], one.instance_probs[0])
        assert torch.all(pred.instance_probs[b, n:] == 0)
        _, t = model.compute_loss(y[b : b + 1], X[b : b + 1, :n])
        losses.append(t["bag"] + t["instance"])
    torch.testing.assert_close(terms["bag"] + terms["instance"], torch.stack(losses).mean())
