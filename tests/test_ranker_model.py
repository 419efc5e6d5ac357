"""Batch contract, FusionRanker masks / gates / contributions, and model artifacts."""
from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from mmrank.config import TrainConf
from mmrank.lexical import N_LEX
from mmrank.modalities import ModalityDims
from mmrank.ranker.artifact import WEIGHTS_FILE, ArtifactError, latest_version, load_artifact, save_artifact
from mmrank.ranker.batch import PAD_GRADE, batch_from_arrays, iterate_batches, make_collate, rows_to_batch
from mmrank.ranker.model import FusionRanker

DIMS = ModalityDims(text=6, image=5, audio=4)
B, L = 3, 4
SMALL = dict(proj_dim=8, hidden_dim=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_batch(seed=0, p_mask=None, q_mask=None):
    r = np.random.default_rng(seed)
    p_mask = (r.random((B, L, 3)) > 0.3).astype(float) if p_mask is None else p_mask
    p_mask[:, -1] = 0.0                                                   # last slot is padding
    grades = r.integers(0, 3, (B, L)).astype(float)
    grades[:, -1] = PAD_GRADE
    return batch_from_arrays(q_text=r.normal(size=(B, 6)), q_audio=r.normal(size=(B, 4)),
                             q_mask=np.ones((B, 2)) if q_mask is None else q_mask,
                             p_text=r.normal(size=(B, L, 6)), p_image=r.normal(size=(B, L, 5)),
                             p_audio=r.normal(size=(B, L, 4)), p_mask=p_mask, grades=grades)


def model(fusion="gated", seed=0, **kw):
    """The fusion architecture alone (no prior, lexical or aligned inputs: tests/test_prior_residual.py)."""
    torch.manual_seed(seed)
    kw = {"prior": "none", "lexical_features": False, "align": {"enabled": False}, **kw}
    return FusionRanker(DIMS, TrainConf(fusion=fusion, **SMALL, **kw)).eval()


# ---- batch ------------------------------------------------------------------------------------------------
def test_rows_to_batch_reshapes_pads_and_masks_missing_modalities():
    r = np.random.default_rng(0)
    rows = pd.DataFrame([
        {"query_id": "a", "grades": [2.0, 0.0, -1.0], "q_text": r.normal(size=6).tolist(), "q_audio": None,
         "q_mask": [1.0, 0.0], "p_text": r.normal(size=2 * 6).tolist() + [float("nan")] * 6,   # NaN in padding
         "p_image": r.normal(size=3 * 5).tolist(),
         "p_audio": [], "p_mask": [1, 1, 0, 1, 0, 0, 0, 0, 0]},
        {"query_id": "b", "grades": [1.0], "q_text": None, "q_audio": r.normal(size=4).tolist(), "q_mask": None,
         "p_text": r.normal(size=6).tolist(), "p_image": None, "p_audio": r.normal(size=4).tolist(), "p_mask": None},
    ])
    b = rows_to_batch(rows, DIMS, list_size=3)
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        "q_text": (2, 6), "q_audio": (2, 4), "q_mask": (2, 2), "p_text": (2, 3, 6), "p_image": (2, 3, 5),
        "p_audio": (2, 3, 4), "p_mask": (2, 3, 3), "p_lex": (2, 3, N_LEX), "grades": (2, 3)}
    assert b["grades"].tolist() == [[2.0, 0.0, -1.0], [1.0, -1.0, -1.0]]
    assert b["q_mask"].tolist() == [[1.0, 0.0], [0.0, 1.0]]                 # null mask inferred from features
    assert b["p_mask"].tolist() == [[[1, 1, 0], [1, 0, 0], [0, 0, 0]], [[1, 0, 1], [0, 0, 0], [0, 0, 0]]]
    assert torch.equal(b["p_text"][0, 1], torch.tensor(rows.p_text[0][6:12], dtype=torch.float32))
    assert b["p_image"][0, 1].abs().sum() == 0                                # masked-out features zeroed
    assert torch.all(b["p_text"][0, 2] == 0) and torch.isfinite(b["p_text"]).all()
    as_dict = rows_to_batch({c: rows[c].tolist() for c in rows.columns}, DIMS, 3)
    assert all(torch.equal(as_dict[k], b[k]) for k in b)
    truncated = rows_to_batch(rows, DIMS, list_size=2)
    assert truncated["p_text"].shape == (2, 2, 6) and torch.equal(truncated["p_text"], b["p_text"][:, :2])


def test_collate_in_dataloader_and_bad_dims():
    rows = [{"grades": [1.0, 0.0], "q_text": [0.5] * 6, "q_mask": [1, 0], "p_text": [1.0] * 12, "p_mask": [1, 0, 0] * 2}] * 5
    batches = list(DataLoader(rows, batch_size=2, collate_fn=make_collate(DIMS, 2)))
    assert [b["grades"].shape[0] for b in batches] == [2, 2, 1]
    with pytest.raises(ValueError, match="multiple of dim"):
        rows_to_batch([{**rows[0], "p_text": [1.0] * 7}], DIMS, 2)


def test_iterate_batches_is_a_seeded_permutation():
    b = random_batch()
    b["grades"] = torch.arange(B * 3, dtype=torch.float32).reshape(B, 3)    # only grades used to identify lists
    b = {"grades": torch.cat([b["grades"]] * 3)}
    order = lambda seed: torch.cat([x["grades"][:, 0] for x in iterate_batches(b, 4, True, seed)]).tolist()
    assert sorted(order(1)) == sorted(b["grades"][:, 0].tolist())
    assert order(1) == order(1) and order(1) != order(2)
    assert [len(x["grades"]) for x in iterate_batches(b, 4)] == [4, 4, 1]


# ---- model --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_shapes_and_finite_scores(fusion):
    m, b = model(fusion), random_batch()
    assert m(b).shape == (B, L) and torch.isfinite(m(b)).all()
    assert m.contributions(b).shape == (B, L, 3)
    single = {k: v[:, :1] if k.startswith("p_") or k == "grades" else v for k, v in b.items()}
    assert m(single).shape == (B, 1)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_absent_modalities_do_not_matter(fusion):
    m, b = model(fusion), random_batch(q_mask=np.array([[1.0, 0.0]] * B))
    changed = {k: v.clone() for k, v in b.items()}
    for i, name in enumerate(("p_text", "p_image", "p_audio")):
        absent = b["p_mask"][..., i] == 0
        changed[name][absent] = float("nan")
    changed["q_audio"][:] = 123.0
    real = b["grades"] != PAD_GRADE
    assert torch.equal(m(changed)[real], m(b)[real])
    present = b["p_mask"][..., 1] > 0                                          # sanity: present inputs do matter
    changed["p_image"][present] += 1.0
    assert not torch.allclose(m(changed)[real], m(b)[real])


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_text_only_product_and_occlusion_contributions(fusion):
    p_mask = np.ones((B, L, 3))
    p_mask[:, 0] = [1.0, 0.0, 0.0]                                            # slot 0: text-only product
    m, b = model(fusion), random_batch(p_mask=p_mask)
    c = m.contributions(b)
    assert torch.isfinite(m(b)).all()
    assert torch.all(c[:, 0, 1:] == 0) and torch.all(c[:, 0, 0] != 0)
    assert torch.all(c[:, -1] == 0)                                          # padding slot: nothing present
    for i in range(3):                                                        # definition: occlusion via forward
        occluded = {k: v.clone() for k, v in b.items()}
        occluded["p_mask"][..., i] = 0.0
        expected = torch.where(b["p_mask"][..., i] > 0, m(b) - m(occluded), 0.0)
        assert torch.allclose(c[..., i], expected, atol=1e-6)


def test_gate_weights_sum_to_one_over_present_and_depend_on_query():
    m, b = model("gated"), random_batch()
    w = m.gate_weights(b)
    present = b["p_mask"] > 0
    assert torch.all(w[~present] == 0)
    real = present.any(-1)
    assert torch.allclose(w.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-6)
    other = {**b, "q_text": b["q_text"].flip(0)}
    assert not torch.allclose(m.gate_weights(other)[real], w[real], atol=1e-4)
    with pytest.raises(ValueError, match="gated"):
        model("concat").gate_weights(b)


def test_single_modality_model_ignores_other_modalities():
    m, b = model("gated", modalities=["image"]), random_batch(p_mask=np.ones((B, L, 3)))
    changed = {**b, "p_text": b["p_text"] + 5.0, "p_audio": -b["p_audio"]}
    assert torch.equal(m(changed), m(b))
    c = m.contributions(b)
    assert torch.all(c[..., [0, 2]] == 0) and torch.all(c[:, :-1, 1] != 0)


def test_match_features_are_cosines_of_present_matching_modalities():
    q_mask = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])                   # list 1: voice query (no text)
    m, b = model("gated"), random_batch(p_mask=np.ones((B, L, 3)), q_mask=q_mask)
    match = m.encode(b)[3][..., :m.n_match]
    cos = lambda mod: torch.nn.functional.cosine_similarity(b[f"q_{mod}"][:, None], b[f"p_{mod}"], dim=-1)
    assert match.shape == (B, L, 2)
    assert torch.allclose(match[0], torch.stack([cos("text")[0], cos("audio")[0]], -1), atol=1e-6)
    assert torch.all(match[1, :, 0] == 0) and torch.all(match[2, :, 1] == 0)  # absent query side -> 0
    # the match is an input of the score: a product text equal to the query text moves the text-only score
    text_only = model("gated", modalities=["text"])
    twin = {k: v.clone() for k, v in b.items()}
    twin["p_text"][0, 0] = b["q_text"][0] * 3.0                                # same direction, other norm
    assert text_only.encode(twin)[3][0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    assert text_only(twin)[0, 0] != text_only(b)[0, 0]
    without = model("gated", match_features=False)
    assert without.n_match == 0 and without.encode(b)[3].shape == (B, L, 1) and without(b).shape == (B, L)


def test_modality_dropout_never_drops_everything():
    torch.manual_seed(0)
    m = FusionRanker(DIMS, TrainConf(**SMALL, modality_dropout=0.9))
    mask = torch.ones(200, 5, 3)
    mask[:, 0] = torch.tensor([0.0, 1.0, 0.0])
    out = m.modality_dropout(mask)
    assert torch.all(out.sum(-1) >= 1) and torch.all(out <= mask)
    assert out.sum() < 0.6 * mask.sum()                                      # it does drop
    assert torch.equal(out[:, 0], mask[:, 0])                                  # sole modality kept


def test_gradients_are_finite():
    m, b = model("gated").train(), random_batch()
    (m(b) ** 2).mean().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- artifact ---------------------------------------------------------------------------------------------------
def test_artifact_round_trip(tmp_path):
    m, b = model("concat", seed=3), random_batch()
    version = save_artifact(m, {"encoders": {"text": "minilm@1"}, "metrics": {"ndcg@10": 0.5}}, tmp_path)
    assert re.fullmatch(r"fusion-\d{8}-[0-9a-f]{8}", version) and latest_version(tmp_path) == version
    loaded, meta = load_artifact(tmp_path)
    assert not loaded.training and torch.equal(loaded(b), m(b))
    assert torch.equal(loaded.contributions(b), m.contributions(b))
    assert meta["encoders"] == {"text": "minilm@1"} and meta["train"]["fusion"] == "concat"
    assert meta["dims"] == {"text": 6, "image": 5, "audio": 4}
    v2 = save_artifact(model("gated", seed=4), {}, tmp_path)
    assert v2 != version and latest_version(tmp_path) == v2 and load_artifact(tmp_path, version)[1]["version"] == version
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]   # no temp leftovers
    with pytest.raises(ValueError, match="reserved"):
        save_artifact(m, {"dims": 1}, tmp_path)


def test_gated_artifact_keeps_its_weight_names_on_disk(tmp_path):
    """Fusions are modules of their own (`fusion.gate.*`), but on disk the gated weights keep the names artifacts
    always had (`gate.*`, `gate_bias`): old artifacts load, and identical weights give an identical version."""
    from safetensors.torch import load_file

    m, b = model("gated", seed=5), random_batch()
    assert "fusion.gate_bias" in m.state_dict()
    version = save_artifact(m, {}, tmp_path)
    on_disk = load_file(str(tmp_path / "models" / version / WEIGHTS_FILE))
    assert "gate_bias" in on_disk and "gate.0.weight" in on_disk
    assert not any(k.startswith("fusion.gate") for k in on_disk)
    loaded, _ = load_artifact(tmp_path, version)
    assert torch.equal(loaded(b), m(b)) and torch.equal(loaded.gate_weights(b), m.gate_weights(b))
    assert save_artifact(loaded, {}, tmp_path) == version


def test_artifact_from_before_match_features_still_loads(tmp_path):
    old, b = model("gated", seed=5, match_features=False), random_batch()
    version = save_artifact(old, {}, tmp_path)
    meta_path = tmp_path / "models" / version / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]["match_features"]                                       # as written by the first release
    meta_path.write_text(json.dumps(meta))
    loaded, _ = load_artifact(tmp_path)
    assert not loaded.cfg.match_features and torch.equal(loaded(b), old(b))


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="no model artifact"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path, "fusion-20260101-deadbeef")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused(tmp_path):
    version = save_artifact(model(), {}, tmp_path)
    weights = tmp_path / "models" / version / WEIGHTS_FILE
    marker = tmp_path / "unpickled"
    weights.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        load_artifact(tmp_path)
    assert not marker.exists()
    torch.save(model().state_dict(), weights)                                  # a torch pickle (zip) too
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path)
    assert not os.path.exists(marker)
