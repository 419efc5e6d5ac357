"""A run's feature snapshot: the usable feature rows of queries and products, each side bucketed by id, where
the scoring and similarity tasks read them.

In place (the usual case, nothing written): the feature tables are stored in FEATURE_BUCKETS id buckets
(`mmrank.tables`, `mmrank.buckets`); `snapshot_tables` lists their current data files (the Delta snapshot's,
so removed files are never read) and groups the buckets (a power of two of groups, sized by `score.bucket_mb`);
a task reads its group's files with pyarrow and keeps the usable rows. When a table cannot be read that way
(deletion vectors, column mapping, or written before it was bucketed), a snapshot is written under the run's
work folder (`<root>/<side>/bucket=<b>/*.parquet`: id, modality, embedding) by one of two writers:
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

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank import storage
from mmrank.buckets import FEATURE_BUCKETS, bucket_ids, bucket_of  # noqa: F401  (bucket_of re-exported)
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

log = logging.getLogger("mmrank.snapshot")
_BUCKET_DIR = re.compile(r"/bucket=(\d+)/[^/]+$")
SIDES = {"queries": ("query_id", QUERY_MODALITIES), "products": ("product_id", PRODUCT_MODALITIES)}
TABLES = {"queries": "query_features", "products": "product_features"}
COLUMNS = ["id", "modality", "embedding"]


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
    """Where a run's bucketed feature rows are, and how many buckets each side has. With `files`, the buckets
    are the feature tables' own data files read in place ({side: one tuple of files per bucket}; rows not yet
    filtered to the usable ones); without, the Parquet folders a writer made under `root`."""

    root: str
    query_buckets: int
    product_buckets: int
    files: Mapping[str, tuple[tuple[str, ...], ...]] | None = None

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
    """(data files, bytes) of a feature table when they can be read as plain Parquet
    (`Lakehouse.parquet_readable`); None otherwise. File names only reach the driver (they grow with the files,
    not the rows)."""
    d = lh.parquet_readable(table, ({key for key, _ in SIDES.values()} | {"modality", "embedding"}))
    if d is None:
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


def usable_table(t, modalities: tuple[str, ...], dims: Mapping[str, int] | None):
    """The rows of a pyarrow (id, modality, embedding) table a model can use: one of `modalities`, usable
    embedding (`usable_mask`); grouped by modality in `modalities` order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for m in modalities:
        sub = t.filter(pc.equal(t.column("modality"), m))
        parts.append(sub.filter(pa.array(usable_mask(sub.column("embedding").combine_chunks(), (dims or {}).get(m)))))
    return pa.concat_tables(parts)


def _read_files(paths, key: str):
    """(id, modality, embedding) rows of some feature-table data files, as `COLUMNS` with float32 embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("modality", pa.string()), ("embedding", pa.list_(pa.float32()))])
    tables = []
    for path in paths:
        fs, p = storage.filesystem(path)
        t = pq.read_table(p, columns=[key, "modality", "embedding"], filesystem=fs)
        tables.append(t.select([key, "modality", "embedding"]).rename_columns(COLUMNS).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _split_files(side: str, n: int, dims: Mapping[str, int] | None, root: str, files: list[str], groups: int):
    """mapInArrow function over `spark.range(groups)` (one row, one task per group): group g's files
    (`files[g::groups]`) -> their usable rows, one Parquet file per bucket (`part-<g>.parquet`); yields
    (bucket, rows) counts."""
    key, modalities = SIDES[side]

    def run(batches: Iterator) -> Iterator:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writers: dict[tuple[int, int], pq.ParquetWriter] = {}
        counts: dict[int, int] = {}
        try:
            for b in batches:
                for group in b.column("id").to_pylist():
                    for path in files[group::groups]:
                        sub = usable_table(_read_files([path], key), modalities, dims)
                        if not sub.num_rows:
                            continue
                        bk = bucket_ids(sub.column("id").to_pylist(), n)
                        for bucket in np.unique(bk):
                            w = writers.get((group, int(bucket)))
                            if w is None:
                                out_fs, folder = storage.filesystem(storage.join(root, side, f"bucket={bucket}"))
                                out_fs.makedirs(folder, exist_ok=True)
                                w = writers[(group, int(bucket))] = pq.ParquetWriter(
                                    f"{folder}/part-{group:05d}.parquet", sub.schema, filesystem=out_fs,
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


def stored_buckets(files: list[str]) -> list[int] | None:
    """The `bucket` partition of each data file of a table stored in id buckets (`mmrank.tables`: its files
    sit in `bucket=<b>/` folders), or None when some file is not in such a folder."""
    out = []
    for f in files:
        m = _BUCKET_DIR.search(f)
        if m is None:
            return None
        out.append(int(m.group(1)))
    return out


def group_count(floats: int, bucket_mb: float, at_least: int = 1) -> int:
    """How many groups to read the FEATURE_BUCKETS stored buckets in: `plan_buckets` rounded up to a power of
    two (a divisor of FEATURE_BUCKETS, so group g = the stored buckets b with b mod groups = g), at most
    FEATURE_BUCKETS (then a group can hold more than `bucket_mb`)."""
    want = plan_buckets(floats, bucket_mb, at_least)
    if want > FEATURE_BUCKETS:
        log.warning("features need %d buckets of %.3g MB; the tables have %d, so a task reads more than that",
                    want, bucket_mb, FEATURE_BUCKETS)
    return min(FEATURE_BUCKETS, 1 << max(0, want - 1).bit_length())


def in_place(root: str, raw: Mapping[str, tuple[list[str], int]], stored: Mapping[str, list[int]],
             bucket_mb: float, min_product_buckets: int = 1) -> FeatureSnapshot:
    """The snapshot that reads the feature tables' own files, grouped by their stored buckets: nothing written."""
    n = {"queries": group_count(raw["queries"][1] // 4, bucket_mb),
         "products": group_count(raw["products"][1] // 4, bucket_mb, min_product_buckets)}
    files = {side: tuple(tuple(f for f, b in zip(raw[side][0], stored[side]) if b % n[side] == g)
                         for g in range(n[side])) for side in SIDES}
    return FeatureSnapshot(root, n["queries"], n["products"], files)


def snapshot_tables(lh, root: str, dims: Mapping[str, int] | None, bucket_mb: float,
                    min_product_buckets: int = 1) -> FeatureSnapshot:
    """The snapshot of the lakehouse's `query_features` / `product_features` (usable rows for `dims`): the
    tables' own files, read in place, when both can be read as plain Parquet and are stored in id buckets (the
    layout `mmrank.tables` gives them); else written to `root` (whatever was there is replaced) from the raw
    files when both tables allow it, else with Spark (`write_snapshot`)."""
    from mmrank.scoring.features import usable_rows

    storage.remove_tree(root)
    raw = {side: raw_files(lh, table) for side, table in TABLES.items()}
    if any(r is None for r in raw.values()):
        return write_snapshot(root, *(usable_rows(lh.read(TABLES[s]), *SIDES[s], dims) for s in TABLES),
                              bucket_mb, min_product_buckets)
    stored = {side: stored_buckets(files) for side, (files, _) in raw.items()}
    if all(b is not None for b in stored.values()):
        return in_place(root, raw, stored, bucket_mb, min_product_buckets)
    snap = FeatureSnapshot(root, plan_buckets(raw["queries"][1] // 4, bucket_mb),
                           plan_buckets(raw["products"][1] // 4, bucket_mb, min_product_buckets))
    for side, (files, _) in raw.items():
        if files:
            _write_raw(lh, root, side, files, snap.buckets(side), dims)
    return snap


def usable_matrices(t, modalities: tuple[str, ...], dims: Mapping[str, int] | None, where: str
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{modality: (ids [k], embeddings [k, width] float32)} of the usable rows of an (id, modality, embedding)
    pyarrow table (the `usable_mask` rule: non-null, all values finite, `dims[m]` wide), gathered straight from
    the Arrow buffers in one copy per modality (Arrow table filters would copy every embedding twice). Without
    `dims` a modality's width is its embeddings' length, which must then be the same for all."""
    import pyarrow.compute as pc

    got: dict[str, tuple[list, list]] = {m: ([], []) for m in modalities}
    for batch in t.to_batches():
        emb = batch.column("embedding")
        offsets = emb.offsets.to_numpy()  # into emb.values, slice offset included
        values = emb.values.to_numpy(zero_copy_only=False)  # null values -> NaN
        lens = np.diff(offsets)
        valid = emb.is_valid().to_numpy(zero_copy_only=False)
        ids = batch.column("id").to_numpy(zero_copy_only=False)
        for m in modalities:
            sel = np.flatnonzero(pc.fill_null(pc.equal(batch.column("modality"), m), False)
                                 .to_numpy(zero_copy_only=False) & valid)
            width = dims[m] if dims else (int(lens[sel[0]]) if len(sel) else None)
            if width is None:
                continue
            if dims:
                sel = sel[lens[sel] == width]
            elif (lens[sel] != width).any() or any(g.shape[1] != width for g in got[m][1]):
                raise ValueError(f"{where}: {m} embeddings are not all {width} wide")
            mat = values[offsets[sel][:, None] + np.arange(width)]
            ok = np.isfinite(mat).all(axis=1)
            got[m][0].append(ids[sel[ok]])
            got[m][1].append(mat[ok].astype(np.float32, copy=False))
    return {m: (np.concatenate(i), np.concatenate(e)) for m, (i, e) in got.items() if i}


def read_bucket(snap: FeatureSnapshot, side: str, bucket: int, dims: Mapping[str, int] | None = None
                ) -> tuple[pd.Index, dict[str, np.ndarray]]:
    """(ids sorted, {modality: [N, dim] float32 (zeros where absent), 'mask': [N, M]}) of one bucket of one side:
    its usable rows (`usable_matrices`). Without `dims` a modality's width is its embeddings' length (which must
    then be the same for all)."""
    import pyarrow.parquet as pq

    key, modalities = SIDES[side]
    if snap.files is not None:
        paths = snap.files[side][bucket]
        t = _read_files(paths, key) if paths else None
    else:
        fs, folder = storage.filesystem(snap.folder(side, bucket))
        t = pq.read_table(folder, columns=COLUMNS, filesystem=fs) if fs.isdir(folder) else None
    got = usable_matrices(t, modalities, dims, f"{side} bucket {bucket}") if t is not None else {}
    ids = pd.Index(np.sort(pd.unique(np.concatenate([got[m][0] for m in got]))) if got else [], dtype=object)
    out: dict[str, np.ndarray] = {"mask": np.zeros((len(ids), len(modalities)), np.float32)}
    for i, m in enumerate(modalities):
        width = got[m][1].shape[1] if m in got else (dims or {}).get(m, 0)
        out[m] = np.zeros((len(ids), width), np.float32)
        if m in got:
            rows = ids.get_indexer(got[m][0])
            out[m][rows] = got[m][1]
            out["mask"][rows, i] = 1.0
    return ids, out
