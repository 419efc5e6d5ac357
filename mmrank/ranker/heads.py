"""Scoring heads: the last layer of the ranker, [..., in_dim] features -> [..., 1] score.

Every head is registered in `mmrank.registry.HEADS` (config `train.head`) and built as
`cls(in_dim, hidden_dim, dropout)`. The design notes name three:

- `mlp` (default): Linear -> GELU -> Dropout -> Linear, a non-linear scorer over [q, fused, q*fused, match];
- `linear`: one Linear layer, a weighted sum of the features (a linear ranker on learned representations);
- `logistic`: the same Linear followed by a sigmoid, so a score is a relevance probability in (0, 1); the
  ranking losses still apply (they only compare scores), though the bounded range flattens their gradients.

With a prior (`train.prior`, `mmrank.ranker.model`) the head's output is the correction added to the scaled
prior, its last Linear zero-initialised: a `logistic` head's output is then the probability, not the score.
"""
from __future__ import annotations

import torch
from torch import nn

from mmrank.ranker.fusion import mlp
from mmrank.registry import HEADS


@HEADS.register("mlp")
class MLPHead(nn.Sequential):
    """Two-layer MLP (parameter names `0.*`, `3.*`: the layout of artifacts written before heads existed)."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float):
        super().__init__(*mlp(in_dim, hidden_dim, 1, dropout))


@HEADS.register("linear")
class LinearHead(nn.Linear):
    """score = w . x + b."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float):
        super().__init__(in_dim, 1)


@HEADS.register("logistic")
class LogisticHead(LinearHead):
    """score = sigmoid(w . x + b), a probability of relevance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sigmoid(super().forward(x))
