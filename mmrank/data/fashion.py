"""The real fashion catalog (`ingest.fashion_dir`: styles.csv + images/<id>.jpg) and its query protocol.

Protocol (deterministic, documented in docs/data.md): a query is a (gender, usage, colour, article type)
combination that at least `fashion_min_support` products have exactly, most frequent first
(ties by the words), `fashion_n_queries` of them; text "<gender> <usage> <colour> <article type>" lower-case.
Grade of a product: 0 if its article type differs; else with m = [colour equal] + [gender equal or product
Unisex] + [usage equal]: 3 if m = 3, 2 if m = 2, else 1. Candidates per query (`generator.candidates_per_query`
= C): the C/2 best same-type products, C/4 other same-type products, the rest other types (grade 0); within
each group ordered by sha256(query_id|product_id), so the choice is deterministic and unbiased.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from mmrank.data import ingest as I
from mmrank.data import validate as V
from mmrank.lakehouse import Lakehouse

STYLE_COLS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage",
              "productDisplayName")
ATTRS = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage", "colorgroup")
SOURCE = "fashion_protocol"


def fashion_dir(lh: Lakehouse) -> Path:
    return lh.cfg.resolve_path(lh.cfg.ingest.fashion_dir)


def fashion_catalog(lh: Lakehouse, root: Path, limit: int | None = None) -> DataFrame:
    """styles.csv as PRODUCT_RAW rows (ids `fashion-<id>`); `limit` keeps the lowest numeric ids."""
    styles = I.read_csv(lh.spark, str(root / "styles.csv"))
    missing = [c for c in STYLE_COLS if c not in styles.columns]
    if missing:
        raise ValueError(f"{root}/styles.csv lacks columns {missing}")
    if limit:
        styles = styles.orderBy(F.col("id").try_cast("long").asc_nulls_last(), "id").limit(limit)
    attrs = F.map_filter(F.create_map(*[x for a in ATTRS if a in styles.columns
                                        for x in (F.lit(a), F.trim(F.col(a)))]),
                         lambda k, v: v.isNotNull() & (v != ""))
    pid = F.trim("id")
    return styles.select(
        F.when(~V.blank(pid), F.concat(F.lit("fashion-"), pid)).alias("product_id"),
        F.col("productDisplayName").alias("title"), F.lit(None).cast("string").alias("description"),
        F.lit(None).cast("string").alias("brand"), F.trim("articleType").alias("category"), attrs.alias("attributes"),
        F.when(~V.blank(pid), F.concat(F.lit("images/"), pid, F.lit(".jpg"))).alias("image_path"),
        F.lit(None).cast("string").alias("audio_path"), F.lit(None).cast("string").alias("_corrupt"))


def _norm(attr: str):
    v = F.lower(F.trim(F.col("attributes")[attr]))
    return F.when(v != "", v)


def protocol(products: DataFrame, n_queries: int, min_support: int, c: int) -> tuple[DataFrame, DataFrame]:
    """(queries: query_id, query_text; judgments: query_id, product_id, grade) from valid fashion products."""
    p = products.select("product_id", _norm("gender").alias("g"), _norm("usage").alias("u"),
                        _norm("baseColour").alias("c"), _norm("articleType").alias("t")).cache()
    q = (p.dropna(subset=["g", "u", "c", "t"]).groupBy("g", "u", "c", "t").count()
         .where(F.col("count") >= min_support).orderBy(F.desc("count"), "t", "c", "g", "u").limit(n_queries))
    q = q.select(F.concat_ws(" ", "g", "u", "c", "t").alias("query_text"), *[F.col(x).alias("q" + x) for x in "guct"])
    q = q.withColumn("query_id", F.concat(F.lit("fq-"), F.substring(F.sha2("query_text", 256), 1, 12)))
    m = ((F.col("c") == F.col("qc")).cast("int") + ((F.col("g") == F.col("qg")) | (F.col("g") == "unisex")).cast("int")
         + (F.col("u") == F.col("qu")).cast("int"))
    m = F.coalesce(m, F.lit(0))
    same = F.coalesce(F.col("t") == F.col("qt"), F.lit(False))
    pairs = (q.crossJoin(p).select(
        "query_id", "product_id",
        F.when(same, 1 + (m >= 2).cast("int") + (m == 3).cast("int")).otherwise(0).cast("double").alias("grade"),
        F.sha2(F.concat_ws("|", "query_id", "product_id"), 256).alias("h")))
    pri = F.when(F.col("grade") == 0, 2).otherwise(1)
    r = F.row_number().over(Window.partitionBy("query_id", "pri").orderBy(F.desc("grade"), "h"))
    pairs = pairs.withColumn("pri", pri).withColumn("r", r)
    pairs = pairs.withColumn("pri", F.when((F.col("pri") == 1) & (F.col("r") <= c // 2), 0).otherwise(F.col("pri")))
    r2 = F.row_number().over(Window.partitionBy("query_id", "pri").orderBy("h"))
    keep = pairs.withColumn("r2", r2).where(((F.col("pri") == 0)) | ((F.col("pri") == 1) & (F.col("r2") <= c // 4))
                                             | (F.col("pri") == 2))
    n_rel = F.sum(F.when(F.col("pri") < 2, 1).otherwise(0)).over(Window.partitionBy("query_id"))
    judg = keep.withColumn("n_rel", n_rel).where((F.col("pri") < 2) | (F.col("r2") <= c - F.col("n_rel")))
    return q.select("query_id", "query_text"), judg.select("query_id", "product_id", "grade")


def ingest_fashion(lh: Lakehouse, run_date: dt.date, limit: int | None = None) -> dict[str, int]:
    """Fashion catalog -> products (source `fashion`), protocol queries and judgments (`fashion_protocol`)."""
    root = fashion_dir(lh)
    if not (root / "styles.csv").exists():
        raise FileNotFoundError(f"fashion catalog not found at {root} (set ingest.fashion_dir)")
    ic = lh.cfg.ingest
    prods = I.check_products(lh, fashion_catalog(lh, root, limit), str(root))
    counts = {"products_changed": I.land_products(lh, prods.valid, "fashion", run_date)}
    queries, judg = protocol(prods.valid, ic.fashion_n_queries, ic.fashion_min_support,
                             lh.cfg.generator.candidates_per_query)
    qrows = queries.select("query_id", "query_text", F.lit(None).cast("binary").alias("audio_bytes"),
                           F.lit("typed").alias("kind"))
    counts["queries_changed"] = I.land_queries(lh, qrows, SOURCE, run_date)
    counts["judgments_landed"] = I.land_judgments(lh, judg, SOURCE, run_date)
    counts.update(I.finish(lh, [prods], "ingest_fashion", run_date))
    return counts
