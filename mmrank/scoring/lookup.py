"""Scoring by key: pairs travel through Spark as (query_id, product_id) only; each task looks the features up
where they live, a per-run Parquet snapshot bucketed by id, and encodes every query and product it needs once.

Why: a pair's features are ~6 KB (text, image and audio embeddings of both sides). Joining them onto every
pair and shipping them JVM -> Arrow -> Python cost more than the model itself. Instead:

1. `snapshot.snapshot_tables`: where each side's feature rows are, by id bucket (buckets grouped so one fits
   `score.bucket_mb`): the feature tables' own files, which are stored in id buckets (nothing is written), or,
   for tables that cannot be read that way, a snapshot written under the run's work folder; see
   `mmrank.scoring.snapshot`.
2. `score_by_key`: the pairs get their cell (query bucket, product bucket), are partitioned exactly one cell per
   task (`partitions.one_partition_per_value`) and sorted by key (deterministic batches, so int8 re-runs are
   bit-identical); the task (`mapInArrow`)
   reads its two buckets with pyarrow, encodes them with `FusionRanker.encode_queries` / `encode_products` and
   scores each pair from those codes (`score_codes`), `score.batch_size` pairs at a time.

A product bucket is read once per query bucket: with Q query buckets every product is encoded Q times, so Q
stays small (queries are far fewer than products). Neither side is ever collected to the driver or broadcast.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank.encoders.device import set_threads, task_threads
from mmrank.lexical import N_LEX
from mmrank.modalities import PRODUCT_MODALITIES
from mmrank.partitions import one_partition_per_value
from mmrank.scoring.snapshot import SIDES, FeatureSnapshot, bucket_of, read_bucket

SCORED_SCHEMA = ("query_id string, product_id string, score float, contrib_text float, contrib_image float, "
                 "contrib_audio float")
_ENCODE_CHUNK = 4096  # items encoded per model call when a bucket's codes are built


def encode_side(model, side: str, feats: Mapping[str, np.ndarray]) -> dict:
    """The model's codes of every item of one side (`encode_queries` / `encode_products`), in chunks."""
    import torch

    from mmrank.scoring.scorer import model_device

    device = model_device(model)
    _, modalities = SIDES[side]
    n = len(feats["mask"])
    parts = []
    for s in range(0, max(n, 1), _ENCODE_CHUNK):
        t = [torch.from_numpy(np.ascontiguousarray(feats[m][s:s + _ENCODE_CHUNK])).to(device)
             for m in (*modalities, "mask")]
        parts.append(model.encode_queries(*t) if side == "queries" else model.encode_products(*t))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def score_indexed(model, queries: dict, products: dict, qi: np.ndarray, pi: np.ndarray, batch_size: int,
                  lex: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n], contributions [n, 3]) of the pairs (qi[j], pi[j]) from codes, `batch_size` at a time;
    `lex` [n, N_LEX]: the pairs' lexical features (`score_codes(..., lex=)`)."""
    import torch

    scores, contrib = [], []
    device = queries["q"].device
    with torch.inference_mode():
        for s in range(0, len(qi), batch_size):
            a = torch.from_numpy(np.asarray(qi[s:s + batch_size], np.int64)).to(device)
            b = torch.from_numpy(np.asarray(pi[s:s + batch_size], np.int64)).to(device)
            kw = {} if lex is None else {"lex": torch.from_numpy(np.ascontiguousarray(lex[s:s + batch_size])).to(device)}
            sc, co = model.score_codes(queries, products, a, b, **kw)
            scores.append(sc.float().cpu().numpy())
            contrib.append(co.float().cpu().numpy())
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, len(PRODUCT_MODALITIES)), np.float32)
    return np.concatenate(scores).astype(np.float32), np.concatenate(contrib).astype(np.float32)


class _Codes:
    """A task's codes of the last bucket read per side (cells arrive sorted: each bucket is read once)."""

    def __init__(self, model, snap: FeatureSnapshot):
        self.model, self.snap = model, snap
        self.dims = model.dims.as_dict()
        self.held: dict[str, tuple[int, pd.Index, dict]] = {}

    def get(self, side: str, bucket: int) -> tuple[pd.Index, dict]:
        if side not in self.held or self.held[side][0] != bucket:
            ids, feats = read_bucket(self.snap, side, bucket, self.dims)
            self.held[side] = (bucket, ids, encode_side(self.model, side, feats))
        return self.held[side][1], self.held[side][2]


def _positions(index: pd.Index, keys: np.ndarray, side: str) -> np.ndarray:
    rows = index.get_indexer(keys)
    if (rows < 0).any():
        raise ValueError(f"{(rows < 0).sum()} pair(s) name {side} absent from the feature snapshot "
                         f"(e.g. {keys[rows < 0][0]!r}): filter pairs with `features.scorable` first")
    return rows


def make_key_scorer(artifacts_dir: str, version: str, quantize: bool, batch_size: int, snap: FeatureSnapshot,
                    lex_col: str | None = None):
    """The `mapInArrow` function of `score_by_key`: (query_id, product_id, qb, pb[, lex_col]) -> SCORED_SCHEMA
    rows."""

    def run(batches: Iterator) -> Iterator:
        import pyarrow as pa

        from mmrank.scoring.scorer import load_scorer, rechunk_arrow

        set_threads(task_threads())
        model, _ = load_scorer(artifacts_dir, version, quantize)
        codes = _Codes(model, snap)
        for b in rechunk_arrow(batches, batch_size):  # Arrow batches hold spark.arrow_batch_size rows
            cell = np.stack([b.column("qb").to_numpy(), b.column("pb").to_numpy()], axis=1)
            starts = np.flatnonzero(np.r_[True, (cell[1:] != cell[:-1]).any(axis=1)])
            for s, e in zip(starts, np.r_[starts[1:], len(cell)]):
                qids, qc = codes.get("queries", int(cell[s, 0]))
                pids, pc_ = codes.get("products", int(cell[s, 1]))
                part = b.slice(s, e - s)
                qk = part.column("query_id").to_numpy(zero_copy_only=False)
                pk = part.column("product_id").to_numpy(zero_copy_only=False)
                extra = (part.column(lex_col).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                         .reshape(part.num_rows, N_LEX) if lex_col else None)
                sc, co = score_indexed(model, qc, pc_, _positions(qids, qk, "queries"),
                                       _positions(pids, pk, "products"), batch_size, extra)
                yield pa.RecordBatch.from_arrays(
                    [part.column("query_id"), part.column("product_id"), pa.array(sc)]
                    + [pa.array(co[:, i]) for i in range(co.shape[1])],
                    names=["query_id", "product_id", "score", "contrib_text", "contrib_image", "contrib_audio"])

    return run


def score_by_key(pairs: DataFrame, snap: FeatureSnapshot, artifacts_dir: str, version: str, quantize: bool,
                 batch_size: int, lex_col: str | None = None) -> DataFrame:
    """Score (query_id, product_id) pairs whose features are in `snap` (see the module doc). `lex_col`: an
    array<float> column of `pairs` with each pair's N_LEX lexical features (they belong to the pair, not to
    either side), which travels with the keys and reaches the model as `score_codes(..., lex=)`."""
    nq, npb = snap.query_buckets, snap.product_buckets
    extra = [lex_col] if lex_col else []
    cells = (pairs.select("query_id", "product_id", *extra, bucket_of("query_id", nq).alias("qb"),
                          bucket_of("product_id", npb).alias("pb"))
             .withColumn("_cell", F.col("qb") * F.lit(npb) + F.col("pb")))
    ordered = (one_partition_per_value(cells, "_cell")
               .sortWithinPartitions("_cell", "query_id", "product_id").drop("_cell"))
    return ordered.mapInArrow(make_key_scorer(artifacts_dir, version, quantize, batch_size, snap, lex_col),
                              SCORED_SCHEMA)
