"""Bring your own data: a user's catalog file and optional judgments file (CSV or Parquet, see docs/data.md)
-> `products`, `queries`, `judgments` (source `byo:<name>`), validated like every source."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from mmrank.data import ingest as I
from mmrank.data import validate as V
from mmrank.lakehouse import Lakehouse

log = logging.getLogger("mmrank.ingest")

CATALOG_COLS = ("product_id", "title", "description", "brand", "category", "image_path", "audio_path")


def _require(df: DataFrame, what: str, *cols: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} file lacks required column(s) {missing}; has {df.columns} (see docs/data.md)")


def byo_catalog(spark: SparkSession, path: str) -> DataFrame:
    """A user catalog as PRODUCT_RAW rows; columns beyond CATALOG_COLS go into `attributes`."""
    df = I.read_table_file(spark, path)
    _require(df, "catalog", "product_id", "title")
    extras = [c for c in df.columns if c not in CATALOG_COLS]
    attrs = (F.map_filter(F.create_map(*[x for c in extras for x in (F.lit(c), F.col(c))]),
                          lambda k, v: v.isNotNull()) if extras else F.lit(None).cast("map<string,string>"))
    return df.select(*[F.col(c) if c in df.columns else F.lit(None).cast("string").alias(c) for c in CATALOG_COLS],
                     attrs.alias("attributes"), F.lit(None).cast("string").alias("_corrupt"))


def byo_grade(df: DataFrame, scale: tuple[float, float] | None = None) -> tuple[Column, str]:
    """(grade column mapped onto [0, 3], the mapping in words). The file's scale [lowest, highest] is said by
    `scale` (lowest = irrelevant -> 0, highest -> 3, linear in between: a 1-3 file maps 1 to 0, 2 to 1.5); without
    it the file's own [min, max] is taken, with a warning, since a guessed scale can make irrelevant items count
    as relevant. Grades outside the said scale are quarantined (`grade_out_of_range`)."""
    g = F.col("grade").try_cast("double")
    if scale is None:
        lo, hi = df.select(F.min(g), F.max(g)).first()
        if lo is None:
            return g, "no numeric grades"
        log.warning("BYO judgments: no grade scale given (ingest.grade_scale / --grade-scale); using the file's own "
                    "range [%g, %g], so %g counts as irrelevant and %g as the top grade", lo, hi, lo, hi)
        if hi <= lo:
            return F.when(g.isNotNull(), F.lit(3.0)), f"file range [{lo:g}, {hi:g}] (one value, guessed): all -> 3"
        how = f"file range [{lo:g}, {hi:g}] (guessed, no scale given)"
    else:
        (lo, hi), how = scale, f"scale [{scale[0]:g}, {scale[1]:g}] (given)"
    k = 3.0 / (hi - lo)
    mapped = F.when((g < lo) | (g > hi), F.lit(-1.0)).otherwise((g - lo) * k)  # -1: quarantined as out of range
    return mapped, f"grade scale {how} -> [0, 3]: grade' = (grade - {lo:g}) * {k:g}"


def ingest_byo(lh: Lakehouse, run_date: dt.date, catalog: str, judgments: str | None = None,
               name: str | None = None, grade_scale: tuple[float, float] | None = None) -> dict:
    """A user's catalog (CSV/Parquet) and optional judgments file -> products, queries, judgments.

    `grade_scale` (default `ingest.grade_scale`): the judgments file's [lowest, highest] grade (see `byo_grade`);
    the mapping applied is returned as `grade_mapping` (recorded in the ingest run's message)."""
    name = V.safe_name(name or Path(catalog).stem)
    source, spark = f"byo:{name}", lh.spark
    prods = I.check_products(lh, byo_catalog(spark, catalog), str(Path(catalog).resolve().parent))
    counts = {"products_changed": I.land_products(lh, prods.valid, source, run_date)}
    checks = [prods]
    if judgments:
        j = I.read_table_file(spark, judgments)
        _require(j, "judgments", "product_id", "grade")
        if "query_id" not in j.columns and "query" not in j.columns:
            raise ValueError("judgments file needs a `query_id` or a `query` (text) column")
        if "query" not in j.columns:
            j = j.withColumn("query", F.lit(None).cast("string"))
        if "query_id" not in j.columns:
            qid = F.concat(F.lit(f"byo-{name}-"), F.substring(F.sha2(F.lower(F.trim("query")), 256), 1, 12))
            j = j.withColumn("query_id", F.when(~V.blank("query"), qid))
        qraw = (j.where(~V.blank("query")).select("query_id", F.trim("query").alias("query_text")).distinct()
                .select("query_id", F.lit("typed").alias("kind"), "query_text",
                        F.lit(None).cast("string").alias("audio_path"), F.lit(None).cast("string").alias("_corrupt")))
        queries = I.check_queries(lh, qraw, ".")
        counts["queries_changed"] = I.land_queries(lh, queries.valid, source, run_date)
        grade, mapping = byo_grade(j, grade_scale or lh.cfg.ingest.grade_scale)
        log.info("BYO %s judgments: %s", name, mapping)
        counts["grade_mapping"] = mapping
        judg = I.check_judgments(lh, j.select("query_id", "product_id", "grade"), grade)
        counts["judgments_landed"] = I.land_judgments(lh, judg.valid, source, run_date)
        checks += [queries, judg]
    counts.update(I.finish(lh, checks, "ingest_byo", run_date))
    return counts
