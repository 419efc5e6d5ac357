"""Metrics against hand arithmetic and independent implementations (sklearn, pytrec_eval)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval
import torch
from sklearn.metrics import ndcg_score

from mmrank.ranker.metrics import (average_precision, dcg_at_k, evaluate_lists, has_relevant, mean_metric,
                                   ndcg_at_k, rank_order, reciprocal_rank)

TOL = 1e-9


def random_lists(n=60, length=12, seed=0, pad=True):
    """Integer grades 0..3, tie-free scores, random padding at the tail; a few all-zero lists."""
    r = np.random.default_rng(seed)
    grades = r.integers(0, 4, size=(n, length)).astype(float)
    grades[:5] = 0.0
    scores = r.permutation(n * length).reshape(n, length) / (n * length) + r.normal(size=(n, length))
    if pad:
        for b, keep in enumerate(r.integers(2, length + 1, size=n)):
            grades[b, keep:] = -1.0
    return scores, grades


# ---- hand-computed ------------------------------------------------------------------------------------------
# scores [0.9, 0.8, 0.1, 0.5(pad)], grades [3, 0, 1, -1]: ranking = slot 0 (g3), slot 1 (g0), slot 2 (g1)
S = np.array([[0.9, 0.8, 0.1, 0.5]])
G = np.array([[3.0, 0.0, 1.0, -1.0]])


def test_hand_computed_exponential():
    dcg = (2**3 - 1) / math.log2(2) + 0 / math.log2(3) + (2**1 - 1) / math.log2(4)       # 7 + 0 + 0.5
    ideal = 7 / math.log2(2) + 1 / math.log2(3)                                          # 7 + 0.6309
    assert dcg_at_k(S, G)[0] == pytest.approx(7.5, abs=TOL)
    assert ndcg_at_k(S, G)[0] == pytest.approx(dcg / ideal, abs=TOL)
    assert dcg_at_k(S, G, k=1)[0] == pytest.approx(7.0, abs=TOL)
    assert ndcg_at_k(S, G, k=2)[0] == pytest.approx(7.0 / ideal, abs=TOL)                # dcg@2 = 7, ideal@2 = 7.6309
    assert average_precision(S, G)[0] == pytest.approx((1 / 1 + 2 / 3) / 2, abs=TOL)     # relevant at ranks 1, 3
    assert average_precision(S, G, k=2)[0] == pytest.approx(1.0 / 2, abs=TOL)           # denominator R = 2, not min(R,k)
    assert reciprocal_rank(S, G)[0] == 1.0


def test_hand_computed_linear_and_rr():
    assert dcg_at_k(S, G, gain="linear")[0] == pytest.approx(3 + 1 / 2, abs=TOL)
    s = np.array([[0.9, 0.8, 0.7]])
    g = np.array([[0.0, 0.0, 2.0]])                                                      # first relevant at rank 3
    assert reciprocal_rank(s, g)[0] == pytest.approx(1 / 3, abs=TOL)
    assert reciprocal_rank(s, g, k=2)[0] == 0.0
    assert ndcg_at_k(s, g)[0] == pytest.approx((3 / math.log2(4)) / 3, abs=TOL)           # 1.5 / 3


def test_padding_is_ranked_last_and_ignored():
    s_pad = np.array([[0.2, 0.1, 99.0, 98.0]])
    g_pad = np.array([[1.0, 0.0, -1.0, -1.0]])
    assert rank_order(s_pad, g_pad).tolist() == [[0, 1, 2, 3]]
    for f in (dcg_at_k, ndcg_at_k, average_precision, reciprocal_rank):
        assert f(s_pad, g_pad)[0] == pytest.approx(f(s_pad[:, :2], g_pad[:, :2])[0], abs=TOL)


def test_ties_are_broken_by_index_deterministically():
    g = np.array([[0.0, 1.0, 2.0, 0.0]])
    tied = np.zeros((1, 4))
    assert rank_order(tied, g).tolist() == [[0, 1, 2, 3]]
    by_index = -np.arange(4.0)[None]
    for f in (dcg_at_k, ndcg_at_k, average_precision, reciprocal_rank):
        assert f(tied, g)[0] == f(by_index, g)[0]


def test_accepts_torch_tensors_and_1d():
    assert ndcg_at_k(torch.tensor(S), torch.tensor(G))[0] == pytest.approx(ndcg_at_k(S, G)[0], abs=TOL)
    assert ndcg_at_k(S[0], G[0]).shape == (1,)


# ---- independent implementations ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 10, None])
def test_ndcg_matches_sklearn_with_exponentiated_gains(k):
    scores, grades = random_lists(seed=1)
    ours = ndcg_at_k(scores, grades, k)
    for b in range(len(grades)):
        real = grades[b] != -1
        ref = ndcg_score([2 ** grades[b][real] - 1], [scores[b][real]], k=k)             # sklearn gain is linear
        assert ours[b] == pytest.approx(ref, abs=TOL)
    # sklearn scores all-zero lists 0 and averages them in: our rule `zero`
    full_s, full_g = random_lists(seed=2, pad=False)
    assert mean_metric(ndcg_at_k(full_s, full_g, 10), has_relevant(full_g), "zero") == pytest.approx(
        ndcg_score(2 ** full_g - 1, full_s, k=10), abs=TOL)


def test_metrics_match_pytrec_eval():
    scores, grades = random_lists(seed=3)
    qrels, run = {}, {}
    for b in range(len(grades)):
        real = np.flatnonzero(grades[b] != -1)
        qrels[f"q{b}"] = {f"d{i}": int(grades[b, i]) for i in real}
        run[f"q{b}"] = {f"d{i}": float(scores[b, i]) for i in real}
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "ndcg", "map", "recip_rank"}).evaluate(run)
    checks = {"ndcg_cut_5": ndcg_at_k(scores, grades, 5, "linear"), "ndcg_cut_10": ndcg_at_k(scores, grades, 10, "linear"),
              "ndcg": ndcg_at_k(scores, grades, None, "linear"), "map": average_precision(scores, grades),
              "recip_rank": reciprocal_rank(scores, grades)}
    assert set(res) == set(qrels)       # trec_eval keeps all-zero queries, scoring them 0 (our rule `zero`)
    for b in range(len(grades)):
        for measure, ours in checks.items():
            assert ours[b] == pytest.approx(res[f"q{b}"][measure], abs=TOL), (b, measure)
    assert not has_relevant(grades)[:5].any() and res["q0"]["ndcg"] == 0.0


def test_exponential_and_linear_gain_differ_only_for_grades_above_one():
    scores, grades = random_lists(seed=4)
    binary = np.where(grades > 0, 1.0, grades)
    assert np.allclose(ndcg_at_k(scores, binary, 10), ndcg_at_k(scores, binary, 10, "linear"), atol=TOL)
    assert not np.allclose(ndcg_at_k(scores, grades, 10), ndcg_at_k(scores, grades, 10, "linear"))


# ---- no-relevant rules --------------------------------------------------------------------------------------
def test_mean_metric_rules():
    values, hr = np.array([0.5, 0.0, 1.0]), np.array([True, False, True])
    assert mean_metric(values, hr, "skip") == pytest.approx(0.75)
    assert mean_metric(values, hr, "zero") == pytest.approx(0.5)
    assert mean_metric(values, hr, "one") == pytest.approx(2.5 / 3)
    assert math.isnan(mean_metric(values, np.zeros(3, bool), "skip"))
    with pytest.raises(ValueError, match="no_relevant"):
        mean_metric(values, hr, "drop")


def test_evaluate_lists_keys_and_rules():
    s = np.vstack([S, [[0.3, 0.2, 0.1, 0.0]]])
    g = np.vstack([G, [[0.0, 0.0, 0.0, -1.0]]])                                           # 2nd list: no relevant
    skip, one = evaluate_lists(s, g, ks=(2, 5), rule="skip"), evaluate_lists(s, g, ks=(2, 5), rule="one")
    assert set(skip) == {"ndcg@2", "dcg@2", "ndcg@5", "dcg@5", "map", "mrr"}
    assert skip["ndcg@5"] == pytest.approx(ndcg_at_k(S, G, 5)[0], abs=TOL)
    assert one["ndcg@5"] == pytest.approx((ndcg_at_k(S, G, 5)[0] + 1) / 2, abs=TOL)
    assert one["dcg@5"] == pytest.approx(7.5 / 2, abs=TOL)                                # DCG: `one` -> natural 0
    assert evaluate_lists(s, g, rule="zero")["map"] == pytest.approx(average_precision(S, G)[0] / 2, abs=TOL)
