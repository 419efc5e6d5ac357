"""Ranking losses with one signature: `loss(scores [B, L], grades [B, L], **hyperparameters) -> scalar tensor`.

Slots with grade == PAD_GRADE (-1) are padding and never influence the value or the gradient.
Every loss is finite for lists with all-zero grades and for lists that are all padding but one item
(such lists contribute 0 and, when nothing else is in the batch, the loss is an exact 0 still attached to
the graph). Each loss is registered in `mmrank.registry.LOSSES`; config names one as `train.loss: lambdarank`
or `{name: lambdarank, args: {sigma: 2.0}}` and `get_loss(cfg.loss)` binds the arguments. A new loss is one
function here plus its decorator.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mmrank.ranker.batch import PAD_GRADE
from mmrank.registry import LOSSES

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def valid_mask(grades: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: True for real items, False for padding."""
    return grades != PAD_GRADE


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of `values[mask]`; 0 (attached to `anchor`'s graph) when nothing is selected."""
    n = mask.sum()
    if n == 0:
        return anchor.sum() * 0.0
    return torch.where(mask, values, torch.zeros_like(values)).sum() / n


def exp_gain(grades: torch.Tensor) -> torch.Tensor:
    """Exponential gain 2^g - 1 (0 for padding)."""
    return torch.where(valid_mask(grades), torch.pow(2.0, grades.clamp_min(0.0)) - 1.0, torch.zeros_like(grades))


@LOSSES.register("pointwise_bce")
def pointwise_bce(scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits with targets = grade / (max real grade in the batch, or 1 if that is 0)."""
    valid = valid_mask(grades)
    top = grades[valid].max() if valid.any() else grades.new_tensor(1.0)
    target = (grades.clamp_min(0.0) / torch.where(top > 0, top, torch.ones_like(top))).detach()
    per_item = F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    return _masked_mean(per_item, valid, scores)


@LOSSES.register("pointwise_mse")
def pointwise_mse(scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """Mean squared error between score and raw grade over real items."""
    return _masked_mean((scores - grades) ** 2, valid_mask(grades), scores)


def _pairs(grades: torch.Tensor) -> torch.Tensor:
    """Bool [B, L, L]: (i, j) with both real and grade_i > grade_j."""
    valid = valid_mask(grades)
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    return both & (grades.unsqueeze(2) > grades.unsqueeze(1))


def _pair_logistic(scores: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """[B, L, L]: log(1 + exp(-sigma * (s_i - s_j)))."""
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)
    return F.softplus(-(diff if sigma == 1.0 else sigma * diff))


@LOSSES.register("ranknet")
def ranknet(scores: torch.Tensor, grades: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """RankNet: pairwise logistic loss (steepness `sigma`) averaged over all pairs (in the batch) with different
    grades."""
    return _masked_mean(_pair_logistic(scores, sigma), _pairs(grades), scores)


@LOSSES.register("listnet")
def listnet(scores: torch.Tensor, grades: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ListNet (top-one): cross-entropy between softmax(grades / temperature) and softmax(scores) over real
    items, averaged over lists with at least two real items (a single-item list has zero loss by definition)."""
    valid = valid_mask(grades)
    neg = torch.finfo(scores.dtype).min
    target_logits = grades if temperature == 1.0 else grades / temperature
    target = torch.softmax(target_logits.masked_fill(~valid, neg), dim=1).detach()
    log_p = torch.log_softmax(scores.masked_fill(~valid, neg), dim=1)
    per_list = -torch.where(valid, target * log_p, torch.zeros_like(log_p)).sum(dim=1)
    return _masked_mean(per_list, valid.sum(dim=1) >= 2, scores)


def _ranks(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based rank of each slot when sorting real items by score desc (ties by index; padding last)."""
    keyed = scores.detach().masked_fill(~valid, float("-inf"))
    order = torch.argsort(keyed, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order))
    return ranks


@LOSSES.register("lambdarank")
def lambdarank(scores: torch.Tensor, grades: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """LambdaRank: pairwise logistic loss (steepness `sigma`) weighted by |delta NDCG| of swapping i and j in
    the current ranking (exponential gain, log2 discount, ideal DCG of that list). Sum over a list's pairs, mean
    over lists that have at least one pair."""
    valid = valid_mask(grades)
    pairs = _pairs(grades)
    gain = exp_gain(grades)
    disc = 1.0 / torch.log2(_ranks(scores, valid).to(scores.dtype) + 1.0)
    ideal_gain = torch.sort(gain, dim=1, descending=True).values
    positions = torch.arange(1, grades.shape[1] + 1, device=scores.device, dtype=scores.dtype)
    idcg = (ideal_gain / torch.log2(positions + 1.0)).sum(dim=1).clamp_min(torch.finfo(scores.dtype).tiny)
    delta = ((gain.unsqueeze(2) - gain.unsqueeze(1)).abs() * (disc.unsqueeze(2) - disc.unsqueeze(1)).abs()
             / idcg[:, None, None]).detach()
    per_pair = torch.where(pairs, delta * _pair_logistic(scores, sigma), torch.zeros_like(delta))
    return _masked_mean(per_pair.sum(dim=(1, 2)), pairs.any(dim=(1, 2)), scores)


def get_loss(spec: Any) -> LossFn:
    """The registered loss named by `spec` (a name or a `LossSpec` with `args`), its arguments bound;
    ValueError naming the known losses otherwise."""
    name, args = (spec, {}) if isinstance(spec, str) else (spec.name, dict(spec.args))
    fn = LOSSES.get(name)
    return functools.partial(fn, **args) if args else fn
