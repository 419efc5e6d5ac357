"""Two writers replacing the same run_date at once: one complete result, never a mixed table (Delta OCC)."""
from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType

from mmrank.lakehouse import ConcurrentWriteError, Lakehouse
from tests.conftest import make_config

D = dt.date(2026, 11, 21)


@F.udf(FloatType())
def _slow_score(i: int) -> float:
    time.sleep(0.05)  # keeps both transactions open long enough to overlap for certain
    return float(i)


def _scores(lh: Lakehouse, version: str, n: int):
    return (lh.spark.range(n).repartition(2).select(
        F.lit(D).alias("run_date"), F.lit("q1").alias("query_id"), F.concat(F.lit("p"), F.col("id")).alias("product_id"),
        _slow_score("id").alias("score"), (F.col("id") + 1).cast("int").alias("rank"), F.lit(version).alias("model_version"),
        F.lit(None).alias("contrib_text"), F.lit(None).alias("contrib_image"), F.lit(None).alias("contrib_audio")))


def _race(lh: Lakehouse) -> dict[str, BaseException | None]:
    outcome: dict[str, BaseException | None] = {}

    def write(version: str, n: int) -> None:
        try:
            lh.replace_date("ranking_scores", _scores(lh, version, n), D)
            outcome[version] = None
        except BaseException as e:  # recorded for the assertions
            outcome[version] = e

    threads = [threading.Thread(target=write, args=a) for a in (("A", 40), ("B", 25))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def _assert_one_complete_version(lh: Lakehouse) -> str:
    rows = lh.read("ranking_scores").where(f"run_date = DATE'{D}'").collect()
    versions = {r["model_version"] for r in rows}
    assert len(versions) == 1, f"mixed table: {versions}"
    (v,) = versions
    assert len(rows) == {"A": 40, "B": 25}[v]
    return v


@pytest.mark.slow
def test_without_retries_one_writer_fails_clearly_and_the_table_is_complete(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path, "storage.commit_retries=0"))
    lh.ensure("ranking_scores")
    outcome = _race(lh)
    errors = [e for e in outcome.values() if e is not None]
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentWriteError), outcome
    assert "concurrent writers" in str(errors[0])
    winner = next(k for k, e in outcome.items() if e is None)
    assert _assert_one_complete_version(lh) == winner


@pytest.mark.slow
def test_with_retries_both_succeed_and_the_last_complete_version_wins(spark, tmp_path):
    lh = Lakehouse(spark, make_config(tmp_path, "storage.commit_retries=2"))
    lh.ensure("ranking_scores")
    outcome = _race(lh)
    assert all(e is None for e in outcome.values()), outcome
    _assert_one_complete_version(lh)
