"""Two writers replacing the same run_date at once: one complete result, never a mixed table (Delta OCC)."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time

import pytest
from delta.tables import DeltaTable
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


SIZES = {"A": 40, "B": 25}


def _race(lh: Lakehouse) -> tuple[dict[str, BaseException | None], dict[str, tuple[float, float]]]:
    """Both writers at once, each in its own thread (named writer-A / writer-B). Returns each writer's outcome
    (None or the exception) and its (start, end) monotonic times around `replace_date`."""
    outcome: dict[str, BaseException | None] = {}
    times: dict[str, tuple[float, float]] = {}

    def write(version: str, n: int) -> None:
        t0 = time.monotonic()
        try:
            lh.replace_date("ranking_scores", _scores(lh, version, n), D)
            outcome[version] = None
        except BaseException as e:  # recorded for the assertions
            outcome[version] = e
        times[version] = (t0, time.monotonic())

    threads = [threading.Thread(target=write, args=(v, n), name=f"writer-{v}") for v, n in SIZES.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome, times


def _assert_overlapped(times: dict[str, tuple[float, float]]) -> None:
    """Each writer's call started before the other's ended (both were in flight together; that their Delta
    transactions overlapped is shown by the conflict each test also asserts)."""
    (a0, a1), (b0, b1) = times["A"], times["B"]
    assert a0 < b1 and b0 < a1, f"the writers did not overlap: {times}"


def _assert_one_complete_version(lh: Lakehouse) -> str:
    rows = lh.read("ranking_scores").where(f"run_date = DATE'{D}'").collect()
    versions = {r["model_version"] for r in rows}
    assert len(versions) == 1, f"mixed table: {versions}"
    (v,) = versions
    assert len(rows) == SIZES[v]
    return v


def _writes(lh: Lakehouse) -> list[int]:
    """Rows written by each WRITE commit of ranking_scores, oldest first (Delta history)."""
    hist = (DeltaTable.forPath(lh.spark, lh.location("ranking_scores")).history()
            .where("operation = 'WRITE'").orderBy("version").collect())
    return [int(h["operationMetrics"]["numOutputRows"]) for h in hist]


def _writer_of(rows_written: int) -> str:
    (v,) = [v for v, n in SIZES.items() if n == rows_written]
    return v


@pytest.mark.slow
def test_without_retries_one_writer_fails_clearly_and_the_table_is_complete(spark, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mmrank.lakehouse")
    lh = Lakehouse(spark, make_config(tmp_path, "storage.commit_retries=0"))
    lh.ensure("ranking_scores")
    outcome, times = _race(lh)
    _assert_overlapped(times)
    errors = [e for e in outcome.values() if e is not None]
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentWriteError), outcome
    assert "concurrent writers" in str(errors[0])
    cause = errors[0].__cause__  # Delta's optimistic-concurrency conflict (Python class, or the JVM's via Py4J)
    java = getattr(cause, "java_exception", None)
    assert "Concurrent" in (java.getClass().getName() if java is not None else type(cause).__name__), repr(cause)
    assert not [r for r in caplog.records if "concurrent commit conflict" in r.getMessage()]  # no retry
    winner = next(k for k, e in outcome.items() if e is None)
    # exactly one data commit, the winner's; the loser committed nothing
    assert [_writer_of(n) for n in _writes(lh)] == [winner]
    assert _assert_one_complete_version(lh) == winner


@pytest.mark.slow
def test_with_retries_both_succeed_and_the_last_complete_version_wins(spark, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mmrank.lakehouse")
    lh = Lakehouse(spark, make_config(tmp_path, "storage.commit_retries=2"))
    lh.ensure("ranking_scores")
    outcome, times = _race(lh)
    assert all(e is None for e in outcome.values()), outcome
    _assert_overlapped(times)
    # the loser of the first commit race hit a conflict and retried (logged from its own thread)
    retried = {r.threadName for r in caplog.records if "concurrent commit conflict" in r.getMessage()}
    assert len(retried) == 1 and retried <= {"writer-A", "writer-B"}, retried
    loser = retried.pop().removeprefix("writer-")
    # both writes committed, the retried one last; the table holds exactly the last commit's rows
    commits = [_writer_of(n) for n in _writes(lh)]
    assert sorted(commits) == ["A", "B"] and commits[-1] == loser, commits
    assert _assert_one_complete_version(lh) == commits[-1]
