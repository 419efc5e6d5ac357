"""Ranking losses: one signature, padding ignored, finite on degenerate lists, hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from mmrank.ranker.losses import LOSSES, get_loss

ALL = sorted(LOSSES)
# two lists; the second is padded after 3 items
GRADES = torch.tensor([[3.0, 2.0, 0.0, 1.0, 0.0], [2.0, 0.0, 1.0, -1.0, -1.0]])


def test_registry_matches_config_and_unknown_name_is_clear():
    assert set(LOSSES) == {"pointwise_bce", "pointwise_mse", "ranknet", "listnet", "lambdarank"}
    assert get_loss("ranknet") is LOSSES["ranknet"]
    with pytest.raises(ValueError, match="'foo' is not registered for train.loss.*lambdarank"):
        get_loss("foo")


@pytest.mark.parametrize("name", ALL)
def test_agreeing_scores_have_lower_loss(name):
    real = GRADES != -1
    agree = torch.where(real, GRADES, torch.zeros_like(GRADES))
    reverse = torch.where(real, 3.0 - GRADES, torch.zeros_like(GRADES))
    assert LOSSES[name](agree, GRADES) < LOSSES[name](reverse, GRADES)


@pytest.mark.parametrize("name", ALL)
def test_gradient_descent_on_scores_reduces_loss(name):
    scores = torch.randn(GRADES.shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    first = LOSSES[name](scores, GRADES).item()
    opt = torch.optim.SGD([scores], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        LOSSES[name](scores, GRADES).backward()
        opt.step()
    assert LOSSES[name](scores, GRADES).item() < first


@pytest.mark.parametrize("name", ALL)
def test_padding_is_ignored(name):
    scores = torch.randn(GRADES.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    base = LOSSES[name](scores, GRADES)
    base.backward()
    assert torch.all(scores.grad[GRADES == -1] == 0)
    changed = scores.detach().clone()
    changed[GRADES == -1] = torch.tensor([1e3, -7.0])
    assert torch.equal(LOSSES[name](changed, GRADES), base.detach())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("grades", [
    torch.zeros(2, 4),                                                    # all-zero grades
    torch.tensor([[2.0, -1.0, -1.0, -1.0], [0.0, -1.0, -1.0, -1.0]]),     # one real item per list
    torch.full((2, 4), -1.0),                                             # all padding
], ids=["all_zero", "single_item", "all_padding"])
def test_degenerate_lists_are_finite(name, grades):
    scores = torch.randn(grades.shape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    loss = LOSSES[name](scores, grades)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    scores = torch.tensor([[0.3, -0.2, 1.1, 0.7, 0.05], [0.4, -1.3, 0.9, 0.0, 0.0]], dtype=torch.float64,
                          requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: LOSSES[name](s, GRADES.double()), (scores,), eps=1e-6, atol=1e-6)


def test_hand_computed_values():
    s, g = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    ln2 = math.log(2.0)
    assert LOSSES["ranknet"](s, g).item() == pytest.approx(ln2)                 # softplus(0) on the one pair
    assert LOSSES["listnet"](s, g).item() == pytest.approx(ln2)                 # -sum p_true * log(1/2)
    # |dNDCG| of swapping ranks 1, 2: gains (1, 0), |1/log2(2) - 1/log2(3)| / IDCG(=1)
    assert LOSSES["lambdarank"](s, g).item() == pytest.approx((1 - 1 / math.log2(3)) * ln2, rel=1e-6)
    assert LOSSES["pointwise_mse"](s, g).item() == pytest.approx(0.5)           # ((0-1)^2 + 0^2) / 2
    assert LOSSES["pointwise_bce"](s, g).item() == pytest.approx(ln2)           # logits 0: ln 2 for any target
    assert LOSSES["pointwise_bce"](torch.tensor([[9.0, -9.0]]), torch.tensor([[3.0, 0.0]])).item() < 1e-3
