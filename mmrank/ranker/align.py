"""Cross-modal alignment learned from the catalog itself: query-text <-> image and query-text <-> audio matches.

Every product's own (text, image) and (text, audio) embeddings are free, plentiful training pairs (far more
than judged queries). `fit_alignment` learns linear projections `align_text [Dt, A]`, `align_image [Di, A]`,
`align_audio [Da, A]` with a symmetric InfoNCE loss (CLIP-style, in-batch negatives, `train.align.*`), so
that text and the other modality of the same product land close in the shared space; the text projection is
shared by both pairs. Queries are embedded by the same text encoder as product text, so a query's text
projected by `align_text` can be matched to product images and sounds even when the image encoder has no
pretrained weights. The FusionRanker takes the projections as buffers (`set_alignment`) and feeds the cosines
to its scorer as match features; LightGBM gets the same cosines (`aligned_cosines`).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from mmrank.config import AlignConf
from mmrank.modalities import ModalityDims, l2_normalize

log = logging.getLogger("mmrank.align")

ALIGNED = ("image", "audio")
MIN_PAIRS = 8


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of row-aligned pairs: row i of `a` should match row i of `b` against the batch."""
    a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def fit_alignment(text: np.ndarray, others: dict[str, np.ndarray], cfg: AlignConf, seed: int
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """Projections from product embeddings: `text` [N, Dt]; `others[m]` [N, Dm] with NaN rows where the product
    lacks modality m. Returns ({align_text, align_image, align_audio}: float32 [D, A]; info: pairs and final
    loss per modality). A modality with fewer than MIN_PAIRS pairs keeps a zero projection (cosine 0)."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        proj = nn.ModuleDict({m: nn.Linear(x.shape[1], cfg.dim, bias=False)
                              for m, x in {"text": text, **others}.items()})
    t = torch.as_tensor(l2_normalize(np.asarray(text, np.float32)))
    data = {}
    for m, x in others.items():
        ok = ~np.isnan(x).any(axis=1)
        if ok.sum() >= MIN_PAIRS:
            data[m] = (t[torch.as_tensor(ok)], torch.as_tensor(l2_normalize(np.asarray(x[ok], np.float32))))
    info: dict = {"pairs": {m: int(len(d[0])) for m, d in data.items()}, "loss": {}}
    if data:
        opt = torch.optim.Adam([p for m in ("text", *data) for p in proj[m].parameters()], lr=cfg.lr)
        for _ in range(cfg.epochs):
            for m, (tx, ox) in data.items():
                order = torch.randperm(len(tx), generator=g)
                for s in range(0, len(tx) - 1, cfg.batch_size):
                    idx = order[s:s + cfg.batch_size]
                    if len(idx) < 2:
                        continue
                    loss = info_nce(proj["text"](tx[idx]), proj[m](ox[idx]), cfg.temperature)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    info["loss"][m] = float(loss.detach())
    state = {f"align_{m}": (proj[m].weight.detach().T.numpy().copy() if m == "text" or m in data
                            else np.zeros((proj[m].in_features, cfg.dim), np.float32))
             for m in ("text", *others)}
    log.info("alignment: pairs %s, final InfoNCE %s", info["pairs"], info["loss"])
    return {k: v.astype(np.float32) for k, v in state.items()}, info


def aligned_cosines(batch, state: dict[str, np.ndarray]) -> np.ndarray:
    """[B, L, 2] cosines query-text/product-image and query-text/product-audio in the aligned spaces, 0 where
    the query has no text or the product lacks the modality (numpy; the model computes the same in torch)."""
    def arr(k):
        return batch[k].detach().cpu().numpy().astype(np.float64)

    q = l2_normalize(arr("q_text") @ state["align_text"]) * (arr("q_mask")[:, :1] > 0)
    out = []
    for i, m in enumerate(ALIGNED, start=1):
        p = l2_normalize(arr(f"p_{m}") @ state[f"align_{m}"]) * (arr("p_mask")[..., i:i + 1] > 0)
        out.append(np.einsum("bd,bld->bl", q, p))
    return np.stack(out, axis=-1)


def alignment_state(lh, cfg: AlignConf, dims: ModalityDims, seed: int) -> tuple[dict[str, np.ndarray], dict] | None:
    """Fit the alignment on up to `cfg.max_pairs` products (a seeded hash sample, so driver memory is bounded)
    that have text and an image or a sound in `product_features`; None when disabled or there are none."""
    if not cfg.enabled or not lh.exists("product_features"):
        return None
    from pyspark.sql import functions as F

    from mmrank.scoring.features import pivot

    rows = (pivot(lh.read("product_features"), "product_id", ("text", *ALIGNED), dims.as_dict())
            .where(F.col("text").isNotNull() & (F.col("image").isNotNull() | F.col("audio").isNotNull()))
            .orderBy(F.xxhash64(F.lit(seed), "product_id"), "product_id").limit(cfg.max_pairs).toPandas())
    if len(rows) < MIN_PAIRS:
        return None

    def mat(col: str, d: int) -> np.ndarray:
        return np.stack([np.asarray(v, np.float32) if v is not None else np.full(d, np.nan, np.float32)
                         for v in rows[col]])

    others = {m: mat(m, dims.of(m)) for m in ALIGNED}
    return fit_alignment(mat("text", dims.text), others, cfg, seed)
