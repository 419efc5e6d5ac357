"""Lexical match features in Spark: field texts -> tokens -> BM25 corpus statistics -> per-pair features.

Tables (contracts in `mmrank/tables.py`, written by `mmrank/stages/lexical.py`):
- `lexical_tokens`: one row per (kind, id, field): products have `title`, `brand`, `category`,
  `description` (`FIELDS`, each when non-blank) and `all` (those plus attribute values, one text); queries
  have `query`. Tokens and number+unit tokens come from `mmrank.lexical.tokenize`.
- `lexical_stats`: document frequency of every term of the `all` and `title` fields over the catalog, with the
  field's document count and mean length (BM25's corpus statistics).

`pair_features(tokens, stats, pairs, k1, b)` gives every (query_id, product_id) pair its `lex` array (float,
`LEX_FEATURES` order) in Spark SQL only (explode / join / array functions): nothing is collected but the two
per-field constants (document count, mean length). A pair whose query or product has no tokens gets zeros
where a feature has nothing to match.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from mmrank.lexical import ALL, BM25_FIELDS, FIELDS, LEX_FEATURES, N_LEX, QUERY
from mmrank.lexical.tokenize import TOKENIZER_VERSION, tokenize

TOKENIZED_SCHEMA = ("kind string, id string, field string, tokens array<string>, units array<string>, "
                    "n_tokens int, content_hash string")
_EMPTY = "CAST(array() AS array<string>)"


def _nonblank(c: Column) -> Column:
    return F.nullif(F.trim(c), F.lit(""))


def field_texts(products: DataFrame, queries: DataFrame, stem: bool) -> DataFrame:
    """(kind, id, field, text, content_hash) for every non-blank product field, product `all` text and typed
    query text; the hash covers the tokenizer version and settings, so a change re-tokenizes everything."""
    attrs = F.array_join(F.coalesce(F.map_values("attributes"), F.expr(_EMPTY)), " | ")
    all_text = F.concat_ws(" | ", *[_nonblank(F.col(f)) for f in FIELDS], _nonblank(attrs))
    parts = [products.select(F.lit("product").alias("kind"), F.col("product_id").alias("id"),
                             F.lit(f).alias("field"), _nonblank(F.col(f)).alias("text"))
             for f in FIELDS]
    parts.append(products.select(F.lit("product").alias("kind"), F.col("product_id").alias("id"),
                                 F.lit(ALL).alias("field"), _nonblank(all_text).alias("text")))
    parts.append(queries.select(F.lit("query").alias("kind"), F.col("query_id").alias("id"),
                                F.lit(QUERY).alias("field"), _nonblank(F.col("query_text")).alias("text")))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    tag = f"{TOKENIZER_VERSION}|stem={stem}|"
    return out.where(F.col("text").isNotNull()).withColumn(
        "content_hash", F.sha2(F.concat(F.lit(tag), F.col("text")), 256))


def _tokenize_batches(stem: bool) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in frames:
            toks = [tokenize(t, stem) for t in pdf["text"]]
            yield pd.DataFrame({"kind": pdf["kind"], "id": pdf["id"], "field": pdf["field"],
                                "tokens": [t for t, _ in toks], "units": [u for _, u in toks],
                                "n_tokens": [len(t) for t, _ in toks], "content_hash": pdf["content_hash"]})
    return run


def tokenize_frame(texts: DataFrame, stem: bool) -> DataFrame:
    """`field_texts` rows -> TOKENIZED_SCHEMA rows (Python tokenizer in an iterator `mapInPandas`)."""
    return texts.mapInPandas(_tokenize_batches(stem), TOKENIZED_SCHEMA)


def corpus_stats(tokens: DataFrame) -> DataFrame:
    """(field, term, df, n_docs, avg_len) over the product documents of the BM25 fields."""
    docs = tokens.where((F.col("kind") == "product") & F.col("field").isin(*BM25_FIELDS))
    per_field = docs.groupBy("field").agg(F.count(F.lit(1)).alias("n_docs"),
                                          F.avg("n_tokens").cast("double").alias("avg_len"))
    terms = (docs.select("field", F.explode(F.array_distinct("tokens")).alias("term"))
             .groupBy("field", "term").agg(F.count(F.lit(1)).alias("df")))
    return terms.join(per_field, "field")


def _idf(n_docs: float) -> Column:
    """Lucene's BM25 idf, never negative: ln(1 + (N - df + 0.5) / (df + 0.5)); an unseen term has df 0."""
    df = F.coalesce(F.col("df"), F.lit(0)).cast("double")
    return F.log1p((F.lit(float(n_docs)) - df + 0.5) / (df + 0.5))


def _query_terms(queries: DataFrame, stats: DataFrame, field: str, n_docs: float) -> DataFrame:
    """query_id -> qt_<field>: array of (term, idf) of the query's distinct terms."""
    s = stats.where(F.col("field") == field).select("term", "df")
    return (queries.select("query_id", F.explode("q_tok").alias("term")).join(s, "term", "left")
            .groupBy("query_id").agg(F.collect_list(F.struct("term", _idf(n_docs).alias("idf")))
                                     .alias(f"qt_{field}")))


def _bm25(field: str, k1: float, b: float, avg_len: float) -> Column:
    toks = f"coalesce(t_{field}, {_EMPTY})"
    tf = f"size(filter({toks}, w -> w = x.term))"
    norm = f"{k1} * (1 - {b} + {b} * size({toks}) / {max(avg_len, 1e-9)})"
    return F.coalesce(F.expr(f"aggregate(qt_{field}, CAST(0 AS DOUBLE), "
                             f"(acc, x) -> acc + x.idf * {tf} * {k1 + 1} / ({tf} + {norm}))"), F.lit(0.0))


def _share(part: str, whole: str) -> Column:
    """size(part) / size(whole), 0 when whole is empty (both SQL array expressions)."""
    return F.expr(f"CASE WHEN size({whole}) > 0 THEN size({part}) / size({whole}) ELSE 0D END")


def _phrase(field: str) -> Column:
    return F.expr(f"size(q_tok) > 0 AND instr(concat(' ', array_join(coalesce(t_{field}, {_EMPTY}), ' '), ' '), "
                  f"concat(' ', q_norm, ' ')) > 0").cast("double")


def pair_features(tokens: DataFrame, stats: DataFrame, pairs: DataFrame, k1: float, b: float) -> DataFrame:
    """(query_id, product_id, lex array<float>) for the distinct (query_id, product_id) of `pairs`."""
    fields = (*FIELDS, ALL)
    prods = (tokens.where(F.col("kind") == "product").groupBy(F.col("id").alias("product_id")).agg(
        *[F.first(F.when(F.col("field") == f, F.col("tokens")), ignorenulls=True).alias(f"t_{f}") for f in fields],
        F.first(F.when(F.col("field") == ALL, F.array_distinct("units")), ignorenulls=True).alias("p_units")))
    queries = tokens.where((F.col("kind") == "query") & (F.col("field") == QUERY)).select(
        F.col("id").alias("query_id"), F.array_distinct("tokens").alias("q_tok"),
        F.array_distinct("units").alias("q_units"), F.array_join("tokens", " ").alias("q_norm"))
    consts = {r["field"]: (float(r["n"]), float(r["a"])) for r in
              stats.groupBy("field").agg(F.first("n_docs").alias("n"), F.first("avg_len").alias("a")).collect()}
    df = (pairs.select("query_id", "product_id").distinct()
          .join(queries, "query_id", "left").join(prods, "product_id", "left"))
    for f in BM25_FIELDS:
        n, _ = consts.get(f, (0.0, 1.0))
        df = df.join(_query_terms(queries, stats, f, n), "query_id", "left")
    df = df.withColumn("q_tok", F.coalesce("q_tok", F.expr(_EMPTY))).withColumn(
        "q_units", F.coalesce("q_units", F.expr(_EMPTY))).withColumn(
        "p_units", F.coalesce("p_units", F.expr(_EMPTY)))
    d = {f: f"array_distinct(coalesce(t_{f}, {_EMPTY}))" for f in fields}
    feats = {
        **{f"bm25_{f}": _bm25(f, k1, b, consts.get(f, (0.0, 1.0))[1]) for f in BM25_FIELDS},
        **{f"cover_{f}": _share(f"array_intersect(q_tok, {d[f]})", "q_tok") for f in (ALL, *FIELDS)},
        "title_precision": _share(f"array_intersect({d['title']}, q_tok)", d["title"]),
        "phrase_title": _phrase("title"), "phrase_all": _phrase(ALL),
        "unit_cover": _share("array_intersect(q_units, p_units)", "q_units"),
        "unit_conflict": F.expr("size(q_units) > 0 AND size(p_units) > 0 AND "
                                "size(array_intersect(q_units, p_units)) = 0").cast("double"),
        "brand_in_query": F.expr(f"size({d['brand']}) > 0 AND size(array_except({d['brand']}, q_tok)) = 0")
                           .cast("double"),
        "category_in_query": _share(f"array_intersect({d['category']}, q_tok)", d["category"]),
        "query_terms": F.size("q_tok").cast("double"),
    }
    return df.select("query_id", "product_id",
                     F.array(*[feats[n].cast("float") for n in LEX_FEATURES]).alias("lex"))


def zeros_lex() -> Column:
    """A `lex` array of zeros (pairs without lexical features, lakehouses without the lexical tables)."""
    return F.array_repeat(F.lit(0.0).cast("float"), N_LEX)


def lexical_pair_features(lh, pairs: DataFrame) -> DataFrame | None:
    """`pair_features` of `pairs` from the lakehouse's `lexical_tokens` / `lexical_stats` (config `lexical`),
    or None when the lexical stage never ran there (callers then use `zeros_lex`)."""
    if not (lh.exists("lexical_tokens") and lh.exists("lexical_stats")):
        return None
    c = lh.cfg.lexical
    return pair_features(lh.read("lexical_tokens"), lh.read("lexical_stats"), pairs, c.bm25_k1, c.bm25_b)


def with_lex(lh, df: DataFrame, name: str = "lex") -> DataFrame:
    """`df` (with query_id, product_id) plus a `name` column: its pairs' lexical features, zeros when missing."""
    lex = lexical_pair_features(lh, df)
    if lex is None:
        return df.withColumn(name, zeros_lex())
    return (df.join(lex.withColumnRenamed("lex", name), ["query_id", "product_id"], "left")
            .withColumn(name, F.coalesce(F.col(name), zeros_lex())))
