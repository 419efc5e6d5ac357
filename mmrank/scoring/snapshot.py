"""A run's feature snapshot: the usable feature rows of queries and products, each side bucketed by id, where
the scoring and similarity tasks read them (`<root>/<side>/bucket=<b>/*.parquet`: id, modality, embedding).

Two writers, one layout:
- `snapshot_tables(lh, root, ...)` (the score stage and the similarity candidates): when a feature table's data
  files can be read as plain Parquet (Delta without deletion vectors or column mapping, see `raw_files`), Python
  tasks read them with pyarrow, keep the usable rows (`usable_mask`, the `features.usable` rule) and write each
  bucket's rows: one pass over the embeddings, no shuffle and no JVM decoding of the arrays. Otherwise, and for
  any DataFrame,
- `write_snapshot(root, queries, products, ...)`: the same layout written by Spark from `usable_rows` frames.

Buckets are `crc32(id) mod n` (`bucket_of` in Spark, `bucket_ids` in Python: the same numbers), sized so one
bucket holds at most `score.bucket_mb` MB of float32 embeddings. `read_bucket` returns a bucket's rows sorted by
id, so every run encodes the same items in the same batches (int8 re-runs stay bit-identical).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mmrank import storage
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

SIDES = {"queries": ("query_id", QUERY_MODALITIES), "products": ("product_id", PRODUCT_MODALITIES)}
TABLES = {"queries": "query_features", "products": "product_features"}
COLUMNS = ["id", "modality", "embedding"]


def bucket_of(col: str | Column, n: int) -> Column:
    """The bucket (0..n-1) of an id column: crc32 of its UTF-8 bytes mod n (= `bucket_ids` in Python)."""
    return F.pmod(F.crc32(F.col(col).cast("binary") if isinstance(col, str) else col.cast("binary")),
                  F.lit(int(n))).cast("int")


def bucket_ids(ids, n: int) -> np.ndarray:
    """`bucket_of` in Python: crc32(utf-8 id) mod n for each id."""
    return np.fromiter((zlib.crc32(str(i).encode("utf-8")) % n for i in ids), np.int64, count=len(ids))


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
    `features.usable`) bucketed by id under `root` with Spark; bucket counts from the embedding volume."""
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


# ---- the raw-file writer --------------------------------------------------------------------------------
def raw_files(lh, table: str) -> tuple[list[str], int] | None:
    """(data files, bytes) of a feature table when they can be read as plain Parquet: a Delta table without
    deletion vectors (whose files would still hold deleted rows) or column mapping (physical column names);
    None otherwise. File names only reach the driver (they grow with the files, not the rows)."""
    d = lh.spark.sql(f"DESCRIBE DETAIL {lh.ident(table)}").first()
    props = d["properties"] or {}
    if (d["format"] != "delta" or props.get("delta.enableDeletionVectors", "false").lower() == "true"
            or props.get("delta.columnMapping.mode", "none") != "none"
            or set(d["partitionColumns"] or []) & ({key for key, _ in SIDES.values()} | {"modality", "embedding"})):
        return None
    return sorted(lh.read(table).inputFiles()), int(d["sizeInBytes"] or 0)


def usable_mask(emb, width: int | None) -> np.ndarray:
    """[N] bool of a pyarrow list<float> array: non-null, every value finite and (width given) that long: the
    `features.usable` rule of the Spark side."""
    import pyarrow.compute as pc

    lens = pc.fill_null(pc.list_value_length(emb), -1).to_numpy(zero_copy_only=False)
    ok = lens >= 0 if width is None else lens == width
    flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32)  # null values -> NaN
    ends = np.cumsum(np.clip(lens, 0, None))  # a null list has no values
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(flat))])
    return ok & (bad[ends] - bad[ends - np.clip(lens, 0, None)] == 0)


def _split_files(side: str, n: int, dims: Mapping[str, int] | None, root: str, files: list[str], groups: int):
    """mapInArrow function over `spark.range(groups)` (one row, one task per group): group g's files
    (`files[g::groups]`) -> their usable rows, one Parquet file per bucket (`part-<g>.parquet`); yields
    (bucket, rows) counts."""
    key, modalities = SIDES[side]

    def run(batches: Iterator) -> Iterator:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        writers: dict[tuple[int, int], pq.ParquetWriter] = {}
        counts: dict[int, int] = {}
        schema = pa.schema([("id", pa.string()), ("modality", pa.string()), ("embedding", pa.list_(pa.float32()))])
        try:
            for b in batches:
                for group in b.column("id").to_pylist():
                    for path in files[group::groups]:
                        fs, p = storage.filesystem(path)
                        t = pq.read_table(p, columns=[key, "modality", "embedding"], filesystem=fs)
                        t = t.select([key, "modality", "embedding"]).rename_columns(COLUMNS).cast(schema)
                        for m in modalities:
                            sub = t.filter(pc.equal(t.column("modality"), m))
                            sub = sub.filter(pa.array(usable_mask(sub.column("embedding").combine_chunks(),
                                                                  (dims or {}).get(m))))
                            if not sub.num_rows:
                                continue
                            bk = bucket_ids(sub.column("id").to_pylist(), n)
                            for bucket in np.unique(bk):
                                w = writers.get((group, int(bucket)))
                                if w is None:
                                    out_fs, folder = storage.filesystem(storage.join(root, side, f"bucket={bucket}"))
                                    out_fs.makedirs(folder, exist_ok=True)
                                    w = writers[(group, int(bucket))] = pq.ParquetWriter(
                                        f"{folder}/part-{group:05d}.parquet", schema, filesystem=out_fs,
                                        compression="none")
                                part = sub.filter(pa.array(bk == bucket))
                                w.write_table(part)
                                counts[int(bucket)] = counts.get(int(bucket), 0) + part.num_rows
        finally:
            for w in writers.values():
                w.close()
        if counts:
            yield pa.RecordBatch.from_arrays([pa.array(list(counts), pa.int32()), pa.array(list(counts.values()))],
                                             names=["bucket", "rows"])
    return run


def _write_raw(lh, root: str, side: str, files: list[str], n: int, dims: Mapping[str, int] | None) -> None:
    """One task per group of files (`spark.range` puts exactly one group in each partition; a hash
    repartition of a few group ids can put them all in one task)."""
    groups = max(1, min(len(files), task_slots(lh.spark)))
    (lh.spark.range(0, groups, 1, groups).mapInArrow(_split_files(side, n, dims, root, files, groups),
                                                    "bucket int, rows long").count())


def snapshot_tables(lh, root: str, dims: Mapping[str, int] | None, bucket_mb: float,
                    min_product_buckets: int = 1) -> FeatureSnapshot:
    """The snapshot of the lakehouse's `query_features` / `product_features` (usable rows for `dims`) in `root`
    (whatever was there is replaced): from the raw files when both tables allow it, else with Spark
    (`write_snapshot`)."""
    from mmrank.scoring.features import usable_rows

    storage.remove_tree(root)
    raw = {side: raw_files(lh, table) for side, table in TABLES.items()}
    if any(r is None for r in raw.values()):
        return write_snapshot(root, *(usable_rows(lh.read(TABLES[s]), *SIDES[s], dims) for s in TABLES),
                              bucket_mb, min_product_buckets)
    snap = FeatureSnapshot(root, plan_buckets(raw["queries"][1] // 4, bucket_mb),
                           plan_buckets(raw["products"][1] // 4, bucket_mb, min_product_buckets))
    for side, (files, _) in raw.items():
        if files:
            _write_raw(lh, root, side, files, snap.buckets(side), dims)
    return snap


def read_bucket(snap: FeatureSnapshot, side: str, bucket: int, dims: Mapping[str, int] | None = None
                ) -> tuple[pd.Index, dict[str, np.ndarray]]:
    """(ids sorted, {modality: [N, dim] float32 (zeros where absent), 'mask': [N, M]}) of one bucket of one side.
    Without `dims` a modality's width is its embeddings' length (which must then be the same for all)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _, modalities = SIDES[side]
    fs, folder = storage.filesystem(snap.folder(side, bucket))
    if not fs.isdir(folder):  # no id hashed into this bucket
        return pd.Index([], dtype=object), {**{m: np.zeros((0, (dims or {}).get(m, 0)), np.float32)
                                               for m in modalities},
                                            "mask": np.zeros((0, len(modalities)), np.float32)}
    t = pq.read_table(folder, columns=COLUMNS, filesystem=fs)
    ids = pd.Index(np.sort(pd.unique(t.column("id").to_numpy(zero_copy_only=False))))
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
