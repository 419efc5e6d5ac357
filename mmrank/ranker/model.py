"""FusionRanker: scores (query, product) pairs from text / image / audio features with missing-modality masks.

Architecture (all sizes from TrainConf):
- per-modality projections `Linear -> LayerNorm -> GELU` to `proj_dim` for product text/image/audio and
  query text/audio; inputs of absent modalities are zeroed *before* projection and their outputs masked;
- query representation q = masked mean of the present query modalities (0 if none);
- fusion (`cfg.fusion`, a registered `mmrank.ranker.fusion` class): `concat` (MLP over the masked modality
  vectors and the mask, the design-notes baseline) or `gated` (query-conditioned softmax weights over the
  present modalities);
- scorer MLP on [q, fused, q*fused, match] with dropout -> one score per slot, where `match` (with
  `cfg.match_features`) holds the cosines query-text/product-text and query-audio/product-audio (same encoder,
  same space), each 0 unless both sides have that modality and the product modality is allowed and unmasked.
  A projection can learn such an interaction only from many queries; given explicitly, it is a strong prior
  that needs no training data (the similarity baseline is this cosine alone).

Modalities: product modalities outside `cfg.modalities` are masked out everywhere (single-modality models
use the same code). Query modalities are always used: a query is the information need, not a feature
under study. In training mode, `cfg.modality_dropout` masks each present product modality with that
probability, never all present modalities of an item (one survivor is then chosen at random).
"""
from __future__ import annotations

import torch
from torch import nn

from mmrank.config import TrainConf
from mmrank.modalities import MATCHED, PRODUCT_MODALITIES, QUERY_MODALITIES, ModalityDims
from mmrank.ranker.batch import Batch
from mmrank.ranker.fusion import masked, mlp
from mmrank.registry import FUSIONS

N_PRODUCT_MODALITIES = len(PRODUCT_MODALITIES)
_MATCHED_PRODUCT = [PRODUCT_MODALITIES.index(m) for m in MATCHED]
_MATCHED_QUERY = [QUERY_MODALITIES.index(m) for m in MATCHED]


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU())


class FusionRanker(nn.Module):
    """Multimodal ranker. `forward(batch) -> scores [B, L]` for the batch contract of `mmrank.ranker.batch`."""

    def __init__(self, dims: ModalityDims, cfg: TrainConf):
        super().__init__()
        if not cfg.modalities:
            raise ValueError("train.modalities must name at least one of text, image, audio")
        self.dims, self.cfg = dims, cfg
        p = cfg.proj_dim
        self.product_proj = nn.ModuleDict({m: _projection(dims.of(m), p) for m in PRODUCT_MODALITIES})
        self.query_proj = nn.ModuleDict({m: _projection(dims.of(m), p) for m in QUERY_MODALITIES})
        self.fusion = FUSIONS.get(cfg.fusion)(N_PRODUCT_MODALITIES, p, cfg.hidden_dim, cfg.dropout)
        self.n_match = len(MATCHED) if cfg.match_features else 0
        self.scorer = mlp(3 * p + self.n_match, cfg.hidden_dim, 1, cfg.dropout)
        self.register_buffer("allowed", torch.tensor([float(m in cfg.modalities) for m in PRODUCT_MODALITIES]),
                             persistent=False)

    # ---- pieces -------------------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [B, P], z [B, L, 3, P], product mask [B, L, 3] after `cfg.modalities` (no modality dropout),
        match [B, L, len(MATCHED)] raw query-product cosines, 0 where the query lacks the modality)."""
        z, mask = self._encode_products(batch)
        return self._encode_queries(batch), z, mask, self._match(batch)

    def _encode_queries(self, batch: Batch) -> torch.Tensor:
        """q [B, P]: masked mean of the present query modalities' projections (0 if none)."""
        q_mask = batch["q_mask"]
        q_parts = torch.stack([masked(self.query_proj[m](masked(batch[f"q_{m}"], q_mask[:, i])), q_mask[:, i])
                               for i, m in enumerate(QUERY_MODALITIES)], dim=1)          # [B, 2, P]
        return q_parts.sum(dim=1) / q_mask.sum(dim=1, keepdim=True).clamp_min(1.0)

    def _encode_products(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [..., 3, P] masked projections, mask [..., 3] after `cfg.modalities`) of the products."""
        mask = batch["p_mask"] * self.allowed
        z = torch.stack([self.product_proj[m](masked(batch[f"p_{m}"], mask[..., i]))
                         for i, m in enumerate(PRODUCT_MODALITIES)], dim=-2)             # [..., 3, P]
        return masked(z, mask), mask

    def _match(self, batch: Batch) -> torch.Tensor:
        B, L = batch["p_mask"].shape[:2]
        if not self.n_match:
            return batch["p_mask"].new_zeros(B, L, 0)
        cos = []
        for m, qi, pi in zip(MATCHED, _MATCHED_QUERY, _MATCHED_PRODUCT):
            q = masked(batch[f"q_{m}"], batch["q_mask"][:, qi]).unsqueeze(1)       # absent -> 0 -> cosine 0
            p = masked(batch[f"p_{m}"], batch["p_mask"][..., pi])
            cos.append(nn.functional.cosine_similarity(q, p, dim=-1, eps=1e-8))
        return torch.stack(cos, dim=-1)

    def fuse(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, P] fused product representation for the given (possibly occluded) mask."""
        return self.fusion(q, masked(z, mask), mask)

    def score(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
        """[B, L] scores from encoded inputs under `mask` (a masked product modality also hides its match)."""
        fused = self.fuse(q, z, mask)
        qe = q.unsqueeze(1).expand_as(fused)
        match = match * mask[..., _MATCHED_PRODUCT] if self.n_match else match
        return self.scorer(torch.cat([qe, fused, qe * fused, match], dim=-1)).squeeze(-1)

    def modality_dropout(self, mask: torch.Tensor) -> torch.Tensor:
        """Drop each present modality with prob `cfg.modality_dropout` (global torch RNG); an item that would
        lose every modality keeps one of its present modalities, chosen uniformly."""
        if self.cfg.modality_dropout <= 0:
            return mask
        u = torch.rand(mask.shape, device=mask.device)
        dropped = mask * (u >= self.cfg.modality_dropout).to(mask.dtype)
        one = torch.zeros_like(mask).scatter_(-1, (u * mask).argmax(-1, keepdim=True), 1.0) * mask
        return torch.where(dropped.sum(-1, keepdim=True) > 0, dropped, one)

    # ---- public -------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> torch.Tensor:
        """Scores [B, L]; padding slots get a finite but meaningless score."""
        q, z, mask, match = self.encode(batch)
        if self.training:
            mask = self.modality_dropout(mask)
        return self.score(q, z, mask, match)

    @torch.no_grad()
    def score_and_contributions(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, L], contributions [B, L, 3]) from one encoding pass. A contribution is the occlusion
        delta score(all present) - score(modality m masked) for each present product modality m, 0 for absent
        ones. Computed in eval mode (no dropout), so deterministic. Contributions do not sum to the score in
        general (interactions between modalities are not attributed)."""
        was_training = self.training
        self.eval()
        try:
            return self._with_contributions(*self.encode(batch))
        finally:
            self.train(was_training)

    def _with_contributions(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, match: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, occlusion contributions) from encoded inputs (see `score_and_contributions`)."""
        full = self.score(q, z, mask, match)
        out = torch.zeros_like(mask)
        for i in range(N_PRODUCT_MODALITIES):
            if not bool((mask[..., i] > 0).any()):
                continue
            occluded = mask.clone()
            occluded[..., i] = 0.0
            out[..., i] = torch.where(mask[..., i] > 0, full - self.score(q, z, occluded, match), 0.0)
        return full, out

    def contributions(self, batch: Batch) -> torch.Tensor:
        """[B, L, 3] per-modality occlusion contributions (see `score_and_contributions`)."""
        return self.score_and_contributions(batch)[1]

    @torch.no_grad()
    def gate_weights(self, batch: Batch) -> torch.Tensor:
        """[B, L, 3] query-conditioned modality weights of a weighting fusion such as `gated` (sum 1 over
        present modalities, 0 for absent ones). ValueError for a fusion without weights (`concat`)."""
        if not hasattr(self.fusion, "weights"):
            raise ValueError(f"gate_weights needs a weighting fusion (e.g. gated); train.fusion is {self.cfg.fusion!r}")
        q, z, mask, _ = self.encode(batch)
        return self.fusion.weights(q, z, mask)

    # ---- scoring pairs from per-item codes: each query and product encoded once ---------------------------
    @torch.no_grad()
    def encode_queries(self, q_text: torch.Tensor, q_audio: torch.Tensor, q_mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Codes of N queries (inputs shaped as in a batch: [N, D], mask [N, 2]): `q` [N, P] and, per matched
        modality, the masked embedding scaled to unit length (zero when absent), for the match cosines."""
        batch = {"q_text": q_text, "q_audio": q_audio, "q_mask": q_mask}
        codes = {"q": self._encode_queries(batch)}
        for m, qi in zip(MATCHED, _MATCHED_QUERY):
            codes[m] = _unit(masked(batch[f"q_{m}"], q_mask[:, qi]))
        return codes

    @torch.no_grad()
    def encode_products(self, p_text: torch.Tensor, p_image: torch.Tensor, p_audio: torch.Tensor,
                        p_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes of N products ([N, D] inputs, mask [N, 3]): `z` [N, 3, P], `mask` [N, 3] after
        `cfg.modalities`, and the unit-length masked embeddings of the matched modalities."""
        batch = {"p_text": p_text, "p_image": p_image, "p_audio": p_audio, "p_mask": p_mask}
        z, mask = self._encode_products(batch)
        codes = {"z": z, "mask": mask}
        for m, pi in zip(MATCHED, _MATCHED_PRODUCT):
            codes[m] = _unit(masked(batch[f"p_{m}"], p_mask[:, pi]))
        return codes

    @torch.no_grad()
    def score_codes(self, queries: dict[str, torch.Tensor], products: dict[str, torch.Tensor],
                    qi: torch.Tensor, pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [n], contributions [n, 3]) of the pairs (queries[qi[j]], products[pi[j]]) from
        `encode_queries` / `encode_products` codes: what `score_and_contributions` gives for the same pairs as
        lists of one (equal up to float rounding), without encoding a query or product twice. Eval mode."""
        was_training = self.training
        self.eval()
        try:
            match = (torch.stack([(queries[m][qi] * products[m][pi]).sum(-1) for m in MATCHED], dim=-1)
                     if self.n_match else products["mask"].new_zeros(len(pi), 0))
            s, c = self._with_contributions(queries["q"][qi], products["z"][pi].unsqueeze(1),
                                            products["mask"][pi].unsqueeze(1), match.unsqueeze(1))
            return s[:, 0], c[:, 0]
        finally:
            self.train(was_training)


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), the normalisation inside the match cosines."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
