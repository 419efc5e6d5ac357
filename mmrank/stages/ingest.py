"""Stage `ingest`: one source's files -> `products`, `queries`, `query_log`, `judgments` (+ `quarantine`).

Sources (`SOURCES`): `sample` (the generated landing zone, `data/sample.py`), `fashion` (the real fashion catalog,
`data/fashion.py`; option `limit`) and `byo` (a user's catalog + judgments files, `data/byo.py`; options
`catalog`, `judgments`, `name`, `grade_scale`; the grade mapping applied is recorded in the run's message). The shared checks and writes are in `data/ingest.py`.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable

from mmrank.data.byo import ingest_byo
from mmrank.data.fashion import ingest_fashion
from mmrank.data.sample import ingest_sample
from mmrank.lakehouse import Lakehouse
from mmrank.runs import StageRun
from mmrank.stages import stage

SOURCES: dict[str, Callable[..., dict[str, int]]] = {
    "sample": ingest_sample, "fashion": ingest_fashion, "byo": ingest_byo}


@stage("ingest", outputs=("products", "queries", "query_log", "judgments", "quarantine"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, source: str = "sample", **options) -> dict[str, int]:
    """Ingest `source` (see `SOURCES`) with its `options`; counts of changed, landed and quarantined rows."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: use {', '.join(SOURCES)}")
    rec.message = f"source={source}"
    counts = SOURCES[source](lh, run_date, **options)
    if "grade_mapping" in counts:   # said, not guessed: the judgments' grade mapping stays with the run
        rec.message += f"; {counts.pop('grade_mapping')}"
    return counts
