"""The design notes' variants (issue #16): fusions max_pool / avg_pool / weighted_sum, heads mlp / linear /
logistic, per-modality PCA, pruning + int8, the logmel_lstm audio encoder, and the ablation tables. Every model
variant honours the model contract: masks, occlusion contributions, artifact round trip with identical scores."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from mmrank.config import FeaturesConf, TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.artifact import load_artifact, save_artifact
from mmrank.ranker.batch import rows_to_batch
from mmrank.ranker.compress import linear_sparsity, model_size, prune_model, quantize_model
from mmrank.ranker.fit import train_local
from mmrank.ranker.pca import moments_of_batch, pca_buffers
from mmrank.registry import FUSIONS, HEADS
from mmrank.testing.lists import synthetic_lists

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMS = ModalityDims(text=8, image=6, audio=4)
L = 8
SMALL = dict(proj_dim=8, hidden_dim=16, list_size=L, max_epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def splits():
    rows = synthetic_lists(60, L, DIMS, seed=3, splits=(0.6, 0.2))
    return {s: rows_to_batch(rows[rows["split"] == s], DIMS, L) for s in ("train", "validation", "test")}


def _contract(model, batch, tmp_path):
    """Masks, contributions and the artifact round trip of one trained model."""
    model.eval()
    scores, contrib = model.score_and_contributions(batch)
    assert torch.isfinite(scores).all() and scores.shape == batch["grades"].shape
    absent = batch["p_mask"] == 0
    assert (contrib[absent] == 0).all() and (contrib[~absent] != 0).any()
    noisy = dict(batch, p_audio=torch.where(absent[..., 2:3], torch.full_like(batch["p_audio"], 1e6),
                                            batch["p_audio"]))
    assert torch.equal(model(noisy), model(batch))                 # an absent modality's input is ignored
    version = save_artifact(model, {"note": "variant"}, tmp_path)
    loaded, meta = load_artifact(tmp_path, version)
    assert meta["train"]["fusion"] == model.cfg.fusion and meta["train"]["head"] == model.cfg.head
    assert torch.equal(loaded(batch), model(batch))
    from mmrank.scoring.scorer import score_pairs

    q = {m: batch[f"q_{m}"].numpy() for m in ("text", "audio")} | {"mask": batch["q_mask"].numpy()}
    p = {m: batch[f"p_{m}"][:, 0].numpy() for m in ("text", "image", "audio")} | {"mask": batch["p_mask"][:, 0].numpy()}
    s_loaded, _ = score_pairs(loaded, q, p)                        # the scoring path, first slot of every list
    assert np.allclose(s_loaded, model(batch)[:, 0].detach().numpy(), atol=1e-5)
    return loaded


@pytest.mark.parametrize("fusion", ["max_pool", "avg_pool", "weighted_sum", "gated", "concat"])
@pytest.mark.parametrize("head", ["mlp", "linear", "logistic"])
def test_every_fusion_and_head_trains_saves_loads_and_scores(splits, tmp_path, fusion, head):
    cfg = TrainConf(fusion=fusion, head=head, **SMALL)
    model, res = train_local(splits["train"], splits["validation"], DIMS, cfg)
    assert res.epochs_run == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    _contract(model, splits["test"], tmp_path)
    if head == "logistic":   # the head's output (the correction added to the scaled prior) is a probability
        b = splits["test"]
        with torch.no_grad():
            s = model(b) - model.prior_log_scale.exp() * model.prior_scores(b)
        assert ((s > 0) & (s < 1)).all()


def test_fusions_registered_and_pool_absent_modalities_out():
    assert {"max_pool", "avg_pool", "weighted_sum"} <= set(FUSIONS.names()) and set(HEADS.names()) == {
        "mlp", "linear", "logistic"}
    z = torch.tensor([[[[1.0, -2.0], [100.0, 100.0], [3.0, 0.0]]]])           # [B=1, L=1, M=3, P=2]
    mask = torch.tensor([[[1.0, 0.0, 1.0]]])
    q = torch.zeros(1, 2)
    assert FUSIONS["max_pool"](3, 2, 4, 0.0)(q, z, mask).tolist() == [[[3.0, 0.0]]]
    assert FUSIONS["avg_pool"](3, 2, 4, 0.0)(q, z, mask).tolist() == [[[2.0, -1.0]]]
    assert FUSIONS["max_pool"](3, 2, 4, 0.0)(q, z, torch.zeros(1, 1, 3)).abs().sum() == 0
    ws = FUSIONS["weighted_sum"](3, 2, 4, 0.0)
    with torch.no_grad():
        ws.alpha_logits.copy_(torch.tensor([0.0, 5.0, np.log(3.0)]))
    w = ws.weights(q, z, mask)
    assert torch.allclose(w, torch.tensor([[[0.25, 0.0, 0.75]]]))           # softmax over the present ones
    assert torch.allclose(ws(q, z, mask), torch.tensor([[[2.5, -0.5]]]))


def test_weighted_sum_learns_global_weights_exposed_as_gate_weights(splits):
    model, _ = train_local(splits["train"], splits["validation"], DIMS,
                           TrainConf(fusion="weighted_sum", prior="none", **{**SMALL, "max_epochs": 4}))
    assert model.fusion.alpha_logits.abs().sum() > 0                          # the alphas moved
    w = model.gate_weights(splits["test"])
    present = splits["test"]["p_mask"] > 0
    assert torch.allclose(w.sum(-1)[present.any(-1)], torch.ones(1)) and (w[~present] == 0).all()
    full = present.all(-1)
    assert torch.allclose(w[full], w[full][0].expand_as(w[full]))             # global: the same for every item


def test_linear_head_is_affine_in_its_features():
    head = HEADS["linear"](5, 16, 0.1)
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(head(0.3 * x + 0.7 * y), 0.3 * head(x) + 0.7 * head(y), atol=1e-6)


def test_pca_matches_numpy_and_is_stored_with_the_artifact(splits, tmp_path):
    train = splits["train"]
    moments = moments_of_batch(train, DIMS)
    x = torch.cat([train["p_text"].reshape(-1, 8)[train["p_mask"][..., 0].reshape(-1) > 0],
                   train["q_text"][train["q_mask"][:, 0] > 0]]).double().numpy()
    buf = pca_buffers(moments, {"text": 3})
    assert np.allclose(buf["text_mean"], x.mean(0), atol=1e-5)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    overlap = np.abs(vt[:3] @ buf["text_components"])                      # same top-3 axes (up to sign)
    assert np.allclose(overlap, np.eye(3), atol=1e-3)
    cfg = TrainConf(pca_dim=3, **SMALL)
    model, _ = train_local(train, splits["validation"], DIMS, cfg)
    assert model.product_proj["text"][0].in_features == 3 and model.query_proj["audio"][0].in_features == 3
    assert np.allclose(model.pca.text_components.numpy(), buf["text_components"], atol=1e-6)
    loaded = _contract(model, splits["test"], tmp_path)
    assert torch.equal(loaded.pca.text_mean, model.pca.text_mean)


def test_pca_moments_from_spark_partitions_equal_the_in_memory_ones(spark, tmp_path):
    from conftest import make_config

    from mmrank.lakehouse import Lakehouse
    from mmrank.ranker.pca import train_split_moments
    from mmrank.testing.lists import synthetic_lists_df

    lh = Lakehouse(spark, make_config(tmp_path, f"train.list_size={L}"))
    lh.overwrite("training_lists", synthetic_lists_df(spark, 60, L, DIMS, seed=3, splits=(0.6, 0.2))
                 .repartition(3))
    spark_m = train_split_moments(lh, DIMS, L)
    rows = synthetic_lists(60, L, DIMS, seed=3, splits=(0.6, 0.2))
    local = moments_of_batch(rows_to_batch(rows[rows["split"] == "train"], DIMS, L), DIMS)
    for m in ("text", "image", "audio"):
        assert spark_m[m][0] == local[m][0] and np.allclose(spark_m[m][2], local[m][2], rtol=1e-9)


def test_artifacts_written_before_the_variants_still_load(splits, tmp_path):
    model, _ = train_local(splits["train"], splits["validation"], DIMS, TrainConf(**SMALL))
    version = save_artifact(model, {}, tmp_path)
    meta_path = tmp_path / "models" / version / "model.json"
    doc = json.loads(meta_path.read_text())
    for key in ("head", "pca_dim", "prune_sparsity"):
        doc["train"].pop(key)
    meta_path.write_text(json.dumps(doc))
    loaded, _ = load_artifact(tmp_path, version)
    assert loaded.cfg.head == "mlp" and loaded.pca is None
    assert torch.equal(loaded(splits["test"]), model(splits["test"]))
    assert {k for k in loaded.state_dict() if k.startswith("scorer.")} == {
        "scorer.0.weight", "scorer.0.bias", "scorer.3.weight", "scorer.3.bias"}  # the pre-heads layout


def test_pruning_and_int8_alone_and_together(splits):
    from mmrank.ranker import ablation

    # wide enough that the weights, not torch.save's container, dominate the measured size
    wide = TrainConf(**{**SMALL, "proj_dim": 64, "hidden_dim": 128}, prior="none")   # no zero-initialised layer
    model, _ = train_local(splits["train"], splits["validation"], DIMS, wide)
    dense = model_size(model)
    pruned = prune_model(train_local(splits["train"], splits["validation"], DIMS, wide)[0], 0.8)
    assert abs(linear_sparsity(pruned) - 0.8) < 0.01 and linear_sparsity(model) == 0
    for m in pruned.modules():
        if isinstance(m, torch.nn.Linear):
            assert abs(float((m.weight == 0).float().mean()) - 0.8) < 0.05      # every layer, not on average
    assert model_size(pruned)["zlib_bytes"] < 0.7 * dense["zlib_bytes"]
    q = quantize_model(pruned)
    assert model_size(q)["bytes"] < dense["bytes"] and torch.isfinite(q(splits["test"])).all()
    qlin = q.scorer[0]
    assert float((qlin.weight().int_repr() == 0).float().mean()) >= 0.79          # zeros survive int8
    via_cfg, _ = train_local(splits["train"], splits["validation"], DIMS, TrainConf(prune_sparsity=0.5, **SMALL))
    assert abs(linear_sparsity(via_cfg) - 0.5) < 0.01
    table = ablation.compression(model, splits["test"], splits["test"]["grades"].numpy(), sparsities=(0.8,),
                                 repeats=1)
    assert list(table["variant"]) == ["fp32", "pruned 80%", "int8", "pruned 80% + int8"]
    assert table["ndcg@10"].between(0, 1).all() and (table["pairs_per_s"] > 0).all()
    assert linear_sparsity(model) == 0                                          # the measured model is untouched


def _wav(seconds: float, freq: float) -> bytes:
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), 16000, format="WAV")
    return buf.getvalue()


def test_bidirectional_rnn_is_masked_for_length():
    from mmrank.encoders.audio_lstm import _BiRNN

    torch.manual_seed(0)
    rnn = _BiRNN("lstm", 5, 4, 1).eval()
    x = torch.randn(1, 7, 5)
    padded = torch.cat([x, torch.randn(1, 3, 5) * 50], dim=1)                  # junk after the valid frames
    with torch.no_grad():
        alone = rnn(x, torch.tensor([7]))
        both = rnn(torch.cat([padded, torch.randn(1, 10, 5)]), torch.tensor([7, 10]))
    assert torch.allclose(both[0, :7], alone[0], atol=1e-6) and (both[0, 7:] == 0).all()


def test_logmel_lstm_encoder(tmp_path):
    from safetensors.torch import save_file

    from mmrank.encoders.audio_lstm import LSTMAudioEncoder
    from mmrank.encoders.registry import get_encoder

    clips = [_wav(0.5, 440), _wav(1.0, 880), _wav(0.3, 200)]
    enc = LSTMAudioEncoder("logmel_lstm", FeaturesConf.model_validate({"device": "cpu", "audio": {
        "name": "logmel_lstm", "rnn_hidden": 8}}))
    e = enc.encode(clips)
    assert e.shape == (3, 2 * 64 + 2 * 20 + 16) and enc.dim == e.shape[1] and "lstm1x8" in enc.version
    assert np.allclose(np.linalg.norm(e, axis=1), 1) and np.allclose(enc.encode(clips[1:2])[0], e[1])
    gru = LSTMAudioEncoder("logmel_lstm", FeaturesConf.model_validate({"device": "cpu", "audio": {
        "name": "logmel_lstm", "rnn": "gru", "rnn_hidden": 8}}))
    assert "gru1x8" in gru.version and not np.allclose(gru.encode(clips), e)
    weights = {k: torch.full_like(v, 0.05) for k, v in enc.load().net.state_dict().items()}
    save_file(weights, str(tmp_path / "rnn.safetensors"))
    trained = LSTMAudioEncoder("logmel_lstm", FeaturesConf.model_validate({"device": "cpu", "audio": {
        "name": "logmel_lstm", "rnn_hidden": 8, "weights_path": str(tmp_path / "rnn.safetensors")}}))
    assert "random-init" not in trained.version and not np.allclose(trained.encode(clips), e)
    # the front end (statistics blocks, 2*64 + 2*20 values) is logmel_cnn's: only the learned block differs
    cnn = get_encoder("audio", FeaturesConf.model_validate({"device": "cpu"})).encode(clips)
    assert np.allclose(cnn[:, :168], e[:, :168], atol=1e-6) and np.allclose(trained.encode(clips)[:, :168], e[:, :168])


def test_ablation_grid_and_report_table(splits):
    from mmrank import report
    from mmrank.ranker import ablation

    targets = {"test": splits["test"]["grades"].numpy().astype(float)}
    grid = ablation.grid(splits["train"], splits["validation"], splits["test"], targets, DIMS,
                         TrainConf(**{**SMALL, "max_epochs": 1}), seeds=[1, 2], ks=[10],
                         fusions=["avg_pool", "gated"], heads=["linear", "mlp"])
    assert len(grid) == 2 * 2 * 2 * 4 and set(grid["metric"]) == {"ndcg@10", "dcg@10", "map", "mrr"}
    table = report.ablation_table(grid, "test").set_index("fusion")
    assert list(table.columns) == ["linear", "mlp"] and list(table.index) == ["avg_pool", "gated"]
    vals = grid[(grid["fusion"] == "gated") & (grid["head"] == "mlp") & (grid["metric"] == "ndcg@10")]["value"]
    assert table.loc["gated", "mlp"] == f"{vals.mean():.4f} ± {vals.std():.4f}"
    text = report.ablation_markdown(grid, None, "toy")
    assert "## Ablation: toy" in text and "| avg_pool |" in text and "[1, 2]" in text
