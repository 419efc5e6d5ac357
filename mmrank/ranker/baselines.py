"""Non-neural baselines scored on the batch contract: similarity and BM25 (unsupervised), LightGBM LambdaMART.

All return scores `[B, L]` (numpy) for a batch; padding slots get -inf (metrics rank padding last anyway).

LightGBM features per (query, product) pair, chosen so the trees see the same information as the fusion
model: the cosine similarities query-text/product-text and query-audio/product-audio, the aligned cross-modal
cosines (query-text/product-image and /product-audio, when an alignment is given: `mmrank.ranker.align`), the
lexical match features (`p_lex`), the 5 modality masks, and every raw embedding (query text/audio, product
text/image/audio) reduced by a PCA fitted on the training split only (`evaluate.lgbm_pca_dim` components
each). LambdaMART labels are grades in half steps (label = round(2 grade), label_gain 2^(label/2) - 1: the
evaluation's exponential gain, exact for grades like 0.5 from a rescaled 1-3 judgment scale).
"""
from __future__ import annotations


import numpy as np
from sklearn.decomposition import PCA

from mmrank.config import EvaluateConf
from mmrank.lexical import BM25_ALL, N_LEX
from mmrank.modalities import QUERY_MODALITIES, l2_normalize, search_choice
from mmrank.ranker.batch import PAD_GRADE, Batch


_EMBEDDINGS = ("q_text", "q_audio", "p_text", "p_image", "p_audio")
_STEPS = 2                                                       # label = round(_STEPS * grade)
_MAX_LABEL = 60
_LABEL_GAIN = [2.0 ** (i / _STEPS) - 1.0 for i in range(_MAX_LABEL + 1)]  # = the metrics' gain of grade i / 2


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _real(batch: Batch) -> np.ndarray:
    return _np(batch["grades"]) != PAD_GRADE


def cosine(batch: Batch, modality: str) -> np.ndarray:
    """[B, L] cosine between the query's and each product's `modality` embedding (0 when either is absent)."""
    q, p = l2_normalize(_np(batch[f"q_{modality}"])), l2_normalize(_np(batch[f"p_{modality}"]))
    return np.einsum("bd,bld->bl", q, p)


def similarity_scores(batch: Batch) -> np.ndarray:
    """Unsupervised baseline: the cosine in the modality the query searches with (`search_choice`: text for a
    typed query, audio for a voice query)."""
    q_mask = _np(batch["q_mask"])
    choice = search_choice({m: q_mask[:, i] > 0 for i, m in enumerate(QUERY_MODALITIES)})
    s = np.where(choice["text"][:, None], cosine(batch, "text"), cosine(batch, "audio"))
    return np.where(_real(batch), s, -np.inf)


def lexical(batch: Batch) -> np.ndarray:
    """[B, L, N_LEX] lexical features of the batch (zeros when it has none)."""
    lex = batch.get("p_lex")
    return _np(lex) if lex is not None else np.zeros((*batch["grades"].shape, N_LEX))


def bm25_scores(batch: Batch) -> np.ndarray:
    """Unsupervised lexical baseline: BM25 of the query over the product's text fields (`all`)."""
    return np.where(_real(batch), lexical(batch)[..., BM25_ALL], -np.inf)


class LambdaMART:
    """`lightgbm.LGBMRanker(objective="lambdarank")` on cosine + aligned cosine + lexical + mask + PCA-embedding
    pair features. `align`: the learned cross-modal projections (`mmrank.ranker.align.fit_alignment`), or None."""

    def __init__(self, cfg: EvaluateConf, seed: int, align: dict | None = None):
        self.cfg, self.seed, self.align = cfg, seed, align
        self.pca: dict[str, PCA | None] = {}
        self.model = None

    def _fit_pca(self, batch: Batch) -> None:
        real = _real(batch)
        for name in _EMBEDDINGS:
            x = _np(batch[name])
            x = x[real.any(axis=1)] if x.ndim == 2 else x[real]
            n = min(self.cfg.lgbm_pca_dim, x.shape[1], max(len(x) - 1, 1))
            self.pca[name] = PCA(n, random_state=self.seed).fit(x) if n < x.shape[1] and len(x) > n else None

    def features(self, batch: Batch) -> np.ndarray:
        """[B * L, F] pair features in row-major slot order."""
        B, L = batch["grades"].shape
        from mmrank.ranker.align import aligned_cosines

        cols = [cosine(batch, "text")[..., None], cosine(batch, "audio")[..., None], lexical(batch),
                _np(batch["p_mask"]), np.broadcast_to(_np(batch["q_mask"])[:, None, :], (B, L, 2))]
        if self.align is not None:
            cols.append(aligned_cosines(batch, self.align))
        for name in _EMBEDDINGS:
            x = _np(batch[name])
            flat = x.reshape(-1, x.shape[-1])
            red = self.pca[name].transform(flat) if self.pca.get(name) is not None else flat
            red = red.reshape(*x.shape[:-1], red.shape[-1])
            cols.append(np.broadcast_to(red[:, None, :], (B, L, red.shape[-1])) if x.ndim == 2 else red)
        return np.concatenate(cols, axis=-1).reshape(B * L, -1)

    def _xyg(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        real = _real(batch).reshape(-1)
        y = np.clip(np.rint(_STEPS * _np(batch["grades"])), 0, _MAX_LABEL).astype(int).reshape(-1)
        return self.features(batch)[real], y[real], _real(batch).sum(axis=1)

    def fit(self, train: Batch, val: Batch | None = None) -> "LambdaMART":
        import lightgbm as lgb

        self._fit_pca(train)
        x, y, g = self._xyg(train)
        self.model = lgb.LGBMRanker(objective="lambdarank", random_state=self.seed, verbose=-1,
                                    label_gain=_LABEL_GAIN, **self.cfg.lgbm_params)
        kw: dict = {}
        if val:
            xv, yv, gv = self._xyg(val)
            kw = dict(eval_set=[(xv, yv)], eval_group=[gv[gv > 0]], eval_at=[max(self.cfg.ks)],
                      callbacks=[lgb.early_stopping(self.cfg.lgbm_early_stopping, verbose=False)])
        self.model.fit(x, y, group=g[g > 0], **kw)
        return self

    def scores(self, batch: Batch) -> np.ndarray:
        B, L = batch["grades"].shape
        s = self.model.predict(self.features(batch)).reshape(B, L)
        return np.where(_real(batch), s, -np.inf)
