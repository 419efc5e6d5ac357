"""Run metadata: one `runs` row per (run_date, stage) with status, duration, Delta versions and counts."""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from pyspark.sql import Row

from mmrank.lakehouse import Lakehouse, sql_date

log = logging.getLogger("mmrank")


@dataclass
class StageRun:
    """Mutable record a stage fills in while it runs (counts, model version, output tables)."""

    stage: str
    run_date: dt.date
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    message: str = ""


def stage_status(lh: Lakehouse, run_date: dt.date, stage: str) -> str | None:
    """Status recorded for (run_date, stage), or None if the stage never ran for that date."""
    if not lh.exists("runs"):
        return None
    rows = (lh.read("runs").where(f"run_date = DATE'{sql_date(run_date)}' AND stage = '{stage}'")
            .select("status").collect())
    return rows[0][0] if rows else None


def _versions(lh: Lakehouse, names: tuple[str, ...]) -> dict[str, int]:
    return {n: v for n in names if (v := lh.version(n)) is not None}


@contextmanager
def track_stage(lh: Lakehouse, stage: str, run_date: dt.date, inputs: tuple[str, ...] = (),
                outputs: tuple[str, ...] = (), run_id: str | None = None) -> Iterator[StageRun]:
    """Record a stage run: writes `succeeded` or `failed` (then re-raises) to the runs table."""
    rec = StageRun(stage, run_date, inputs, outputs)
    started = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    t0 = time.perf_counter()
    in_versions = _versions(lh, inputs)
    log.info("stage %s (run_date %s) started", stage, run_date)
    status, err = "succeeded", None
    try:
        yield rec
    except BaseException as e:  # recorded, then re-raised
        status, err = "failed", e
        rec.message = f"{type(e).__name__}: {str(e)[:500]}"
        raise
    finally:
        dur = time.perf_counter() - t0
        row = Row(run_id=run_id or uuid.uuid4().hex[:12], run_date=run_date, stage=stage, status=status,
                  started_at=started, finished_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
                  duration_s=float(dur), input_versions=in_versions,
                  output_versions=_versions(lh, outputs), counts={k: int(v) for k, v in rec.counts.items()},
                  model_version=rec.model_version, config_hash=lh.cfg.fingerprint(), message=rec.message)
        lh.merge("runs", lh.spark.createDataFrame([row], schema=lh.read("runs").schema))
        log.info("stage %s %s in %.1fs %s", stage, status, dur, rec.counts if err is None else rec.message)
