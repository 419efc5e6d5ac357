"""`ingest.source: delta` (issue 13, item 5): upstream Delta tables whose columns have other names drive the
nightly. The mapped ingest lands exactly what the file source lands from the same data, quarantines bad
upstream rows with reasons, re-runs change nothing (content hashes) and a new day of events replaces only
that day of `query_log`."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from mmrank import nightly
from mmrank.config import ConfigError
from mmrank.data.landing import sample_layout, write_sample
from mmrank.lakehouse import Lakehouse
from mmrank.stages import generate, ingest
from tests.conftest import make_config

D = dt.date(2026, 11, 21)
CATALOG_MAP = {"product_id": "sku", "title": "name", "description": "long_text", "attributes": "props",
               "image_path": "picture"}
EVENTS_MAP = {"event_id": "id", "query_id": "search_id", "product_id": "sku", "position": "rank",
              "added_to_cart": "carted", "event_ts": "ts"}
QUERIES_MAP = {"query_id": "search_id", "query_text": "text", "audio_path": "voice_clip"}
JUDGMENTS_MAP = {"query_id": "search_id", "product_id": "sku", "grade": "label"}
PRODUCTS_DDL = ("product_id string, title string, description string, brand string, category string, "
                "attributes map<string,string>, image_path string, audio_path string")
LOG_DDL = ("event_id string, session_id string, query_id string, product_id string, position int, "
           "clicked boolean, added_to_cart boolean, purchased boolean, event_ts timestamp")


def _rename(df, mapping):
    return df.select([F.col(c).alias(mapping.get(c, c)) for c in df.columns])


def _flat(prefix: str, table: str, mapping: dict) -> list[str]:
    return [f"ingest.delta.{prefix}.table={table}"] + [f"ingest.delta.{prefix}.columns.{k}={v}"
                                                        for k, v in mapping.items()]


def _events_of_day(lay, spark, day: dt.date):
    src = spark.read.option("header", True).schema(LOG_DDL).csv(str(lay.log_dir / "*.csv"))
    shift = (day - D).days
    if not shift:
        return src
    return src.withColumn("event_ts", F.col("event_ts") + F.expr(f"INTERVAL {shift} DAYS")).withColumn(
        "event_id", F.concat(F.col("event_id"), F.lit(f"-d{shift}")))


@pytest.fixture(scope="module")
def upstream(spark, tmp_path_factory):
    """The generated sample written as upstream Delta tables with other column names, plus bad rows."""
    base = tmp_path_factory.mktemp("upstream")
    ref = Lakehouse(spark, make_config(base / "ref", "generator.n_products=40", "generator.n_queries=8"))
    lay = sample_layout(ref.paths.landing)
    write_sample(ref.cfg.generator, D, lay.root)
    ingest.run(ref, D)                                    # the file source: the reference
    up = base / "up"
    prods = spark.read.schema(PRODUCTS_DDL).json(str(lay.products))
    bad_prod = spark.createDataFrame([(None, "no id")], "product_id string, title string")
    _rename(prods.unionByName(bad_prod, allowMissingColumns=True), CATALOG_MAP).write.format("delta").save(
        str(up / "catalog"))
    events = _events_of_day(lay, spark, D)
    bad_event = events.limit(1).withColumn("event_id", F.lit("e_bad")).withColumn("position", F.lit(-3))
    _rename(events.unionByName(bad_event), EVENTS_MAP).write.format("delta").save(str(up / "events"))
    _rename(spark.read.json(str(lay.queries)), QUERIES_MAP).write.format("delta").save(str(up / "queries"))
    judg = spark.read.option("header", True).csv(str(lay.truth)).withColumn("grade", F.col("grade").cast("int"))
    bad_j = judg.limit(1).withColumn("product_id", F.lit("p_unknown"))
    _rename(judg.unionByName(bad_j), JUDGMENTS_MAP).write.format(
        "delta").save(str(up / "judgments"))
    sets = ["ingest.source=delta", f"ingest.delta.media_base={lay.root}",
            *_flat("catalog", f"file://{up}/catalog", CATALOG_MAP), *_flat("events", str(up / "events"), EVENTS_MAP),
            *_flat("queries", str(up / "queries"), QUERIES_MAP), *_flat("judgments", str(up / "judgments"), JUDGMENTS_MAP),
            "generator.n_products=40", "generator.n_queries=8", "train.max_epochs=2", "train.data_loader=parquet",
            "score.top_n=5", "score.similarity_top_k=5", "evaluate.baselines=false"]
    return dict(ref=ref, up=up, lay=lay, sets=sets, base=base)


def test_nightly_from_upstream_delta_tables(spark, upstream):
    cfg = make_config(upstream["base"] / "lake", *upstream["sets"])
    assert generate.skip_reason(cfg) == "ingest.source=delta: the sample is not ingested"
    lh = Lakehouse(spark, cfg)
    res = nightly.run_nightly(lh, D, echo=print)
    assert res.failed is None and res.skipped == ["generate"] and res.ran == list(nightly.STAGE_NAMES[1:])
    assert lh.read("ranking_scores").count() > 0
    ref = upstream["ref"]
    # the mapped upstream tables land what the file source lands from the same data
    for table in ("products", "queries", "query_log"):
        assert lh.checksum(table, exclude=("source",) if table != "query_log" else ()) == \
            ref.checksum(table, exclude=("source",) if table != "query_log" else ()), table
    assert lh.read("judgments").count() == ref.read("judgments").count()
    assert {r[0] for r in lh.read("products").select("source").distinct().collect()} == {"delta"}
    q = {(r["record_id"], r["reason"]) for r in lh.read("quarantine").where("stage = 'ingest_delta'").collect()}
    assert any(reason == "null_id" for _, reason in q)
    assert ("query_log:e_bad", "bad_value:position") in q
    assert any(reason == "unknown_product_id" for _, reason in q)   # the judgment of an unknown product
    runs = lh.read("runs").where("stage = 'ingest'").first()
    assert runs["message"] == "source=delta" and runs["status"] == "succeeded"

    # a re-run changes nothing: content hashes unchanged, no new commits
    versions = {t: lh.version(t) for t in ("products", "queries")}
    counts = ingest.run(lh, D)
    assert counts["products_changed"] == 0 and counts["queries_changed"] == 0
    assert {t: lh.version(t) for t in versions} == versions

    # a new day upstream: only that day of query_log is written, the earlier day is untouched
    day1 = lh.read("query_log").where(F.col("run_date") == F.lit(D.isoformat()).cast("date"))
    before = sorted(map(tuple, day1.drop("ingested_at").collect()))
    nxt = D + dt.timedelta(days=1)
    _rename(_events_of_day(upstream["lay"], spark, nxt), EVENTS_MAP).write.format("delta").mode("append").save(
        str(upstream["up"] / "events"))
    assert ingest.run(lh, nxt)["log_days"] == 2
    days = {r[0] for r in lh.read("query_log").select("run_date").distinct().collect()}
    assert days == {D, nxt}
    day1 = lh.read("query_log").where(F.col("run_date") == F.lit(D.isoformat()).cast("date"))
    assert sorted(map(tuple, day1.drop("ingested_at").collect())) == before


def test_missing_upstream_column_names_the_mapping_key(spark, upstream, tmp_path):
    sets = [s.replace("ingest.delta.events.columns.position=rank", "ingest.delta.events.columns.position=pos")
            for s in upstream["sets"]]
    lh = Lakehouse(spark, make_config(tmp_path, *sets))
    with pytest.raises(ValueError, match=r"no column 'pos' for 'position'.*ingest\.delta\.events\.columns\.position"):
        ingest.run(lh, D)
    with pytest.raises(ConfigError, match="unknown mmrank column"):
        make_config(tmp_path, *upstream["sets"], "ingest.delta.events.columns.colour=c")
    with pytest.raises(ConfigError, match="needs ingest.delta.catalog"):
        make_config(tmp_path, "ingest.source=delta")
