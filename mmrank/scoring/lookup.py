"""Scoring by key: pairs travel through Spark as (query_id, product_id) only; each task looks the features up
where they live, a per-run Parquet snapshot bucketed by id, and encodes every query and product it needs once.

Why: a pair's features are ~6 KB (text, image and audio embeddings of both sides). Joining them onto every
pair and shipping them JVM -> Arrow -> Python cost more than the model itself. Instead:

1. `write_snapshot`: the usable feature rows (id, modality, embedding) of queries and of products, each side
   hash-bucketed by id into `plan_buckets` buckets (sized so one bucket fits `score.bucket_mb`), written once
   as Parquet under the run's work folder (`bucket=<b>/` folders).
2. `score_by_key`: the pairs get their cell (query bucket, product bucket), are range-partitioned one cell per
   task and sorted by key (deterministic batches, so int8 re-runs are bit-identical); the task (`mapInArrow`)
   reads its two buckets with pyarrow, encodes them with `FusionRanker.encode_queries` / `encode_products` and
   scores each pair from those codes (`score_codes`), `score.batch_size` pairs at a time.

A product bucket is read once per query bucket: with Q query buckets every product is encoded Q times, so Q
stays small (queries are far fewer than products). Neither side is ever collected to the driver or broadcast.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mmrank import storage
from mmrank.encoders.device import set_threads, task_threads
from mmrank.lexical import N_LEX
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

SIDES = {"queries": ("query_id", QUERY_MODALITIES), "products": ("product_id", PRODUCT_MODALITIES)}
SCORED_SCHEMA = ("query_id string, product_id string, score float, contrib_text float, contrib_image float, "
                 "contrib_audio float")
_ENCODE_CHUNK = 4096  # items encoded per model call when a bucket's codes are built


def bucket_of(col: str | Column, n: int) -> Column:
    """The bucket (0..n-1) of an id column: the same expression on both sides, so pairs find their rows."""
    return F.pmod(F.xxhash64(col), F.lit(int(n))).cast("int")


def task_slots(spark) -> int:
    """Concurrent tasks of a session (default parallelism; shuffle partitions without a SparkContext)."""
    try:
        return max(1, int(spark.sparkContext.defaultParallelism))
    except Exception:  # Spark Connect / serverless
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions")))


def plan_buckets(floats: int, bucket_mb: float, at_least: int = 1) -> int:
    """Buckets needed so one holds at most `bucket_mb` MB of float32 embeddings (and at least `at_least`)."""
    return max(int(at_least), math.ceil(4 * floats / (bucket_mb * 2 ** 20)))


@dataclass(frozen=True)
class FeatureSnapshot:
    """Where a run's bucketed feature rows are, and how many buckets each side has."""

    root: str
    query_buckets: int
    product_buckets: int

    def buckets(self, side: str) -> int:
        return self.query_buckets if side == "queries" else self.product_buckets

    def folder(self, side: str, bucket: int) -> str:
        return storage.join(self.root, side, f"bucket={int(bucket)}")


def write_snapshot(root: str, queries: DataFrame, products: DataFrame, bucket_mb: float,
                   min_product_buckets: int = 1) -> FeatureSnapshot:
    """Write usable feature rows (`<side id>, modality, embedding`, e.g. `query_features` rows filtered with
    `features.usable`) bucketed by id under `root`; bucket counts from the embedding volume of each side."""
    frames = {"queries": queries, "products": products}
    floats = {s: int(df.agg(F.sum(F.size("embedding"))).first()[0] or 0) for s, df in frames.items()}
    snap = FeatureSnapshot(root, plan_buckets(floats["queries"], bucket_mb),
                           plan_buckets(floats["products"], bucket_mb, min_product_buckets))
    for side, df in frames.items():
        key, _ = SIDES[side]
        n = snap.buckets(side)
        (df.select(F.col(key).alias("id"), "modality", "embedding", bucket_of(key, n).alias("bucket"))
         .repartition(n, "bucket").write.mode("overwrite").partitionBy("bucket")
         .parquet(storage.spark_uri(storage.join(root, side))))
    return snap


def read_bucket(snap: FeatureSnapshot, side: str, bucket: int, dims: Mapping[str, int] | None = None
                ) -> tuple[pd.Index, dict[str, np.ndarray]]:
    """(ids, {modality: [N, dim] float32 (zeros where absent), 'mask': [N, M]}) of one bucket of one side.
    Without `dims` a modality's width is its embeddings' length (which must then be the same for all)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _, modalities = SIDES[side]
    fs, folder = storage.filesystem(snap.folder(side, bucket))
    if not fs.isdir(folder):  # no id hashed into this bucket
        return pd.Index([], dtype=object), {**{m: np.zeros((0, (dims or {}).get(m, 0)), np.float32)
                                               for m in modalities},
                                            "mask": np.zeros((0, len(modalities)), np.float32)}
    t = pq.read_table(folder, columns=["id", "modality", "embedding"], filesystem=fs)
    ids = pd.Index(pd.unique(t.column("id").to_numpy(zero_copy_only=False)))
    out: dict[str, np.ndarray] = {"mask": np.zeros((len(ids), len(modalities)), np.float32)}
    for i, m in enumerate(modalities):
        sub = t.filter(pc.equal(t.column("modality"), m))
        rows = ids.get_indexer(sub.column("id").to_numpy(zero_copy_only=False))
        emb = sub.column("embedding").combine_chunks()
        flat = emb.flatten().to_numpy(zero_copy_only=False)
        width = dims[m] if dims else (int(emb.value_lengths()[0].as_py()) if len(emb) else 0)
        if flat.size != len(rows) * width:
            raise ValueError(f"{side} bucket {bucket}: {m} embeddings are not all {width} wide")
        out[m] = np.zeros((len(ids), width), np.float32)
        out[m][rows] = flat.reshape(len(rows), width)
        out["mask"][rows, i] = 1.0
    return ids, out


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

        from mmrank.scoring.scorer import load_scorer

        set_threads(task_threads())
        model, _ = load_scorer(artifacts_dir, version, quantize)
        codes = _Codes(model, snap)
        for b in batches:
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
    ordered = (cells.repartitionByRange(nq * npb, "_cell")
               .sortWithinPartitions("_cell", "query_id", "product_id").drop("_cell"))
    return ordered.mapInArrow(make_key_scorer(artifacts_dir, version, quantize, batch_size, snap, lex_col),
                              SCORED_SCHEMA)
