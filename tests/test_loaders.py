"""Both data paths (petastorm, direct Parquet) deliver every split row to exactly one rank, in contract shape."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F

from tests.conftest import make_config
from mmrank.distributed.loaders import KEY_COL, make_loader, prepare_specs
from mmrank.testing.lists import synthetic_lists_df
from mmrank.lakehouse import Lakehouse
from mmrank.lexical import N_LEX
from mmrank.modalities import ModalityDims

DIMS = ModalityDims(text=8, image=4, audio=4)
L = 6


@pytest.fixture(scope="module")
def lists_lh(spark, tmp_path_factory) -> Lakehouse:
    cfg = make_config(tmp_path_factory.mktemp("lists"), f"train.list_size={L}", "train.batch_size=8")
    lh = Lakehouse(spark, cfg)
    lh.overwrite("training_lists", synthetic_lists_df(spark, 50, L, DIMS, seed=3).repartition(3))
    return lh


def _expected(lh: Lakehouse, split: str, kind: str) -> tuple[list, float]:
    df = lh.read("training_lists").where(F.col("split") == split)
    key = F.xxhash64("query_id") if kind == "petastorm" else F.col("query_id")
    keys = [r[0] for r in df.select(key).collect()]
    total = df.select(F.explode("p_text")).agg(F.sum("col")).first()[0]
    return keys, float(total)


@pytest.mark.parametrize("kind", ["parquet", "petastorm"])
def test_each_row_reaches_exactly_one_rank(lists_lh, kind):
    world = 2
    with prepare_specs(lists_lh, lists_lh.cfg.train, DIMS, world, kind=kind) as specs:
        specs = pickle.loads(pickle.dumps(specs))  # what Spark tasks / torchrun workers receive
        for split, spec in specs.items():
            loaders = [make_loader(spec, r, world) for r in range(world)]
            keys = [k for ld in loaders for k in ld.shard_rows()[KEY_COL].tolist()]
            want_keys, want_sum = _expected(lists_lh, split, kind)
            assert sorted(keys) == sorted(want_keys) and len(set(keys)) == len(keys)
            batches = [list(ld.epoch_batches(0)) for ld in loaders]
            assert [len(b) for b in batches] == [spec.steps] * world  # ranks stay in step
            got_sum = sum(float(b["p_text"].sum()) for bs in batches for b in bs)
            assert got_sum == pytest.approx(want_sum, rel=1e-5)
            assert sum(int(b["grades"].shape[0]) for bs in batches for b in bs) == len(want_keys)
            b = batches[0][0]
            n = b["grades"].shape[0]
            assert {k: tuple(v.shape) for k, v in b.items()} == {
                "q_text": (n, DIMS.text), "q_audio": (n, DIMS.audio), "q_mask": (n, 2),
                "p_text": (n, L, DIMS.text), "p_image": (n, L, DIMS.image), "p_audio": (n, L, DIMS.audio),
                "p_mask": (n, L, 3), "p_lex": (n, L, N_LEX), "grades": (n, L)}
            assert all(v.dtype == torch.float32 for v in b.values())
            pad = b["grades"] == -1
            assert torch.all(b["p_mask"][pad] == 0)
    if kind == "petastorm":  # converter caches are deleted on exit
        cache = lists_lh.paths.petastorm_cache()
        assert not any(p.is_dir() for p in cache.iterdir())


def _epoch(ld, epoch: int) -> torch.Tensor:
    return torch.cat([b["grades"] for b in ld.epoch_batches(epoch)])


def _order(ld, epoch: int) -> list[int]:
    """Positions, in the rank's own shard (`shard_rows`, key order), of the lists of one epoch, in the order
    they came (lists are told apart by their query text embedding)."""
    pos = {tuple(np.asarray(v, np.float32).tolist()): i for i, v in enumerate(ld.shard_rows()["q_text"])}
    assert len(pos) == len(ld.shard_rows()["q_text"])
    return [pos[tuple(v)] for b in ld.epoch_batches(epoch) for v in b["q_text"].tolist()]


def test_shuffle_is_seeded_by_epoch_and_rank(lists_lh, spark, tmp_path):
    with prepare_specs(lists_lh, lists_lh.cfg.train, DIMS, 2, kind="parquet") as specs:
        a, b = make_loader(specs["train"], 0, 2), make_loader(specs["train"], 0, 2)
        assert torch.equal(_epoch(a, 0), _epoch(b, 0))
        assert not torch.equal(_epoch(a, 0), _epoch(a, 1))
        val = make_loader(specs["validation"], 1, 2)
        assert torch.equal(_epoch(val, 0), _epoch(val, 1))  # validation is not shuffled

    # the rank is part of the seed: two ranks holding equally many lists shuffle them differently
    lh = Lakehouse(spark, make_config(tmp_path, f"train.list_size={L}", "train.batch_size=8"))
    lh.overwrite("training_lists", synthetic_lists_df(spark, 40, L, DIMS, seed=5, splits=(1.0, 0.0)).repartition(2))
    with prepare_specs(lh, lh.cfg.train, DIMS, 2, splits=("train",), kind="parquet") as specs:
        spec = specs["train"]
        r0, r1 = make_loader(spec, 0, 2), make_loader(spec, 1, 2)
        n = len(r0.shard_rows()[KEY_COL])
        assert n == len(r1.shard_rows()[KEY_COL]) == 20
        assert not set(r0.shard_rows()[KEY_COL]) & set(r1.shard_rows()[KEY_COL])  # disjoint shards
        for epoch in (0, 1):
            o0, o1 = _order(r0, epoch), _order(r1, epoch)
            assert sorted(o0) == sorted(o1) == list(range(n))  # each rank: its whole shard, once
            assert o0 != list(range(n)) and o1 != list(range(n))  # shuffled
            assert o0 != o1, f"epoch {epoch}: ranks 0 and 1 shuffled their shards identically"
            # the same (epoch, rank) reproduces, in a fresh loader too
            assert o0 == _order(make_loader(spec, 0, 2), epoch) and o1 == _order(make_loader(spec, 1, 2), epoch)
        assert _order(r1, 0) != _order(r1, 1)


def test_parquet_matches_petastorm_rows(lists_lh):
    """The two paths deliver the same lists (compared by their grades, order-free)."""
    def rows(kind):
        with prepare_specs(lists_lh, lists_lh.cfg.train, DIMS, 1, kind=kind) as specs:
            g = torch.cat([b["grades"] for b in make_loader(specs["train"]).epoch_batches(0)]).numpy()
        return g[np.lexsort(g.T[::-1])]
    np.testing.assert_array_equal(rows("parquet"), rows("petastorm"))


@pytest.mark.parametrize("kind", ["parquet", "petastorm"])
def test_a_shard_larger_than_the_buffer_is_streamed_each_epoch(spark, tmp_path, kind):
    """A shard over `train.shuffle_buffer` lists is never held whole: each epoch streams every list once, in an
    order seeded by (seed, epoch, rank), in exactly `steps` batches."""
    buffer = 5
    lh = Lakehouse(spark, make_config(tmp_path, f"train.list_size={L}", "train.batch_size=4",
                                      f"train.shuffle_buffer={buffer}"))
    lh.overwrite("training_lists",
                 synthetic_lists_df(spark, 60, L, DIMS, seed=7, splits=(1.0, 0.0)).repartition(6))
    piece = max(r[0] for r in lh.read("training_lists").groupBy(F.spark_partition_id()).count()
                .select("count").collect())
    with prepare_specs(lh, lh.cfg.train, DIMS, 2, splits=("train",), kind=kind) as specs:
        spec = specs["train"]
        for rank in (0, 1):
            ld = make_loader(spec, rank, 2)
            n = ld.shard_size()
            assert n > buffer
            orders = [_order(ld, epoch) for epoch in (0, 1)]
            for o in orders:
                assert sorted(o) == list(range(n))  # every list of the shard once per epoch
            assert orders[0] != orders[1]  # reshuffled per epoch
            assert orders[0] == _order(make_loader(spec, rank, 2), 0)  # reproducible
            assert len(list(ld.epoch_batches(2))) == spec.steps
            assert ld._rows is None and 0 < ld.peak_buffered <= buffer + piece < n + piece
