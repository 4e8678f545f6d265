"""Baselines share the contract: shapes, masking, registry."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil import create_model
from wsi_mil.mil.registry import HANDWRITTEN_MODELS


# The hand-written models are multi-class; the torchmil zoo (binary) is tests/mil/test_zoo.py.
@pytest.mark.parametrize("name", HANDWRITTEN_MODELS)
@pytest.mark.parametrize("trunk", ["paper", "projection"])
def test_shapes_and_masking(name: str, trunk: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 12, 3, trunk=trunk, hidden=[16]).eval()
    X = torch.randn(3, 9, 12)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 5:] = False
    y = torch.tensor([0, 2, 1])
    logits, terms = model.compute_loss(y, X, mask)
    assert logits.shape == (3, 3)
    assert set(terms) == {"bag", "instance", "consistency"}
    pred = model.predict(X, mask)
    assert pred.bag_probs.shape == (3, 3)
    assert pred.attention.shape == (3, 9) and pred.instance_probs.shape == (3, 9, 3)
    torch.testing.assert_close(pred.bag_probs.sum(1), torch.ones(3))
    torch.testing.assert_close(pred.attention.sum(1), torch.ones(3))
    assert torch.all(pred.attention[0, 5:] == 0)
    # Padding changes nothing: bag 0 alone, unpadded.
    alone = model.predict(X[:1, :5])
    torch.testing.assert_close(pred.bag_probs[0], alone.bag_probs[0], atol=1e-5, rtol=1e-5)
    X2 = X.clone()
    X2[0, 5:] = 1e3  # garbage in the padding
    torch.testing.assert_close(model.predict(X2, mask).bag_probs, pred.bag_probs)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="loss_attention"):
        create_model("nope", 4)
