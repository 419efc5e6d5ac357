"""Fusions: how a product's per-modality representations z [B, L, M, P] become one vector [B, L, P].

Every fusion is registered in `mmrank.registry.FUSIONS` (config `train.fusion`) and built as
`cls(n_modalities, proj_dim, hidden_dim, dropout)`; `forward(q, z, mask)` gets the query representation
q [B, P], z with absent modalities already zeroed, and the presence mask [B, L, M] (occlusion and modality
dropout change the mask, never z). A new fusion is one class here plus its decorator.

- `concat` (the design notes' baseline): MLP over [z_1*m_1, ..., z_M*m_M, m];
- `gated`: weights w_m = softmax over *present* modalities of gate([q, z_m]) + a per-modality bias, absent
  modalities weight 0 (all 0 when none is present); fused = sum_m w_m z_m. `weights()` exposes them;
- `max_pool` / `avg_pool` (the second note's pooling): element-wise max / mean over the present modalities;
- `weighted_sum` (the second note's z = sum_k alpha_k A_k(x)): learned global alpha per modality, softmax over
  the present ones; `weights()` exposes them.
"""
from __future__ import annotations

import torch
from torch import nn

from mmrank.registry import FUSIONS


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero `x[..., :]` where `mask` (shape x.shape[:-1]) is 0; robust to NaN/inf in masked inputs."""
    return torch.where(mask.unsqueeze(-1) > 0, x, torch.zeros_like(x))


@FUSIONS.register("concat")
class ConcatFusion(nn.Sequential):
    """MLP over the concatenated (masked) modality vectors and the mask itself."""

    def __init__(self, n_modalities: int, proj_dim: int, hidden_dim: int, dropout: float):
        super().__init__(*mlp(n_modalities * (proj_dim + 1), hidden_dim, proj_dim, dropout))

    def forward(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = torch.cat([z.flatten(start_dim=2), mask], dim=-1)
        for layer in self:
            x = layer(x)
        return x


@FUSIONS.register("gated")
class GatedFusion(nn.Module):
    """Query-conditioned attention over the present modalities."""

    def __init__(self, n_modalities: int, proj_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.gate = mlp(2 * proj_dim, hidden_dim, 1, 0.0)
        self.gate_bias = nn.Parameter(torch.zeros(n_modalities))

    def weights(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, M] weights, summing to 1 over present modalities, 0 for absent ones."""
        qe = q[:, None, None, :].expand_as(z)
        logits = self.gate(torch.cat([qe, z], dim=-1)).squeeze(-1) + self.gate_bias
        logits = logits.masked_fill(mask <= 0, torch.finfo(logits.dtype).min)
        return torch.softmax(logits, dim=-1) * (mask > 0)

    def forward(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.weights(q, z, mask).unsqueeze(-1) * z).sum(dim=2)


class _PresentPool(nn.Module):
    """Base of the parameter-free pooling fusions (the design notes' max / average pooling)."""

    def __init__(self, n_modalities: int, proj_dim: int, hidden_dim: int, dropout: float):
        super().__init__()


@FUSIONS.register("max_pool")
class MaxPoolFusion(_PresentPool):
    """Element-wise max over the present modalities (0 when none is present)."""

    def forward(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        present = (mask > 0).unsqueeze(-1)
        pooled = z.masked_fill(~present, torch.finfo(z.dtype).min).amax(dim=2)
        return torch.where(present.any(dim=2), pooled, torch.zeros_like(pooled))


@FUSIONS.register("avg_pool")
class AvgPoolFusion(_PresentPool):
    """Mean over the present modalities (0 when none is present)."""

    def forward(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = (mask > 0).to(z.dtype)
        return (z * m.unsqueeze(-1)).sum(dim=2) / m.sum(dim=2, keepdim=True).clamp_min(1.0)


@FUSIONS.register("weighted_sum")
class WeightedSumFusion(nn.Module):
    """z = sum_k alpha_k z_k with one learned global weight per modality: alpha = softmax of `alpha_logits`
    over the present modalities (absent ones weigh 0), the same for every query and product."""

    def __init__(self, n_modalities: int, proj_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.alpha_logits = nn.Parameter(torch.zeros(n_modalities))

    def weights(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, M] weights, summing to 1 over present modalities, 0 for absent ones."""
        logits = self.alpha_logits.expand_as(mask).masked_fill(mask <= 0, torch.finfo(z.dtype).min)
        return torch.softmax(logits, dim=-1) * (mask > 0)

    def forward(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.weights(q, z, mask).unsqueeze(-1) * z).sum(dim=2)
