"""Never below the prior: an untrained ranker ranks exactly like its prior, training keeps the prior unless
validation improves, and the catalog-learned cross-modal alignment gives text <-> image / audio matches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrank.config import AlignConf, TrainConf
from mmrank.lexical import BM25_ALL, N_LEX
from mmrank.modalities import ModalityDims
from mmrank.ranker.align import aligned_cosines, fit_alignment, info_nce
from mmrank.ranker.baselines import bm25_scores, similarity_scores
from mmrank.ranker.batch import PAD_GRADE, batch_from_arrays
from mmrank.ranker.fit import build_model, gain_z, train_local
from mmrank.ranker.metrics import evaluate_lists, rank_order

DIMS = ModalityDims(text=8, image=6, audio=5)
SMALL = dict(proj_dim=8, hidden_dim=16, batch_size=16, max_epochs=4, patience=2, seed=3)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(n=24, L=7, seed=0, voice_every=4, grades=None):
    r = np.random.default_rng(seed)
    q_mask = np.ones((n, 2))
    q_mask[::voice_every, 0] = 0.0                                           # voice queries: no text
    q_mask[1::voice_every, 1] = 0.0
    p_mask = (r.random((n, L, 3)) > 0.2).astype(float)
    p_mask[..., 0] = 1.0
    g = r.integers(0, 4, (n, L)).astype(float) if grades is None else grades
    g[:, -1], p_mask[:, -1] = PAD_GRADE, 0.0
    lex = np.abs(r.normal(size=(n, L, N_LEX))) * 3
    return batch_from_arrays(q_text=r.normal(size=(n, 8)), q_audio=r.normal(size=(n, 5)), q_mask=q_mask,
                             p_text=r.normal(size=(n, L, 8)), p_image=r.normal(size=(n, L, 6)),
                             p_audio=r.normal(size=(n, L, 5)), p_mask=p_mask, grades=g, p_lex=lex)


def _order(scores, b):
    return rank_order(np.asarray(scores, np.float64), b["grades"].numpy())


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_untrained_model_ranks_exactly_like_the_similarity_prior(fusion):
    b = batch()
    model = build_model(DIMS, TrainConf(fusion=fusion, **SMALL)).eval()
    with torch.no_grad():
        s = model(b).numpy()
    prior = similarity_scores(b)                      # text cosine for typed queries, audio cosine for voice
    real = b["grades"].numpy() != PAD_GRADE
    assert np.allclose(s[real], model.cfg.prior_scale * prior[real], atol=1e-5)
    assert np.array_equal(_order(s, b), _order(prior, b))
    # lexical features and the (untrained, zero) alignment are inputs, yet change nothing before training
    other = {**b, "p_lex": b["p_lex"] * 7 + 1}
    with torch.no_grad():
        assert torch.allclose(model(other), model(b))
    bm = build_model(DIMS, TrainConf(prior="bm25", **SMALL)).eval()
    with torch.no_grad():
        assert np.array_equal(_order(bm(b).numpy(), b), _order(bm25_scores(b), b))
        assert torch.allclose(bm(b)[..., :2], 10 * torch.log1p(b["p_lex"][..., :2, BM25_ALL]), atol=1e-5)


def test_training_never_ends_below_the_prior_on_validation():
    """Grades that are pure noise: no epoch can beat the prior on validation, so the prior is what is kept."""
    train, val = batch(64, seed=1), batch(32, seed=2)
    prior_ndcg = evaluate_lists(similarity_scores(val), val["grades"].numpy(), ks=(10,))["ndcg@10"]
    model, res = train_local(train, val, DIMS, TrainConf(**{**SMALL, "lr": 3e-2, "max_epochs": 6}))
    with torch.no_grad():
        kept = evaluate_lists(model(val).numpy(), val["grades"].numpy(), ks=(10,))["ndcg@10"]
    assert res.initial_metrics["ndcg@10"] == pytest.approx(prior_ndcg, abs=1e-9)
    assert kept == pytest.approx(res.best_metrics["ndcg@10"], abs=1e-9) and kept >= prior_ndcg
    if res.best_epoch == -1:                                   # nothing beat it: exactly the prior's ranking
        with torch.no_grad():
            assert np.array_equal(_order(model(val).numpy(), val), _order(similarity_scores(val), val))


def test_residual_learns_what_the_prior_misses():
    """Grades follow one lexical feature, not the cosine: training moves the ranking well beyond the prior."""
    tr, va = batch(96, seed=3), batch(48, seed=4)
    for b in (tr, va):
        g = torch.clamp(torch.round(b["p_lex"][..., 3]), 0, 3)
        b["grades"] = torch.where(b["grades"] == PAD_GRADE, b["grades"], g)
    model, res = train_local(tr, va, DIMS, TrainConf(**{**SMALL, "lr": 1e-2, "max_epochs": 8, "patience": 4}))
    assert res.best_epoch >= 0 and res.best_metrics["ndcg@10"] > res.initial_metrics["ndcg@10"] + 0.05


def _paired(n, seed, noise=0.3):
    """Product text and image/audio embeddings that are noisy linear views of one latent per product."""
    r = np.random.default_rng(seed)
    z = r.normal(size=(n, 4))
    a = r.normal(size=(4, 8)), r.normal(size=(4, 6)), r.normal(size=(4, 5))
    text, image, audio = (z @ m + noise * r.normal(size=(n, m.shape[1])) for m in a)
    audio[::3] = np.nan                                             # products without a sound
    return text, image, audio


def test_infonce_alignment_retrieves_a_products_own_image_and_matches_the_model():
    text, image, audio = _paired(400, seed=5)
    align = AlignConf(dim=8, epochs=40, batch_size=64)
    state, info = fit_alignment(text[:300], {"image": image[:300], "audio": audio[:300]}, align, seed=0)
    assert info["pairs"] == {"image": 300, "audio": 200}
    t = text[300:] @ state["align_text"]
    i = image[300:] @ state["align_image"]
    sims = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ (i / np.linalg.norm(i, axis=1, keepdims=True)).T
    top1 = (sims.argmax(axis=1) == np.arange(100)).mean()
    assert top1 > 0.3                                                # chance is 0.01 (held-out products)
    # the model's aligned match features are the same cosines as LightGBM's (numpy) ones
    b = batch(6, seed=6)
    model = build_model(DIMS, TrainConf(align=align, **SMALL), align=state).eval()
    with torch.no_grad():
        pair = model.encode(b)[3]
    assert np.allclose(pair[..., 2:4].numpy(), aligned_cosines(b, state), atol=1e-5)
    # an image-only model's prior is the aligned text->image cosine (no text to compare with)
    img = build_model(DIMS, TrainConf(modalities=["image"], align=align, **SMALL), align=state).eval()
    typed = b["q_mask"][:, 0] > 0
    with torch.no_grad():
        s = img(b)[typed]
    present = (b["p_mask"][typed][..., 1] > 0).numpy()
    want = 10 * aligned_cosines(b, state)[typed.numpy()][..., 0]
    assert np.allclose(s.numpy()[present], want[present], atol=1e-4)
    assert float(info_nce(torch.eye(4), torch.eye(4), 0.1)) < float(info_nce(torch.eye(4), torch.eye(4).flip(0), 0.1))


def test_gain_z_is_the_paired_t_statistic_of_the_per_list_gains():
    gains = np.array([0.1, -0.05, 0.2, 0.0, 0.15])
    z = gain_z([gains.sum(), (gains ** 2).sum(), len(gains)])
    assert z == pytest.approx(gains.mean() / (gains.std(ddof=1) / np.sqrt(len(gains))))
    assert gain_z([0.3, 0.03, 3]) == np.inf and gain_z([0.0, 0.0, 0]) != gain_z([0.0, 0.0, 0])   # nan: no lists


def test_gate_keeps_the_prior_when_the_validation_gain_is_within_noise():
    """Noise grades and a handful of validation lists: some epoch beats the prior on validation by chance (taken
    with the gate off); with the default gate that gain is not evidence, so the prior's ranking is kept."""
    train, val = batch(64, seed=1), batch(6, seed=8)
    cfg = {**SMALL, "lr": 3e-2, "max_epochs": 8, "patience": 8}
    _, loose = train_local(train, val, DIMS, TrainConf(**cfg, prior_gate_z=0.0))
    assert loose.best_epoch >= 0 and loose.best_metrics["ndcg@10"] > loose.initial_metrics["ndcg@10"]
    model, gated = train_local(train, val, DIMS, TrainConf(**cfg))
    assert gated.best_epoch == -1 and TrainConf().prior_gate_z == 2.0
    assert all(h["val_gain_z"] < 2.0 for h in gated.history if h["val_ndcg@10"] > gated.initial_metrics["ndcg@10"])
    with torch.no_grad():
        assert np.array_equal(_order(model(val).numpy(), val), _order(similarity_scores(val), val))
