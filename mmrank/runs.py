"""The `runs` table: one row per (run_date, stage) with status, duration, Delta versions, counts and message.

Rows are written by the stage wrapper (`mmrank.stages.stage`); this module reads and writes the table.
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from pyspark.sql import Row

from mmrank.lakehouse import Lakehouse, sql_date


@dataclass
class StageRun:
    """Mutable record a stage fills in while it runs (counts, model version, message)."""

    stage: str
    run_date: dt.date
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    message: str = ""


def versions(lh: Lakehouse, names: tuple[str, ...]) -> dict[str, int]:
    """Current Delta version of each existing table in `names`."""
    return {n: v for n, v in ((n, lh.version(n)) for n in names) if v is not None}


def write_run(lh: Lakehouse, rec: StageRun, status: str, started: dt.datetime, duration_s: float,
              input_versions: dict[str, int], run_id: str | None = None) -> None:
    """MERGE the (run_date, stage) row of `rec` into `runs` (a re-run of the date replaces it)."""
    row = Row(run_id=run_id or uuid.uuid4().hex[:12], run_date=rec.run_date, stage=rec.stage, status=status,
              started_at=started, finished_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
              duration_s=float(duration_s), input_versions=input_versions,
              output_versions=versions(lh, rec.outputs), counts={k: int(v) for k, v in rec.counts.items()},
              model_version=rec.model_version, config_hash=lh.cfg.fingerprint(), message=rec.message)
    lh.merge("runs", lh.spark.createDataFrame([row], schema=lh.read("runs").schema))


def date_rows(lh: Lakehouse, run_date: dt.date) -> dict[str, tuple[str, str]]:
    """stage -> (status, run_id) of this run_date's rows (one small read: a row per stage)."""
    if not lh.exists("runs"):
        return {}
    rows = (lh.read("runs").where(f"run_date = DATE'{sql_date(run_date)}'")
            .select("stage", "status", "run_id").collect())
    return {r["stage"]: (r["status"], r["run_id"]) for r in rows}


def stage_status(lh: Lakehouse, run_date: dt.date, stage: str) -> str | None:
    """Status recorded for (run_date, stage), or None if the stage never ran for that date."""
    return date_rows(lh, run_date).get(stage, (None, None))[0]
