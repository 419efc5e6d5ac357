"""Stage `featurize`: embed changed products and queries with the configured encoders, MERGE into Delta.

Inputs per (table, modality) (a null input = no row for that modality, not an error):
  - products: text  = the non-empty `features.text.product_fields` (default title, brand, category,
                      description) joined by `features.text.separator` (default " | ");
              image = `image_bytes`; audio = `audio_bytes`.
  - queries:  text  = `query_text` (typed queries; voice queries only if they carry a non-blank transcript);
              audio = `query_audio` (voice queries, WAV bytes).
Each feature row's `content_hash` = sha256(encoder version | sha256(that modality's input)), so a new title
re-encodes the text only, and a new encoder version re-encodes that modality only. The sha256 of media bytes
was stored at ingest (`image_hash`, `audio_hash`), so deciding what changed reads ids and hashes only; only the
items to encode get their bytes: on a full night the encoder tasks read them from the source table's Parquet
files themselves (`with_bytes`, `mmrank.media_files`), else they are joined in Spark. Rows whose hash is
already in the feature table are skipped; the rest go through one `mapInArrow` (encoders loaded once per
Python worker, Arrow batches split into `batch_size` model batches, torch threads = cores per Spark task).
Items the encoder rejects (corrupt image, empty/unreadable audio, empty/over-long text) become quarantine rows
for (run_date, featurize); feature rows of products/queries or modalities that disappeared, or whose new
content failed to encode, are deleted by the same MERGE, whose source is the new embeddings plus the keys to
delete (never the unchanged rows).
"""
from __future__ import annotations

import datetime as dt
import logging
from functools import reduce
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mmrank.config import FeaturesConf
from mmrank.encoders.device import set_threads, task_threads
from mmrank.encoders.registry import encoder_identity, get_encoder
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.media_files import REF_COLUMNS, read_items, split_of, with_refs
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
from mmrank.partitions import one_partition_per_value
from mmrank.runs import StageRun
from mmrank.stages import stage

log = logging.getLogger("mmrank.featurize")

STAGE = "featurize"
FEATURE_TABLES = {"products": ("product_features", "product_id"), "queries": ("query_features", "query_id")}
MODALITIES = {"products": PRODUCT_MODALITIES, "queries": QUERY_MODALITIES}
MEDIA_COLUMNS = {  # (source, modality) -> (bytes column, its sha256 stored at ingest)
    ("products", "image"): ("image_bytes", "image_hash"), ("products", "audio"): ("audio_bytes", "audio_hash"),
    ("queries", "audio"): ("query_audio", "audio_hash")}
ENCODE_SCHEMA = ("source string, id string, modality string, content_hash string, "
                 "embedding array<float>, error string, payload string")
ENCODE_COLUMNS = [c.split()[0] for c in ENCODE_SCHEMA.split(", ")]
PAYLOAD_CHARS = 200
STREAM_BATCHES = 8  # model batches of media read from their files at a time (`task_items`)


def _nonblank(c: str) -> Column:
    return F.nullif(F.trim(F.col(c)), F.lit(""))


def product_text(cfg: FeaturesConf) -> Column:
    """The product text template: non-empty product_fields joined by the separator ('' if all are empty)."""
    return F.concat_ws(cfg.text.separator, *[_nonblank(c) for c in cfg.text.product_fields])


def _inputs(source: str, modality: str, cfg: FeaturesConf) -> tuple[Column | None, str | None, str | None]:
    """(text input column, bytes column name, hash column name) of one (source table, modality)."""
    if modality != "text":
        return (None, *MEDIA_COLUMNS[source, modality])
    if source == "products":
        return product_text(cfg), None, None
    typed = (F.col("kind") == "typed") | _nonblank("query_text").isNotNull()
    return F.when(F.col("query_text").isNotNull() & typed, F.col("query_text")), None, None


def _hash_of(df: DataFrame, data: str, hash_col: str) -> Column:
    """The stored sha256 of a bytes column (computed at ingest); tables written before it existed hash it here."""
    return F.col(hash_col) if hash_col in df.columns else F.sha2(F.col(data), 256)


def candidates(lh: Lakehouse, source: str, versions: dict[str, str]) -> DataFrame:
    """Every (id, modality) of `source` that has an input, with its text (text modality) and content hash.
    Media bytes are not read: their hashes were stored at ingest (`with_bytes` fetches bytes for what is
    encoded)."""
    cfg, key = lh.cfg.features, FEATURE_TABLES[source][1]
    df = lh.read(source)
    parts = []
    for m in MODALITIES[source]:
        text, data, hash_col = _inputs(source, m, cfg)
        payload_hash = F.sha2(text, 256) if text is not None else _hash_of(df, data, hash_col)
        parts.append(df.select(
            F.lit(source).alias("source"), F.col(key).alias("id"), F.lit(m).alias("modality"),
            (text if text is not None else F.lit(None).cast("string")).alias("text"),
            F.sha2(F.concat_ws("|", F.lit(versions[m]), payload_hash), 256).alias("content_hash"),
        ).where(payload_hash.isNotNull()))
    return reduce(DataFrame.unionByName, parts)


def with_bytes(lh: Lakehouse, todo: DataFrame, counts: dict[str, int], n_parts: int) -> DataFrame:
    """`todo` (source, id, modality, text, content_hash) plus what the encoders need of its image/audio items:
    where their bytes are (REF_COLUMNS, read by the encoder task itself, `mmrank.media_files`) or the bytes
    (`data`), joined by key from the source tables.

    Delivered ready for the encoders, each partition one (source, modality). When at least half of a media
    modality is to be encoded (a first night, a new encoder) and its table's files can be read as plain
    Parquet, its rows get their (file, split) references and one partition per split: the bytes are read once,
    by the task that encodes them, and never cross the JVM (with fewer splits than `n_parts`, a small table,
    each split's items are shared by several tasks, each reading the split). Otherwise the bytes are joined in
    Spark: both sides hash-partitioned by id into `n_parts` and joined in place (one shuffle of the media) when
    at least half is encoded; else the few rows to encode are joined (a broadcast of their keys where Spark
    finds them small) and only they are spread over `n_parts`.
    """
    cfg = lh.cfg.features
    cols = ["source", "id", "modality", "text", "data", "content_hash", *REF_COLUMNS]
    no_refs = [F.lit(None).cast(t).alias(c) for c, t in zip(REF_COLUMNS, ("string", "long", "long"))]
    parts = [todo.where(F.col("modality") == "text").select(
        *todo.columns, F.lit(None).cast("binary").alias("data"), *no_refs).select(*cols).repartition(n_parts)]
    by_split = []
    for source, (_, key) in FEATURE_TABLES.items():
        for m in MODALITIES[source]:
            _, data, _ = _inputs(source, m, cfg)
            n = counts.get(f"attempted_{source}_{m}", 0)
            if data is None or n == 0:
                continue
            keys = todo.where((F.col("source") == source) & (F.col("modality") == m))
            most = n >= counts.get(f"unchanged_{source}_{m}", 0)
            if most and lh.parquet_readable(source, (key, data)) is not None:
                by_split.append(with_refs(keys, lh.read(source), key)
                                .withColumn("data", F.lit(None).cast("binary")).select(*cols))
                continue
            media = lh.read(source).select(F.col(key).alias("id"), F.col(data).alias("data"))
            if most:
                part = keys.repartition(n_parts, "id").join(media.repartition(n_parts, "id"), "id")
            else:
                part = keys.join(media, "id").repartition(n_parts)
            parts.append(part.select(*cols[:6], *no_refs))
    if by_split:
        refs = reduce(DataFrame.unionByName, by_split)
        kind = F.concat_ws("|", "source", "modality")
        refs = refs.withColumn("_task", F.concat_ws("|", kind, split_of(refs)))
        shares = {k: -(-n_parts // n) for k, n in refs.groupBy(kind).agg(F.countDistinct("_task")).collect()}
        if max(shares.values()) > 1:  # fewer splits than n_parts (a small table): tasks share a split's items
            share = F.create_map(*[F.lit(x) for kv in shares.items() for x in kv])[kind]
            refs = refs.withColumn("_task", F.concat_ws("#", "_task", F.pmod(F.hash("id"), share)))
        parts.append(one_partition_per_value(refs, "_task").drop("_task"))
    return reduce(DataFrame.unionByName, parts)


def task_items(batches: Iterator, cfg: FeaturesConf) -> Iterator[tuple[str, str, pd.DataFrame, list]]:
    """(source, modality, rows, encoder inputs) of a task's Arrow batches of `with_bytes` rows: texts and joined
    bytes as the batches arrive; items with (file, split) references once the task's input is in, their bytes
    streamed from their files STREAM_BATCHES model batches at a time (`media_files.read_items`; the held rows
    are ids and paths, not bytes)."""
    held = []
    for batch in batches:
        pdf = batch.to_pandas()
        refs = pdf["media_file"].notna() if "media_file" in pdf.columns else None
        if refs is not None and refs.any():
            held.append(pdf[refs])
            pdf = pdf[~refs]
        for (source, modality), part in pdf.groupby(["source", "modality"], sort=False):
            yield source, modality, part, part["text" if modality == "text" else "data"].tolist()
    if held:
        for (source, modality), part in pd.concat(held).groupby(["source", "modality"], sort=False):
            rows = STREAM_BATCHES * getattr(cfg, modality).batch_size
            data = MEDIA_COLUMNS[source, modality][0]
            for got, items in read_items(part, FEATURE_TABLES[source][1], data, rows):
                yield source, modality, got, items


def encoded_batch(source: str, modality: str, part: pd.DataFrame, vecs: list, errors: list, items: list):
    """One pyarrow RecordBatch of ENCODE_SCHEMA rows; the embeddings go in as one float32 buffer (no per-row
    conversion of arrays, which cost ~30 us a row through pandas)."""
    import pyarrow as pa

    ok = np.array([v is not None for v in vecs], bool)
    sizes = np.array([len(v) if v is not None else 0 for v in vecs], np.int32)
    flat = np.concatenate([v for v in vecs if v is not None]).astype(np.float32, copy=False) if ok.any() \
        else np.zeros(0, np.float32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(flat), mask=pa.array(~ok))
    n = len(part)
    return pa.RecordBatch.from_arrays([
        pa.array([source] * n, pa.string()), pa.array(part["id"].tolist(), pa.string()),
        pa.array([modality] * n, pa.string()), pa.array(part["content_hash"].tolist(), pa.string()), embedding,
        pa.array(errors, pa.string()),
        pa.array([None if e is None else _payload(x) for x, e in zip(items, errors)], pa.string())],
        names=ENCODE_COLUMNS)


def encode_batches(cfg: FeaturesConf) -> Callable[[Iterator], Iterator]:
    """The `mapInArrow` function: (source, id, modality, text, data, content_hash[, REF_COLUMNS]) ->
    ENCODE_SCHEMA rows (items with references are read from their files here, `task_items`).

    Runs in Spark Python workers: encoders come from the per-process cache (loaded once per worker).
    """
    def _run(batches: Iterator) -> Iterator:
        set_threads(task_threads(cfg.torch_threads))
        for source, modality, part, items in task_items(batches, cfg):
            vecs, errors = get_encoder(modality, cfg).encode_safe(items)
            yield encoded_batch(source, modality, part, vecs, errors, items)
    return _run


def encode_frame(df: DataFrame, cfg: FeaturesConf, n_partitions: int | None = None) -> DataFrame:
    """Encode (source, id, modality, text, data, content_hash) rows through mapInArrow (the Spark
    batch-inference path). With `n_partitions`, the rows are first spread over that many partitions, sorted by
    modality; without, they are encoded as partitioned (`with_bytes` delivers one modality per partition)."""
    if n_partitions is not None:
        df = df.repartition(max(1, n_partitions)).sortWithinPartitions("modality")
    return df.mapInArrow(encode_batches(cfg), ENCODE_SCHEMA)


def _payload(item: str | bytes | None) -> str:
    """The quarantine excerpt of a rejected item: its first characters, or its size for bytes."""
    if isinstance(item, (bytes, bytearray)):
        return f"<{len(item)} bytes>"
    return "" if item is None else str(item)[:PAYLOAD_CHARS]


def _lookup(mapping: dict[str, str]) -> Column:
    """Map the `modality` column through a small Python dict."""
    return F.create_map(*[F.lit(x) for kv in mapping.items() for x in kv])[F.col("modality")]


def _feature_rows(encoded: DataFrame, source: str, key: str, encoders: dict, run_date: dt.date) -> DataFrame:
    return encoded.where((F.col("source") == source) & F.col("error").isNull()).select(
        F.col("id").alias(key), "modality", "embedding", F.size("embedding").alias("dim"),
        _lookup({m: e.name for m, e in encoders.items()}).alias("encoder"),
        _lookup({m: e.version for m, e in encoders.items()}).alias("encoder_version"), "content_hash",
        F.lit(sql_date(run_date)).cast("date").alias("run_date"))


def _merge_features(lh: Lakehouse, source: str, encoded: DataFrame, cands: DataFrame, encoders: dict,
                    run_date: dt.date, counts: dict[str, int]) -> None:
    """One MERGE that moves only what changed: the new embeddings, plus the keys of rows to delete (their input
    disappeared, or changed without a new embedding). Skipped when there is neither."""
    table, key = FEATURE_TABLES[source]
    new = _feature_rows(encoded, source, key, encoders, run_date)
    current = cands.select(F.col("id").alias(key), "modality", "content_hash")
    stale = (lh.read(table).select(key, "modality", "content_hash")
             .join(current, [key, "modality", "content_hash"], "left_anti")
             .join(new.select(key, "modality"), [key, "modality"], "left_anti")
             .select(key, "modality")).cache()
    try:
        n_new = sum(v for k, v in counts.items() if k.startswith(f"encoded_{source}_"))
        n_stale = stale.count()
        counts[f"deleted_{source}"] = n_stale
        if n_new == 0 and n_stale == 0:
            return
        lh.merge(table, new, deletes=stale)
    finally:
        stale.unpersist()
    log.info("featurize %s: committed %s (%d new or changed, %d deleted)", run_date, table, n_new, n_stale)


@stage(STAGE, inputs=("products", "queries"), outputs=("product_features", "query_features", "quarantine"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Embed what changed since the last run; returns counts (encoded / unchanged per source and modality)."""
    cfg = lh.cfg.features
    encoders = {m: encoder_identity(m, cfg) for m in PRODUCT_MODALITIES}  # no model, no device on the driver
    versions = {m: e.version for m, e in encoders.items()}
    rec.model_version = ";".join(f"{m}={v}" for m, v in versions.items())
    rec.counts.update({f"{k}_{s}_{m}": 0 for k in ("attempted", "unchanged", "encoded")
                       for s, ms in MODALITIES.items() for m in ms})
    for table, _ in FEATURE_TABLES.values():  # tables from before the id buckets get them (before any read)
        lh.keep_layout(table)
    cands = {s: candidates(lh, s, versions) for s in FEATURE_TABLES}
    marked = None
    for s, (table, key) in FEATURE_TABLES.items():
        have = lh.read(table).select(F.col(key).alias("id"), "modality", "content_hash",
                                     F.lit(True).alias("_have"))
        m = cands[s].join(have, ["id", "modality", "content_hash"], "left")
        marked = m if marked is None else marked.unionByName(m)
    for (s, m, unchanged, n) in marked.groupBy(
            "source", "modality", F.col("_have").isNotNull()).count().collect():
        rec.counts[f"{'unchanged' if unchanged else 'attempted'}_{s}_{m}"] = n
    n_todo = sum(v for k, v in rec.counts.items() if k.startswith("attempted_"))
    min_batch = min(getattr(cfg, m).batch_size for m in versions)
    n_parts = max(1, min(lh.spark.sparkContext.defaultParallelism, -(-n_todo // min_batch)))
    todo = with_bytes(lh, marked.where(F.col("_have").isNull()).drop("_have"), rec.counts, n_parts)
    log.info("featurize %s: encoding %d new or changed items in %d partition(s) per modality", run_date, n_todo,
             n_parts)
    encoded = encode_frame(todo, cfg).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        for (s, m, ok, n) in encoded.groupBy("source", "modality", F.col("error").isNull()).count().collect():
            if ok:
                rec.counts[f"encoded_{s}_{m}"] = n
        for s, (table, key) in FEATURE_TABLES.items():
            _merge_features(lh, s, encoded, cands[s], encoders, run_date, rec.counts)
        bad = encoded.where(F.col("error").isNotNull())
        rec.counts["quarantined"] = lh.quarantine(bad.select(
            F.concat_ws(":", "source", "id", "modality").alias("record_id"),
            F.col("error").alias("reason"), "payload"), STAGE, run_date)
    finally:
        encoded.unpersist()
    rec.counts["encoded"] = sum(v for k, v in rec.counts.items() if k.startswith("encoded_"))
    rec.counts["unchanged"] = sum(v for k, v in rec.counts.items() if k.startswith("unchanged_"))
    log.info("featurize %s: %s", run_date, rec.counts)
    return None
