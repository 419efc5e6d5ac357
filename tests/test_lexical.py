"""Lexical match features: tokenizer (scripts, units, stems), the `lexical` stage on real Delta tables (BM25
statistics, incremental re-runs) and the per-pair features in Spark against a direct computation."""
from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from pyspark.sql import functions as F

from mmrank.lexical import LEX_FEATURES
from mmrank.lexical.features import with_lex
from mmrank.lexical.tokenize import tokenize
from mmrank.stages import lexical

D1, D2 = dt.date(2026, 11, 21), dt.date(2026, 11, 22)

PRODUCTS = [  # product_id, title, brand, category, description
    ("p1", "Simpson Strong-Tie 12-Gauge Angle Brackets", "Simpson", "Hardware", None),
    ("p2", "Copper Pipe 3/4 in. x 10 ft.", None, "Plumbing", "Type M copper pipe"),
    ("p3", "PVC Pipe 1/2 in. x 10 ft.", None, "Plumbing", None),
    ("p4", "電動ドリル 18V コードレス", "マキタ", "工具", None),
    ("p5", "Дрель аккумуляторная 18 В", None, "Инструменты", None),
]
QUERIES = [("q1", "angle bracket"), ("q2", "3/4\" copper pipe"), ("q3", "電動ドリル"), ("q4", "дрель"),
           ("q5", "simpson angle brackets")]


def _write(lh, products=PRODUCTS, queries=QUERIES, run_date=D1):
    p = lh.spark.createDataFrame(products, "product_id string, title string, brand string, category string, "
                                           "description string")
    lh.overwrite("products", p.select(
        "*", F.lit(None).cast("map<string,string>").alias("attributes"),
        *[F.lit(None).cast(t).alias(c) for c, t in (("image_uri", "string"), ("image_bytes", "binary"),
                                                     ("image_hash", "string"), ("audio_uri", "string"),
                                                     ("audio_bytes", "binary"), ("audio_hash", "string"))],
        F.lit("test").alias("source"), F.sha2(F.concat_ws("|", "title", "brand"), 256).alias("content_hash"),
        F.lit(run_date).alias("run_date"), F.current_timestamp().alias("ingested_at")))
    q = lh.spark.createDataFrame(queries, "query_id string, query_text string")
    lh.overwrite("queries", q.select("*", F.lit(None).cast("binary").alias("query_audio"),
                                     F.lit(None).cast("string").alias("audio_hash"), F.lit("typed").alias("kind"),
                                     F.lit("test").alias("source"), F.sha2("query_text", 256).alias("content_hash"),
                                     F.lit(run_date).alias("run_date")))


def test_tokenizer_scripts_units_and_stems():
    assert tokenize("Simpson Strong-Tie 12-Gauge Angle Brackets") == (
        ["simpson", "strong", "tie", "12", "gauge", "angle", "bracket"], ["12gauge"])
    # the same size written three ways is one unit token; fractions and decimals survive
    assert tokenize('3/4" pipe')[1] == tokenize("3/4 in. pipe")[1] == tokenize("3/4-inch pipes")[1] == ["3/4in"]
    assert tokenize("5 ft. x 32.75 in. tub")[1] == ["5ft", "32.75in"]
    assert tokenize("batteries boxes glass")[0] == ["battery", "box", "glass"]
    # scripts without spaces become character bigrams; full-width forms and case fold to one form
    assert tokenize("電動ドリル")[0] == ["電動", "動ド", "ドリ", "リル"]
    assert tokenize("ＤＲＩＬＬ Дрель")[0] == ["drill", "дрель"]
    assert tokenize("สว่าน")[0] == ["สว", "ว่", "่า", "าน"]           # Thai keeps its combining marks
    assert tokenize("مثقاب كهربائي")[0] == ["مثقاب", "كهربائي"]
    assert tokenize(None) == tokenize("  ") == ([], [])


def _bm25_direct(q_toks, docs, k1=1.2, b=0.75):
    """BM25 (Lucene idf) of every doc for a query, computed directly from token lists."""
    n, avg = len(docs), sum(len(d) for d in docs.values()) / len(docs)
    out = {}
    for pid, d in docs.items():
        s = 0.0
        for t in set(q_toks):
            df = sum(t in dd for dd in docs.values())
            tf = d.count(t)
            s += math.log1p((n - df + 0.5) / (df + 0.5)) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avg))
        out[pid] = s
    return out


def test_stage_features_match_direct_computation_and_rerun_is_incremental(lh):
    _write(lh)
    c = lexical.run(lh, D1)
    assert c["tokenized_product"] == 5 + 5 + 4 + 3 + 1 and c["tokenized_query"] == 5 and c["deleted"] == 0
    pairs = lh.spark.createDataFrame([(q, p) for q, _ in QUERIES for p, *_ in PRODUCTS], "query_id string, "
                                                                                         "product_id string")
    got = {(r["query_id"], r["product_id"]): np.array(r["lex"]) for r in with_lex(lh, pairs).collect()}
    f = {n: i for i, n in enumerate(LEX_FEATURES)}
    # BM25 over the title field equals the direct formula on the stored tokens
    titles = {p: tokenize(t)[0] for p, t, *_ in PRODUCTS}
    for qid, text in QUERIES:
        want = _bm25_direct(tokenize(text)[0], titles)
        for pid in titles:
            assert got[(qid, pid)][f["bm25_title"]] == pytest.approx(want[pid], rel=1e-5), (qid, pid)
    assert got[("q1", "p1")][f["phrase_title"]] == 1 and got[("q1", "p1")][f["cover_all"]] == 1
    assert got[("q5", "p1")][f["brand_in_query"]] == 1 and got[("q1", "p1")][f["brand_in_query"]] == 0
    assert got[("q2", "p2")][f["unit_cover"]] == 1 and got[("q2", "p3")][f["unit_conflict"]] == 1
    assert got[("q2", "p3")][f["cover_all"]] == pytest.approx(1 / 3)       # 'pipe' of copper, pipe, 3/4
    assert got[("q3", "p4")][f["bm25_all"]] > 0 and got[("q3", "p5")][f["bm25_all"]] == 0
    assert got[("q4", "p5")][f["cover_title"]] == 1 and got[("q4", "p4")][f["cover_title"]] == 0
    assert got[("q1", "p2")][f["cover_all"]] == 0 and got[("q1", "p2")][f["query_terms"]] == 2
    # an unknown query or product gets zeros where there is nothing to match, never a dropped pair
    odd = with_lex(lh, lh.spark.createDataFrame([("nope", "p1"), ("q1", "nope")], "query_id string, product_id string"))
    assert odd.count() == 2 and all(sum(r["lex"]) == 0 or r["query_id"] == "q1" for r in odd.collect())

    # re-run: nothing tokenized, tables unchanged; one changed title re-tokenizes that product's title + all
    before = {t: lh.checksum(t) for t in ("lexical_tokens", "lexical_stats")}
    again = lexical.run(lh, D1)
    assert again["tokenized_product"] == again["tokenized_query"] == again["deleted"] == 0
    assert {t: lh.checksum(t) for t in before} == before
    changed = [("p1", "Simpson Strong-Tie Corner Bracket", "Simpson", "Hardware", None), *PRODUCTS[1:4]]
    c3 = lexical.run(lh, D2) if _write(lh, changed, QUERIES, D2) is None else None
    assert c3["tokenized_product"] == 2 and c3["tokenized_query"] == 0    # p1: title + all re-tokenized
    assert c3["deleted"] == 3 and c3["unchanged"] == again["unchanged"] - 2 - 3   # gone: p5 title, category, all
    toks = lh.read("lexical_tokens")
    assert toks.where("id = 'p5'").count() == 0
    assert toks.where("id = 'p1' AND field = 'title'").first()["tokens"] == ["simpson", "strong", "tie", "corner",
                                                                            "bracket"]
    stats = {r["term"]: r for r in lh.read("lexical_stats").where("field = 'title'").collect()}
    assert stats["pipe"]["df"] == 2 and stats["pipe"]["n_docs"] == 4 and "дрель" not in stats
