"""FusionRanker: scores (query, product) pairs from text / image / audio features with missing-modality masks.

Architecture (all sizes from TrainConf):
- per-modality projections `Linear -> LayerNorm -> GELU` to `proj_dim` for product text/image/audio and
  query text/audio; inputs of absent modalities are zeroed *before* projection and their outputs masked;
- query representation q = masked mean of the present query modalities (0 if none);
- fusion (`cfg.fusion`, a registered `mmrank.ranker.fusion` class): `concat` (MLP over the masked modality
  vectors and the mask, the design-notes baseline), `gated` (query-conditioned softmax weights over the
  present modalities), `weighted_sum` (learned global weights), `max_pool` or `avg_pool`;
- optional PCA of each modality's raw embeddings before its projection (`cfg.pca_dim`, `mmrank.ranker.pca`);
- scoring head (`cfg.head`, a registered `mmrank.ranker.heads` module: `mlp` with dropout, `linear`,
  `logistic`) on [q, fused, q*fused, match, lex] -> one score per slot, where `match` (with
  `cfg.match_features`) holds the cosines query-text/product-text and query-audio/product-audio (same encoder,
  same space), each 0 unless both sides have that modality and the product modality is allowed and unmasked.
  A projection can learn such an interaction only from many queries; given explicitly, it is a strong prior
  that needs no training data (the similarity baseline is this cosine alone). With `cfg.align.enabled`,
  `match` also holds the cosines query-text/product-image and query-text/product-audio in the spaces learned
  from the catalog's own (text, image) / (text, audio) pairs (`mmrank.ranker.align`, loaded with
  `set_alignment`; 0 until then). With `cfg.lexical_features` the scorer also sees log1p of the pair's lexical
  features (`p_lex`, hidden when product text is masked: they are read from the text);
- prior + residual (`cfg.prior`): score = exp(s) * prior + scorer output, where `s` (learned) starts at
  log(`cfg.prior_scale`) and the scorer's last layer starts at zero, so an untrained model ranks exactly like
  the prior: `similarity` = the cosine in the query's search modality (typed: text, or with text masked the
  aligned cross-modal cosines; voice: audio), `bm25` = log1p(BM25 over all fields), `none` = no prior.

Modalities: product modalities outside `cfg.modalities` are masked out everywhere (single-modality models
use the same code). Query modalities are always used: a query is the information need, not a feature
under study. In training mode, `cfg.modality_dropout` masks each present product modality with that
probability, never all present modalities of an item (one survivor is then chosen at random).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mmrank.config import TrainConf
from mmrank.lexical import BM25_ALL, N_LEX
from mmrank.modalities import MATCHED, PRODUCT_MODALITIES, QUERY_MODALITIES, ModalityDims
from mmrank.ranker.align import ALIGNED  # product modalities matched to query text via the alignment
from mmrank.ranker.batch import Batch
from mmrank.ranker.fusion import masked
from mmrank.ranker.pca import PCAInputs
from mmrank.registry import FUSIONS, HEADS

N_PRODUCT_MODALITIES = len(PRODUCT_MODALITIES)
_MATCHED_PRODUCT = [PRODUCT_MODALITIES.index(m) for m in MATCHED]
_MATCHED_QUERY = [QUERY_MODALITIES.index(m) for m in MATCHED]
_TEXT = PRODUCT_MODALITIES.index("text")


def zero_last_linear(module: nn.Module) -> None:
    """Zero the weight and bias of the last `nn.Linear` in `module` (a residual that starts at 0)."""
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


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
        self.pca = PCAInputs(dims, cfg.pca_dim) if cfg.pca_dim else None
        width = self.pca.out_dim if self.pca is not None else dims.of
        self.product_proj = nn.ModuleDict({m: _projection(width(m), p) for m in PRODUCT_MODALITIES})
        self.query_proj = nn.ModuleDict({m: _projection(width(m), p) for m in QUERY_MODALITIES})
        self.fusion = FUSIONS.get(cfg.fusion)(N_PRODUCT_MODALITIES, p, cfg.hidden_dim, cfg.dropout)
        self.match_product = (_MATCHED_PRODUCT if cfg.match_features else []) + \
            ([PRODUCT_MODALITIES.index(m) for m in ALIGNED] if cfg.align.enabled else [])
        self.n_match, self.n_lex = len(self.match_product), N_LEX if cfg.lexical_features else 0
        self.scorer = HEADS.get(cfg.head)(3 * p + self.n_match + self.n_lex, cfg.hidden_dim, cfg.dropout)
        self.register_buffer("allowed", torch.tensor([float(m in cfg.modalities) for m in PRODUCT_MODALITIES]),
                             persistent=False)
        if cfg.align.enabled:  # filled by set_alignment; saved with the model
            for m in ("text", *ALIGNED):
                self.register_buffer(f"align_{m}", torch.zeros(dims.of(m), cfg.align.dim))
        if cfg.prior != "none":
            self.prior_log_scale = nn.Parameter(torch.tensor(math.log(cfg.prior_scale)))
            zero_last_linear(self.scorer)

    def set_alignment(self, state: dict[str, torch.Tensor]) -> None:
        """Load the learned cross-modal projections (`mmrank.ranker.align`: align_text/image/audio)."""
        for k, v in state.items():
            v = torch.as_tensor(v, dtype=torch.float32)
            if getattr(self, k).shape != v.shape:
                raise ValueError(f"{k} has shape {tuple(v.shape)}, the model expects {tuple(getattr(self, k).shape)} "
                                 "(train.align.dim and the embedding widths must match)")
            getattr(self, k).copy_(v)

    # ---- pieces -------------------------------------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [B, P], z [B, L, 3, P], product mask [B, L, 3] after `cfg.modalities` (no modality dropout),
        pair [B, L, n_match + n_lex + 1]: the raw query-product match cosines (0 where the query lacks the
        modality), the raw lexical features, and 1 for a typed query)."""
        z, mask = self._encode_products(batch)
        return self._encode_queries(batch), z, mask, self._pair(batch)

    def _encode_queries(self, batch: Batch) -> torch.Tensor:
        """q [B, P]: masked mean of the present query modalities' projections (0 if none)."""
        q_mask = batch["q_mask"]
        q_parts = torch.stack([masked(self.query_proj[m](self._inputs(m, batch[f"q_{m}"], q_mask[:, i])), q_mask[:, i])
                               for i, m in enumerate(QUERY_MODALITIES)], dim=1)          # [B, 2, P]
        return q_parts.sum(dim=1) / q_mask.sum(dim=1, keepdim=True).clamp_min(1.0)

    def _encode_products(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [..., 3, P] masked projections, mask [..., 3] after `cfg.modalities`) of the products."""
        mask = batch["p_mask"] * self.allowed
        z = torch.stack([self.product_proj[m](self._inputs(m, batch[f"p_{m}"], mask[..., i]))
                         for i, m in enumerate(PRODUCT_MODALITIES)], dim=-2)             # [..., 3, P]
        return masked(z, mask), mask

    def _inputs(self, modality: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw embeddings with absent rows zeroed, then the modality's PCA (`train.pca_dim`) if any."""
        x = masked(x, mask)
        return self.pca(modality, x) if self.pca is not None else x

    def _match(self, batch: Batch) -> torch.Tensor:
        B, L = batch["p_mask"].shape[:2]
        if not self.n_match:
            return batch["p_mask"].new_zeros(B, L, 0)
        cos = []
        pairs = [(batch[f"q_{m}"], qi, batch[f"p_{m}"], pi)
                 for m, qi, pi in zip(MATCHED, _MATCHED_QUERY, _MATCHED_PRODUCT)] if self.cfg.match_features else []
        if self.cfg.align.enabled:
            q_text = batch["q_text"] @ self.align_text
            pairs += [(q_text, 0, batch[f"p_{m}"] @ getattr(self, f"align_{m}"), PRODUCT_MODALITIES.index(m))
                      for m in ALIGNED]
        for q, qi, p, pi in pairs:
            q = masked(q, batch["q_mask"][:, qi]).unsqueeze(1)       # absent -> 0 -> cosine 0
            p = masked(p, batch["p_mask"][..., pi])      # fp32: under fp16 autocast eps underflows, 0/0 = nan
            cos.append(nn.functional.cosine_similarity(q.float(), p.float(), dim=-1, eps=1e-8))
        return torch.stack(cos, dim=-1)

    def _pair(self, batch: Batch) -> torch.Tensor:
        """[B, L, n_match + n_lex + 1]: match cosines, raw lexical features, typed-query flag."""
        B, L = batch["p_mask"].shape[:2]
        lex = batch.get("p_lex")
        lex = lex[..., :self.n_lex] if lex is not None else batch["p_mask"].new_zeros(B, L, self.n_lex)
        typed = (batch["q_mask"][:, None, :1] > 0).to(lex.dtype).expand(B, L, 1)
        return torch.cat([self._match(batch), lex, typed], dim=-1)

    def prior(self, pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] the configured prior from `encode`'s pair features under `mask` (0 for `none`)."""
        kind, n = self.cfg.prior, self.n_match
        if kind == "none":
            return mask.new_zeros(mask.shape[:2])
        text = mask[..., _TEXT]
        if kind == "bm25":
            return torch.log1p(pair[..., n + BM25_ALL].clamp_min(0.0)) * text if self.n_lex else 0.0 * text
        match = pair[..., :n] * mask[..., self.match_product]
        names = [(m, "direct") for m in MATCHED] * bool(self.cfg.match_features) + \
            [(m, "aligned") for m in ALIGNED] * bool(self.cfg.align.enabled)
        col = {name: i for i, name in enumerate(names)}
        if self.allowed[_TEXT] > 0 and ("text", "direct") in col:
            typed_prior = match[..., col[("text", "direct")]]
        else:   # a model without product text (image_only, audio_only): the aligned cross-modal cosines
            aligned = [match[..., col[(m, "aligned")]] for m in ALIGNED
                       if (m, "aligned") in col and self.allowed[PRODUCT_MODALITIES.index(m)] > 0]
            typed_prior = torch.stack(aligned).mean(0) if aligned else 0.0 * text
        voice_prior = match[..., col[("audio", "direct")]] if ("audio", "direct") in col else 0.0 * text
        return torch.where(pair[..., -1] > 0, typed_prior, voice_prior)

    @torch.no_grad()
    def prior_scores(self, batch: Batch) -> torch.Tensor | None:
        """[B, L] the prior alone (what the untrained model ranks by), or None without a prior."""
        if self.cfg.prior == "none":
            return None
        _, _, mask, pair = self.encode(batch)
        return self.prior(pair, mask)

    def fuse(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, P] fused product representation for the given (possibly occluded) mask."""
        return self.fusion(q, masked(z, mask), mask)

    def score(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """[B, L] scores from encoded inputs under `mask` (a masked product modality also hides its match; masked
        text hides the lexical features)."""
        fused = self.fuse(q, z, mask)
        qe = q.unsqueeze(1).expand_as(fused)
        n = self.n_match
        match = pair[..., :n] * mask[..., self.match_product]
        lex = torch.log1p(pair[..., n:n + self.n_lex].clamp_min(0.0)) * mask[..., _TEXT:_TEXT + 1]
        out = self.scorer(torch.cat([qe, fused, qe * fused, match, lex], dim=-1)).squeeze(-1)
        if self.cfg.prior == "none":
            return out
        return self.prior_log_scale.exp() * self.prior(pair, mask) + out

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
        q, z, mask, pair = self.encode(batch)
        if self.training:
            mask = self.modality_dropout(mask)
        return self.score(q, z, mask, pair)

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

    def _with_contributions(self, q: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, pair: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, occlusion contributions) from encoded inputs (see `score_and_contributions`)."""
        full = self.score(q, z, mask, pair)
        out = torch.zeros_like(mask)
        for i in range(N_PRODUCT_MODALITIES):
            if not bool((mask[..., i] > 0).any()):
                continue
            occluded = mask.clone()
            occluded[..., i] = 0.0
            out[..., i] = torch.where(mask[..., i] > 0, full - self.score(q, z, occluded, pair), 0.0)
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
    def _cosine_sides(self) -> list[tuple[str, int, int]]:
        """(code name, query modality index, product modality index) of each match cosine, in `_match` order."""
        direct = [(m, qi, pi) for m, qi, pi in zip(MATCHED, _MATCHED_QUERY, _MATCHED_PRODUCT)]
        aligned = [(f"aligned_{m}", 0, PRODUCT_MODALITIES.index(m)) for m in ALIGNED]
        return direct * bool(self.cfg.match_features) + aligned * bool(self.cfg.align.enabled)

    @torch.no_grad()
    def encode_queries(self, q_text: torch.Tensor, q_audio: torch.Tensor, q_mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Codes of N queries (inputs as in a batch: [N, D], mask [N, 2]): `q` [N, P], `q_mask`, and per match
        cosine the query side scaled to unit length (fp32, zero when absent)."""
        batch = {"q_text": q_text, "q_audio": q_audio, "q_mask": q_mask}
        codes = {"q": self._encode_queries(batch), "q_mask": q_mask}
        for name, qi, _ in self._cosine_sides():
            m = QUERY_MODALITIES[qi]
            x = batch[f"q_{m}"] @ self.align_text if name.startswith("aligned_") else batch[f"q_{m}"]
            codes[name] = _unit(masked(x, q_mask[:, qi]))
        return codes

    @torch.no_grad()
    def encode_products(self, p_text: torch.Tensor, p_image: torch.Tensor, p_audio: torch.Tensor,
                        p_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes of N products ([N, D] inputs, mask [N, 3]): `z` [N, 3, P], `mask` [N, 3] after `cfg.modalities`,
        and per match cosine the product side scaled to unit length (fp32, zero when absent)."""
        batch = {"p_text": p_text, "p_image": p_image, "p_audio": p_audio, "p_mask": p_mask}
        z, mask = self._encode_products(batch)
        codes = {"z": z, "mask": mask}
        for name, _, pi in self._cosine_sides():
            m = PRODUCT_MODALITIES[pi]
            x = batch[f"p_{m}"] @ getattr(self, f"align_{m}") if name.startswith("aligned_") else batch[f"p_{m}"]
            codes[name] = _unit(masked(x, p_mask[:, pi]))
        return codes

    @torch.no_grad()
    def score_codes(self, queries: dict[str, torch.Tensor], products: dict[str, torch.Tensor], qi: torch.Tensor,
                    pi: torch.Tensor, lex: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [n], contributions [n, 3]) of the pairs (queries[qi[j]], products[pi[j]]) from
        `encode_queries` / `encode_products` codes, `lex` [n, N_LEX] the pairs' lexical features: what
        `score_and_contributions` gives for the same pairs as lists of one (equal up to float rounding), without
        encoding a query or product twice. Eval mode."""
        was_training = self.training
        self.eval()
        try:
            n = len(pi)
            cos = [(queries[name][qi] * products[name][pi]).sum(-1) for name, _, _ in self._cosine_sides()]
            match = torch.stack(cos, dim=-1) if cos else products["mask"].new_zeros(n, 0)
            lex = lex[:, :self.n_lex].to(match.dtype) if lex is not None else match.new_zeros(n, self.n_lex)
            typed = (queries["q_mask"][qi, :1] > 0).to(match.dtype)
            pair = torch.cat([match, lex, typed], dim=-1).unsqueeze(1)
            s, c = self._with_contributions(queries["q"][qi], products["z"][pi].unsqueeze(1),
                                            products["mask"][pi].unsqueeze(1), pair)
            return s[:, 0], c[:, 0]
        finally:
            self.train(was_training)


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rows in fp32 scaled to unit L2 norm (zero rows stay zero), the normalisation inside the match cosines."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
