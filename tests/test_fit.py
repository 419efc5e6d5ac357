"""Training loop on a synthetic problem where relevance lives in image (colour) and audio features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrank.config import TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import batch_from_arrays
from mmrank.ranker.fit import batches_fn, build_model, fit, load_checkpoint, train_local
from mmrank.ranker.metrics import evaluate_lists

DIMS = ModalityDims(text=8, image=6, audio=4)
N_KINDS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n: int, seed: int, list_size: int = 10):
    """The query text names a wanted colour and sound (one-hot + noise); products show a colour in their image
    features and a sound in their audio features; product text is pure noise. grade = #matches (0..2)."""
    r = np.random.default_rng(seed)
    eye = np.eye(N_KINDS)
    cq, aq = r.integers(N_KINDS, size=n), r.integers(N_KINDS, size=n)
    cp, ap = r.integers(N_KINDS, size=(n, list_size)), r.integers(N_KINDS, size=(n, list_size))
    grades = (cp == cq[:, None]).astype(float) + (ap == aq[:, None])
    grades[: n // 4, -2:] = -1.0                                                  # some padded lists
    return batch_from_arrays(
        q_text=np.concatenate([eye[cq], eye[aq], r.normal(size=(n, 2))], 1), q_audio=np.zeros((n, 4)),
        q_mask=np.tile([1.0, 0.0], (n, 1)), p_text=r.normal(size=(n, list_size, 8)),
        p_image=np.concatenate([eye[cp], r.normal(scale=0.3, size=(n, list_size, 3))], 2),
        p_audio=np.concatenate([eye[ap], r.normal(scale=0.3, size=(n, list_size, 1))], 2),
        p_mask=np.ones((n, list_size, 3)) * (grades[..., None] != -1), grades=grades)


TRAIN, VAL = synthetic(192, seed=1), synthetic(64, seed=2)


def conf(**kw) -> TrainConf:
    base = dict(proj_dim=16, hidden_dim=32, batch_size=32, lr=1e-2, max_epochs=8, patience=3, dropout=0.1,
                modality_dropout=0.2, seed=5)
    return TrainConf(**{**base, **kw})


def random_ndcg10() -> float:
    scores = np.random.default_rng(0).random(VAL["grades"].shape)
    return evaluate_lists(scores, VAL["grades"].numpy(), ks=(10,))["ndcg@10"]


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_fused_model_learns_and_beats_text_only(fusion):
    fused, res = train_local(TRAIN, VAL, DIMS, conf(fusion=fusion))
    _, text_res = train_local(TRAIN, VAL, DIMS, conf(fusion=fusion, modalities=["text"]))
    rand = random_ndcg10()
    assert res.best_metrics["ndcg@10"] > rand + 0.15
    assert res.best_metrics["ndcg@10"] > text_res.best_metrics["ndcg@10"] + 0.15
    assert text_res.best_metrics["ndcg@10"] < rand + 0.05                          # text carries no signal here
    # the kept weights are the best epoch's: recomputing validation gives the reported metric
    with torch.no_grad():
        again = evaluate_lists(fused(VAL).numpy(), VAL["grades"].numpy(), ks=(10,))["ndcg@10"]
    assert again == pytest.approx(res.best_metrics["ndcg@10"], abs=1e-9)
    assert res.history[res.best_epoch]["val_ndcg@10"] == res.best_metrics["ndcg@10"]
    assert len(res.history) == res.epochs_run and res.samples_per_sec > 0
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_same_seed_gives_bitwise_identical_weights():
    cfg = conf(max_epochs=3)
    a, ra = train_local(TRAIN, VAL, DIMS, cfg)
    b, rb = train_local(TRAIN, VAL, DIMS, cfg)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    c, _ = train_local(TRAIN, VAL, DIMS, cfg.model_copy(update={"seed": 6}))
    assert not torch.equal(a.state_dict()["scorer.0.weight"], c.state_dict()["scorer.0.weight"])


def _run(cfg, ckpt, resume=False):
    model = build_model(DIMS, cfg)
    res = fit(model, batches_fn(TRAIN, cfg.batch_size, True, cfg.seed), batches_fn(VAL, cfg.batch_size, False, 0),
              cfg, checkpoint_dir=ckpt, resume=resume)
    return model, res


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    cfg = conf(max_epochs=4, patience=10)
    full, full_res = _run(cfg, tmp_path / "full")
    _run(cfg.model_copy(update={"max_epochs": 2}), tmp_path / "split")          # "crash" after epoch 2
    assert load_checkpoint(tmp_path / "split")["epoch"] == 1
    resumed, res = _run(cfg, tmp_path / "split", resume=True)
    timeless = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
    assert timeless(res.history) == timeless(full_res.history) and res.best_epoch == full_res.best_epoch
    assert res.best_metrics == full_res.best_metrics
    assert all(torch.equal(full.state_dict()[k], resumed.state_dict()[k]) for k in full.state_dict())
    last_split, last_full = load_checkpoint(tmp_path / "split"), load_checkpoint(tmp_path / "full")
    assert last_split["epoch"] == 3
    assert all(torch.equal(last_split["model"][k], last_full["model"][k]) for k in last_full["model"])
    done, again = _run(cfg, tmp_path / "split", resume=True)                      # nothing left to do
    assert again.epochs_run == 4 and all(torch.equal(done.state_dict()[k], full.state_dict()[k]) for k in full.state_dict())


def test_early_stopping_and_hooks():
    cfg = conf(lr=1e-9, max_epochs=10, patience=2)                               # no learning -> no improvement
    calls = {"wrap": 0, "reduce": 0, "epochs": []}

    def wrap(opt):
        calls["wrap"] += 1
        assert opt.defaults["weight_decay"] == cfg.weight_decay and opt.defaults["lr"] == cfg.lr
        return opt

    def allreduce(t):                    # a sum over two identical ranks: ratios, hence metrics, unchanged
        calls["reduce"] += 1
        return t * 2

    model = build_model(DIMS, cfg)
    res = fit(model, batches_fn(TRAIN, 32, True, 0), batches_fn(VAL, 32, False, 0), cfg, loss="listnet",
              wrap_optimizer=wrap, allreduce=allreduce, on_epoch_end=lambda e, rec: calls["epochs"].append(e))
    # no epoch beats the untrained model (validated first, through the same allreduce): it is kept
    assert res.stopped_early and res.epochs_run == cfg.patience and res.best_epoch == -1
    assert res.best_metrics == res.initial_metrics
    assert calls == {"wrap": 1, "reduce": res.epochs_run + 1, "epochs": list(range(res.epochs_run))}
    _, plain = train_local(TRAIN, VAL, DIMS, cfg.model_copy(update={"loss": "listnet"}))
    assert plain.best_metrics == pytest.approx(res.best_metrics, abs=1e-12)
    stop_now = fit(build_model(DIMS, cfg), batches_fn(TRAIN, 32, True, 0), batches_fn(VAL, 32, False, 0), cfg,
                   on_epoch_end=lambda e, rec: True)
    assert stop_now.epochs_run == 1 and stop_now.stopped_early
