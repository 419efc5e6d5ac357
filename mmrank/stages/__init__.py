"""Pipeline stages: one module per stage, each the only code that reads and writes that stage's tables.

Every stage module exposes `run(lh, run_date, **options) -> counts`, built with the `stage` decorator below,
which owns the bookkeeping: it records the stage's `runs` row (`succeeded`, or `failed` with the error, then
re-raised), the Delta versions of its inputs and outputs, its counts, model version and message. Jobs
(`jobs/*.py`) and the nightly pipeline (`mmrank.nightly`) call stages the same way, so a stage leaves the same
row whoever runs it. Stages, in nightly order: generate, ingest, labels, featurize, lexical, training_lists,
train, promote, score, evaluate, report.
"""
from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from mmrank.lakehouse import Lakehouse
from mmrank.runs import StageRun, versions, write_run

log = logging.getLogger("mmrank")


class StageFn(Protocol):
    """A stage's public entry point (see `stage`)."""

    stage: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __call__(self, lh: Lakehouse, run_date: dt.date, **options) -> dict[str, int]: ...


@contextmanager
def track_stage(lh: Lakehouse, stage: str, run_date: dt.date, inputs: tuple[str, ...] = (),
                outputs: tuple[str, ...] = (), run_id: str | None = None) -> Iterator[StageRun]:
    """Record a stage run: writes `succeeded` or `failed` (then re-raises) to the runs table."""
    rec = StageRun(stage, run_date, inputs, outputs)
    started = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    t0 = time.perf_counter()
    in_versions = versions(lh, inputs)
    log.info("stage %s (run_date %s) started", stage, run_date)
    status = "succeeded"
    try:
        yield rec
    except BaseException as e:  # recorded, then re-raised
        status = "failed"
        rec.message = f"{type(e).__name__}: {str(e)[:500]}"
        raise
    finally:
        dur = time.perf_counter() - t0
        write_run(lh, rec, status, started, dur, in_versions, run_id)
        log.info("stage %s %s in %.1fs %s", stage, status, dur, rec.counts if status == "succeeded" else rec.message)


def stage(name: str, inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = ()
          ) -> Callable[[Callable[..., dict | None]], StageFn]:
    """Decorator turning `body(lh, run_date, rec, **options) -> counts | None` into the stage's
    `run(lh, run_date, **options) -> counts`, which records the runs row. The body may also fill `rec`
    (counts, model_version, message); returned counts are added to `rec.counts`."""
    def deco(body: Callable[..., dict | None]) -> StageFn:
        @functools.wraps(body)
        def run(lh: Lakehouse, run_date: dt.date, **options) -> dict[str, int]:
            with track_stage(lh, name, run_date, inputs, outputs) as rec:
                counts = body(lh, run_date, rec, **options) or {}
                rec.counts.update({k: int(v) for k, v in counts.items() if isinstance(v, (int, float))})
            return dict(rec.counts)

        run.stage, run.inputs, run.outputs = name, inputs, outputs  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]
    return deco
