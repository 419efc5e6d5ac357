"""Distributed training under local Spark with 2 processes: Horovod and TorchDistributor train the fusion
ranker to the local backend's validation NDCG, resume from checkpoints, and save loadable artifacts."""
from __future__ import annotations

import datetime as dt

import pytest
import torch

from tests.conftest import make_config
from mmrank.stages import train as train_stage
from mmrank.distributed.backends import train_with_backend
from mmrank.distributed.loaders import make_loader, prepare_specs
from mmrank.testing.lists import synthetic_lists_df
from mmrank.lakehouse import Lakehouse
from mmrank.ranker.artifact import load_artifact
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import concat_batches
from mmrank.ranker.fit import build_model, validation_sums
from mmrank.runs import stage_status

DIMS = ModalityDims(text=16, image=8, audio=8)
L, EPOCHS = 8, 3
NDCG_TOL = 0.05   # distributed vs local validation NDCG@10 (~48 lists; different batch composition, same global batch)
RUN_DATE = dt.date(2026, 11, 21)


@pytest.fixture(scope="module")
def dlh(spark, tmp_path_factory) -> Lakehouse:
    cfg = make_config(tmp_path_factory.mktemp("dist"), f"train.list_size={L}", "train.batch_size=16",
                      f"train.max_epochs={EPOCHS}", "train.patience=10", "train.num_proc=2", "train.lr=0.01")
    lh = Lakehouse(spark, cfg)
    lh.overwrite("training_lists", synthetic_lists_df(spark, 120, L, DIMS, seed=11, splits=(0.6, 0.4)).repartition(2))
    return lh


def _with(lh: Lakehouse, **train) -> Lakehouse:
    return Lakehouse(lh.spark, lh.cfg.model_copy(update={"train": lh.cfg.train.model_copy(update=train)}))


@pytest.fixture(scope="module")
def local(dlh):
    return train_with_backend(dlh, dlh.cfg.train, DIMS, backend="local", data_loader="parquet")


def _val_batch(lh: Lakehouse):
    with prepare_specs(lh, lh.cfg.train, DIMS, 1, kind="parquet") as specs:
        return concat_batches(list(make_loader(specs["validation"]).epoch_batches(0)))


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _ndcg10(model, batch) -> float:
    s = validation_sums(model, [batch])
    return s[2] / s[3]


def test_local_backend_learns(dlh, local):
    untrained = _ndcg10(build_model(DIMS, dlh.cfg.train), _val_batch(dlh))
    assert local.fit.epochs_run == EPOCHS
    assert local.fit.best_metrics["ndcg@10"] > untrained + 0.3 * (1 - untrained)   # the untrained model is the prior


def test_local_resume_is_bitwise_identical(dlh, local, tmp_path):
    short = _with(dlh, max_epochs=1)
    train_with_backend(short, short.cfg.train, DIMS, backend="local", data_loader="parquet",
                       checkpoint_dir=tmp_path)
    resumed = train_with_backend(dlh, dlh.cfg.train, DIMS, backend="local", data_loader="parquet",
                                 checkpoint_dir=tmp_path, resume=True)
    assert _untimed(resumed.fit.history) == _untimed(local.fit.history)
    for k, v in local.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


@pytest.mark.slow
def test_horovod_petastorm_matches_local(dlh, local):
    out = train_with_backend(dlh, dlh.cfg.train, DIMS, backend="horovod", data_loader="petastorm")
    assert (out.world_size, out.fit.epochs_run) == (2, EPOCHS)
    assert abs(out.fit.best_metrics["ndcg@10"] - local.fit.best_metrics["ndcg@10"]) <= NDCG_TOL
    # the returned weights are rank 0's best weights: they reproduce the reported validation NDCG
    assert _ndcg10(out.model, _val_batch(dlh)) == pytest.approx(out.fit.best_metrics["ndcg@10"], abs=1e-6)


@pytest.mark.slow
def test_torch_distributor_resume_and_artifact(dlh, local):
    """Stage-level flow: an interrupted 1-epoch run leaves a checkpoint; `train_and_save` resumes it to
    EPOCHS; the result equals an uninterrupted run; the saved artifact scores like the returned model."""
    lh = _with(dlh, backend="torch_distributor", data_loader="parquet")
    ckpt = lh.paths.checkpoints(train_stage.run_key(RUN_DATE, lh.cfg.train, "torch_distributor",
                                                           lh.version("training_lists")))
    short = _with(lh, max_epochs=1)
    first = train_with_backend(short, short.cfg.train, DIMS, checkpoint_dir=ckpt)  # "killed" after epoch 1
    assert first.fit.epochs_run == 1 and any(ckpt.iterdir())

    resumed, version = train_stage.train_and_save(lh, RUN_DATE)
    assert resumed.fit.epochs_run == EPOCHS and not ckpt.exists()
    assert _untimed(resumed.fit.history)[0] == _untimed(first.fit.history)[0]
    full = train_with_backend(lh, lh.cfg.train, DIMS)
    assert [h["val_ndcg@10"] for h in resumed.fit.history] == pytest.approx(
        [h["val_ndcg@10"] for h in full.fit.history], abs=1e-6)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert abs(resumed.fit.best_metrics["ndcg@10"] - local.fit.best_metrics["ndcg@10"]) <= NDCG_TOL

    model, meta = load_artifact(lh.paths.artifacts, version)
    assert (meta["backend"], meta["world_size"], meta["data_loader"]) == ("torch_distributor", 2, "parquet")
    assert meta["dims"] == {"text": DIMS.text, "image": DIMS.image, "audio": DIMS.audio}
    batch = _val_batch(lh)
    with torch.no_grad():
        assert torch.equal(model(batch), resumed.model(batch))


def test_train_stage_records_run(dlh):
    lh = _with(dlh, max_epochs=1, backend="local")
    counts = train_stage.run(lh, RUN_DATE)
    assert counts["epochs"] == 1 and counts["world_size"] == 1
    by_split = {r["split"]: r["count"] for r in lh.read("training_lists").groupBy("split").count().collect()}
    assert (counts["train_lists"], counts["val_lists"]) == (by_split["train"], by_split["validation"])
    assert counts["samples_per_sec"] > 0
    assert stage_status(lh, RUN_DATE, "train") == "succeeded"
    version = lh.read("runs").where("stage = 'train'").first()["model_version"]
    _, meta = load_artifact(lh.paths.artifacts, version)
    assert meta["backend"] == "local" and meta["val_metrics"]["ndcg@10"] > 0
