"""Ingestion toolkit shared by every source: readers, row checks, media attachment and the landing writes of
`products`, `queries`, `query_log` and `judgments`.

Sources (`sample.py`, `fashion.py`, `byo.py`; the `ingest` stage picks one) read their files into the raw
shapes below and call these. Every row is validated (validate.py); rejected rows go to `quarantine` (stage
`ingest_<source>`) with a reason and never stop the run. Writes are idempotent: products/queries MERGE on
their key with `content_hash` (changed rows only), judgments MERGE, query_log replaces exactly the log days it
carries.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from mmrank.data import validate as V
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.storage import spark_uri


PRODUCT_RAW = ("product_id string, title string, description string, brand string, category string, "
               "attributes map<string,string>, image_path string, audio_path string, _corrupt string")
QUERY_RAW = "query_id string, kind string, query_text string, audio_path string, _corrupt string"
LOG_RAW = ("event_id string, session_id string, query_id string, product_id string, position string, "
           "clicked string, added_to_cart string, purchased string, event_ts string, _corrupt string")
JUDGMENT_RAW = "query_id string, product_id string, grade string, _corrupt string"
_SEP, _NULL = "\u241f", "\u2400"


@dataclass
class Checked:
    """One table's rows after validation: `rows` (cached, with a `reason` column) split into valid/bad."""

    table: str
    rows: DataFrame
    keys: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def valid(self) -> DataFrame:
        return self.rows.where(F.col("reason").isNull()).drop("reason")

    @property
    def bad(self) -> DataFrame:
        return V.quarantine_rows(self.rows, self.table, self.keys)

    def count(self) -> "Checked":
        total, bad = self.rows.agg(F.count(F.lit(1)), F.count("reason")).first()
        self.counts = {f"{self.table}_read": total, f"{self.table}_valid": total - bad,
                       f"{self.table}_quarantined": bad}
        return self


def _check(table: str, df: DataFrame, rules: list, keys: list[str],
           typed: dict[str, Column] | None = None) -> Checked:
    """Reason per row (first broken rule, then duplicate keys) computed on the raw values; then `typed`
    expressions replace their raw columns and helper columns are dropped. The result is cached."""
    out = V.with_duplicates(df.withColumn("reason", V.first_reason(rules)), keys).withColumns(typed or {})
    out = out.drop(*[c for c in out.columns if c.startswith("_known_")])
    return Checked(table, out.cache(), keys).count()


# ---- readers ----------------------------------------------------------------------------------------------
def read_json(spark: SparkSession, path: str, ddl: str) -> DataFrame:
    return (spark.read.schema(ddl).option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", "_corrupt").json(path))


def read_csv(spark: SparkSession, path: str, ddl: str | None = None) -> DataFrame:
    r = spark.read.option("header", True).option("multiLine", True).option("escape", '"')
    if ddl:
        r = r.schema(ddl).option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt")
    return r.csv(path)


def read_table_file(spark: SparkSession, path: str) -> DataFrame:
    """A user file: Parquet by extension, else CSV with a header; all columns as strings."""
    df = spark.read.parquet(path) if path.lower().endswith((".parquet", ".pq")) else read_csv(spark, path)
    return df.select([F.col(c).cast("string").alias(c.strip().lower()) for c in df.columns])


def to_uri(path: Column, base: str) -> Column:
    """Absolute URI of a file reference: kept if it has a scheme, `file:` + path if absolute, else under base."""
    base_uri = spark_uri(base)  # the form binaryFile reports (`file:/abs`, no percent-encoding; URIs kept)
    p = F.trim(path)
    return (F.when(V.blank(p), F.lit(None).cast("string"))
            .when(p.rlike(r"^[A-Za-z][A-Za-z0-9+.-]*:"), p)
            .when(p.startswith("/"), F.concat(F.lit("file:"), p))
            .otherwise(F.concat(F.lit(base_uri.rstrip("/") + "/"), F.regexp_replace(p, r"^\./", ""))))


def read_uri(uri: str, limit: int) -> bytes | None:
    """The first `limit` bytes of the file at `uri` (None when it does not exist): `file:` paths directly,
    `dbfs:/` through the /dbfs mount, other schemes (s3, gs, abfss, hdfs) through `pyarrow.fs`."""
    if uri.startswith(("file:", "dbfs:/")):
        path = uri[5:] if uri.startswith("file:") else "/dbfs/" + uri[len("dbfs:/"):].lstrip("/")
        try:
            with open(path, "rb") as f:
                return f.read(limit)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as f:
        return f.read(limit)


def read_media(uris: DataFrame, max_bytes: int) -> DataFrame:
    """`uri, content` for a DataFrame of distinct `uri`s, read inside Spark tasks (`mapInArrow`): the driver
    never lists or holds the file names. A missing file has null content; a file over `max_bytes` is read
    only up to max_bytes + 1 bytes (enough for the size check to reject it)."""
    def run(batches):
        import pyarrow as pa

        for b in batches:
            names = b.column("uri").to_pylist()
            yield pa.RecordBatch.from_arrays(
                [pa.array(names, pa.string()), pa.array([read_uri(u, max_bytes + 1) for u in names], pa.binary())],
                names=["uri", "content"])
    return uris.mapInArrow(run, "uri string, content binary")


def attach_media(lh: Lakehouse, df: DataFrame, kinds: list[str]) -> DataFrame:
    """Join `<kind>_bytes` for each `<kind>_uri` column and decode-check them (`<kind>_error`). The media side is
    joined by shuffle, never broadcast: the planner sizes it from the (small) URI list, not from the bytes."""
    ic = lh.cfg.ingest
    for k in kinds:
        uris = df.select(F.col(f"{k}_uri").alias("uri")).where(F.col("uri").isNotNull()).distinct()
        files = read_media(uris, ic.max_file_bytes).hint("merge")
        df = df.join(files.withColumnRenamed("uri", f"{k}_uri").withColumnRenamed("content", f"{k}_bytes"),
                     f"{k}_uri", "left")
    return V.check_media(df, kinds, ic.max_file_bytes)


def content_hash(*cols: Column) -> Column:
    """sha256 over the content fields (binary as its own sha256, maps with sorted keys, null marked)."""
    return F.sha2(F.concat_ws(_SEP, *[F.coalesce(c, F.lit(_NULL)) for c in cols]), 256)


def _bin_hash(c: str) -> Column:
    return F.sha2(F.col(c), 256)


def _map_json(c: str) -> Column:
    return F.to_json(F.array_sort(F.map_entries(F.col(c))))


# ---- tables -----------------------------------------------------------------------------------------------
def check_products(lh: Lakehouse, raw: DataFrame, base_dir: str) -> Checked:
    """Validate catalog rows (PRODUCT_RAW columns) and attach/verify their image and audio bytes."""
    df = (raw.withColumn("image_uri", to_uri(F.col("image_path"), base_dir))
          .withColumn("audio_uri", to_uri(F.col("audio_path"), base_dir)).drop("image_path", "audio_path"))
    df = attach_media(lh, df, ["image", "audio"])
    content = ~V.blank("title") | ~V.blank("description") | F.col("image_bytes").isNotNull() \
        | F.col("audio_bytes").isNotNull()
    rules = ([("malformed_record", F.col("_corrupt").isNotNull())] + V.id_rules("product_id")
             + V.text_rules(["title", "description", "brand", "category"], lh.cfg.ingest.max_text_chars)
             + V.media_rules("image") + V.media_rules("audio") + [("empty_content", ~content)])
    return _check("products", df, rules, ["product_id"])


def land_products(lh: Lakehouse, valid: DataFrame, source: str, run_date: dt.date) -> int:
    """MERGE changed products (new or different content_hash); returns how many rows changed."""
    rows = valid.select(
        "product_id", "title", "description", "brand", "category", "attributes", "image_uri", "image_bytes",
        _bin_hash("image_bytes").alias("image_hash"), "audio_uri", "audio_bytes",
        _bin_hash("audio_bytes").alias("audio_hash"), F.lit(source).alias("source"),
        F.lit(sql_date(run_date)).cast("date").alias("run_date"), F.current_timestamp().alias("ingested_at"))
    rows = rows.withColumn("content_hash", content_hash(
        F.col("title"), F.col("description"), F.col("brand"), F.col("category"), _map_json("attributes"),
        F.col("image_hash"), F.col("audio_hash")))
    return _merge_changed(lh, "products", rows, ["product_id"])


def _merge_changed(lh: Lakehouse, table: str, rows: DataFrame, keys: list[str]) -> int:
    """MERGE only rows that are new or whose content_hash changed, so a re-run commits nothing."""
    cur = lh.read(table).select(*keys, "content_hash")
    changed = rows.join(cur, keys + ["content_hash"], "left_anti").cache()
    n = changed.count()
    if n:
        lh.merge(table, changed)
    changed.unpersist()
    return n


def check_queries(lh: Lakehouse, raw: DataFrame, base_dir: str) -> Checked:
    df = raw.withColumn("audio_uri", to_uri(F.col("audio_path"), base_dir)).drop("audio_path")
    df = attach_media(lh, df, ["audio"])
    kind = F.lower(F.trim("kind"))
    rules = ([("malformed_record", F.col("_corrupt").isNotNull())] + V.id_rules("query_id")
             + [("bad_kind", ~kind.isin("typed", "voice") | kind.isNull())]
             + V.text_rules(["query_text"], lh.cfg.ingest.max_text_chars)
             + [("empty_text", (kind == "typed") & V.blank("query_text")),
                ("voice_without_audio", (kind == "voice") & F.col("audio_uri").isNull())]
             + V.media_rules("audio"))
    return _check("queries", df.withColumn("kind", kind), rules, ["query_id"])


def land_queries(lh: Lakehouse, valid: DataFrame, source: str, run_date: dt.date) -> int:
    rows = valid.select(
        "query_id", F.trim("query_text").alias("query_text"), F.col("audio_bytes").alias("query_audio"),
        _bin_hash("audio_bytes").alias("audio_hash"), "kind", F.lit(source).alias("source"),
        content_hash(F.col("kind"), F.trim("query_text"), _bin_hash("audio_bytes")).alias("content_hash"),
        F.lit(sql_date(run_date)).cast("date").alias("run_date"))
    return _merge_changed(lh, "queries", rows, ["query_id"])


def _known(df: DataFrame, lh: Lakehouse, table: str, col: str) -> DataFrame:
    """`_known_<col>` = true where `col` names a row of `table` (a plain join: Spark broadcasts the ids only when
    they are small, `spark.sql.autoBroadcastJoinThreshold`)."""
    ids = lh.read(table).select(F.col(col).alias(f"_{col}"), F.lit(True).alias(f"_known_{col}"))
    return df.join(ids, df[col] == ids[f"_{col}"], "left").drop(f"_{col}")


def check_log(lh: Lakehouse, raw: DataFrame, run_date: dt.date) -> Checked:
    """Typed events; wrong types, future timestamps and unknown query/product ids are quarantined."""
    typed = {"position": F.col("position").try_cast("int"), "clicked": F.col("clicked").try_cast("boolean"),
             "added_to_cart": F.col("added_to_cart").try_cast("boolean"),
             "purchased": F.col("purchased").try_cast("boolean"), "event_ts": F.col("event_ts").try_cast("timestamp")}
    end = F.lit(f"{sql_date(run_date + dt.timedelta(days=1))} 00:00:00").cast("timestamp")
    df = _known(_known(raw, lh, "products", "product_id"), lh, "queries", "query_id")
    rules = ([("malformed_record", F.col("_corrupt").isNotNull())] + V.id_rules("event_id")
             + [("null_id:query_id", V.blank("query_id")), ("null_id:product_id", V.blank("product_id")),
                ("null_value:position", V.blank("position")), ("null_value:event_ts", V.blank("event_ts"))]
             + V.type_rules(typed) + [("bad_value:position", typed["position"] < 1),
                                      ("future_timestamp", typed["event_ts"] >= end),
                                      ("unknown_product_id", F.col("_known_product_id").isNull()),
                                      ("unknown_query_id", F.col("_known_query_id").isNull())])
    return _check("query_log", df, rules, ["event_id"], typed)


def land_log(lh: Lakehouse, valid: DataFrame) -> int:
    """Replace exactly the log days present in `valid` (one replaceWhere commit)."""
    rows = valid.withColumn("run_date", F.to_date("event_ts")).drop("_corrupt", "reason")
    days = sorted(r[0] for r in rows.select("run_date").distinct().collect())
    if not days:
        return 0
    lh.replace("query_log", rows.select(*lh.read("query_log").columns),
               "run_date IN (" + ", ".join(f"DATE'{sql_date(d)}'" for d in days) + ")")
    return len(days)


def check_judgments(lh: Lakehouse, raw: DataFrame, grade: Column | None = None) -> Checked:
    """Judgments with a numeric grade in [0, 3] for known queries and products (`grade` may be rescaled)."""
    g = grade if grade is not None else F.col("grade").try_cast("double")
    df = _known(_known(raw, lh, "products", "product_id"), lh, "queries", "query_id")
    rules = ([("malformed_record", F.col("_corrupt").isNotNull()) if "_corrupt" in raw.columns else
              ("malformed_record", F.lit(False))]
             + [("null_id:query_id", V.blank("query_id")), ("null_id:product_id", V.blank("product_id")),
                ("null_value:grade", V.blank("grade")), ("bad_type:grade", g.isNull()),
                ("grade_out_of_range", (g < 0) | (g > 3)),
                ("unknown_product_id", F.col("_known_product_id").isNull()),
                ("unknown_query_id", F.col("_known_query_id").isNull())])
    return _check("judgments", df, rules, ["query_id", "product_id"], {"grade": g})


def land_judgments(lh: Lakehouse, valid: DataFrame, source: str, run_date: dt.date) -> int:
    """MERGE judgments of one source; returns how many that source now has."""
    rows = valid.select("query_id", "product_id", "grade", F.lit(source).alias("source"),
                        F.lit(sql_date(run_date)).cast("date").alias("run_date"))
    lh.merge("judgments", rows)
    return lh.read("judgments").where(F.col("source") == source).count()


# ---- shared by every source -------------------------------------------------------------------------------
def finish(lh: Lakehouse, checks: list[Checked], stage: str, run_date: dt.date) -> dict[str, int]:
    """Counts of every check, the rejected rows of all of them quarantined under `stage`; caches released."""
    counts: dict[str, int] = {}
    for c in checks:
        counts.update(c.counts)
    bad = reduce(DataFrame.unionByName, [c.bad for c in checks])
    counts["quarantined"] = lh.quarantine(bad, stage, run_date)
    for c in checks:
        c.rows.unpersist()
    return counts
