"""Delta I/O contract: schema enforcement, idempotent MERGE, atomic replace, quarantine, run metadata."""
from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import Row

from mmrank.lakehouse import SchemaMismatch, sql_date
from mmrank.runs import stage_status
from mmrank.stages import track_stage
from mmrank.tables import TABLES, contracts_markdown

D = dt.date(2026, 11, 21)


def _judgments(lh, rows):
    return lh.spark.createDataFrame([Row(query_id=q, product_id=p, grade=g, source="byo:t", run_date=D)
                                     for q, p, g in rows], schema=lh.read("judgments").schema)


def test_every_contract_is_keyed_and_embeddings_are_float_arrays(spark):
    for t in TABLES.values():
        assert t.keys and all(k in t.columns for k in t.keys)
        for f in t.schema.fields:
            if f.name == "embedding":
                assert f.dataType.simpleString() == "array<float>"
    assert "ranking_scores" in contracts_markdown()


def test_conform_rejects_missing_and_extra_columns(lh):
    df = lh.spark.createDataFrame([Row(query_id="q", product_id="p", grade=1.0, source="s")])
    with pytest.raises(SchemaMismatch, match=r"missing columns \['run_date'\]"):
        lh.append("judgments", df)
    with pytest.raises(SchemaMismatch, match="unexpected columns \\['oops'\\]"):
        lh.append("judgments", df.selectExpr("*", "current_date() as run_date", "1 as oops"))


def test_merge_is_idempotent_and_updates(lh):
    lh.merge("judgments", _judgments(lh, [("q1", "p1", 1.0), ("q1", "p2", 0.0)]))
    lh.merge("judgments", _judgments(lh, [("q1", "p1", 1.0), ("q1", "p2", 0.0)]))
    assert lh.read("judgments").count() == 2
    lh.merge("judgments", _judgments(lh, [("q1", "p2", 3.0)]))
    got = {r["product_id"]: r["grade"] for r in lh.read("judgments").collect()}
    assert got == {"p1": 1.0, "p2": 3.0}


def test_quarantine_replaces_per_stage_and_date(lh):
    bad = lh.spark.createDataFrame([Row(record_id="p9", reason="null id", payload="x" * 500)])
    assert lh.quarantine(bad, "ingest", D) == 1
    assert lh.quarantine(bad, "ingest", D) == 1  # re-run replaces, does not duplicate
    lh.quarantine(bad, "featurize", D)
    q = lh.read("quarantine")
    assert q.count() == 2
    assert len(q.where("stage = 'ingest'").first()["payload"]) == 200
    with pytest.raises(ValueError):
        lh.quarantine(bad, "x'; DROP", D)


def test_sql_date_refuses_injection():
    assert sql_date("2026-11-21") == "2026-11-21"
    with pytest.raises(ValueError):
        sql_date("2026-11-21' OR 1=1 --")


def test_track_stage_records_success_and_failure(lh):
    with track_stage(lh, "labels", D, outputs=("judgments",)) as rec:
        lh.merge("judgments", _judgments(lh, [("q", "p", 2.0)]))
        rec.counts["rows"] = 1
    assert stage_status(lh, D, "labels") == "succeeded"
    row = lh.read("runs").where("stage = 'labels'").first()
    assert row["counts"] == {"rows": 1} and row["output_versions"]["judgments"] >= 0
    with pytest.raises(RuntimeError):
        with track_stage(lh, "score", D):
            raise RuntimeError("boom")
    failed = lh.read("runs").where("stage = 'score'").first()
    assert failed["status"] == "failed" and "boom" in failed["message"]


def test_checksum_ignores_speed_counts_but_not_data_counts(lh):
    """`runs.counts` entries that measure speed (WALL_CLOCK_KEYS) do not change a checksum; data counts do."""
    def checksum_with(counts: dict) -> str:
        lh.overwrite("runs", lh.read("runs").limit(0))
        with track_stage(lh, "train", D) as rec:
            rec.counts.update(counts)
        return lh.checksum("runs", exclude=("run_id", "config_hash"))

    base = checksum_with({"train_lists": 5, "samples_per_sec": 400})
    assert checksum_with({"train_lists": 5, "samples_per_sec": 455}) == base
    assert checksum_with({"train_lists": 6, "samples_per_sec": 400}) != base
