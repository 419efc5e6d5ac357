"""Stage `ingest`: one source -> `products`, `queries`, `query_log`, `judgments` (+ `quarantine`).

Sources (`SOURCES`): `sample` (the generated landing zone, `data/sample.py`), `fashion` (the real fashion catalog,
`data/fashion.py`; option `limit`), `byo` (a user's catalog + judgments files, `data/byo.py`; options
`catalog`, `judgments`, `name`, `grade_scale`; the grade mapping applied is recorded in the run's message) and
`delta` (upstream Delta tables with a column mapping, `data/delta_source.py`). `ingest.source` in config picks
the source the nightly ingests (`configured_source`); a caller may name another with its options. The shared
checks and writes are in `data/ingest.py`.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from mmrank.config import MMRankConfig
from mmrank.data.byo import ingest_byo
from mmrank.data.delta_source import ingest_delta
from mmrank.data.fashion import ingest_fashion
from mmrank.data.sample import ingest_sample
from mmrank.lakehouse import Lakehouse
from mmrank.runs import StageRun
from mmrank.stages import stage

SOURCES: dict[str, Callable[..., dict[str, int]]] = {
    "sample": ingest_sample, "fashion": ingest_fashion, "byo": ingest_byo, "delta": ingest_delta}


def configured_source(cfg: MMRankConfig) -> tuple[str, dict[str, Any]]:
    """(`ingest.source`, its options from config)."""
    ic = cfg.ingest
    if ic.source == "byo":
        return "byo", {"catalog": ic.byo.catalog_file, "judgments": ic.byo.judgments_file, "name": ic.byo.name}
    return ic.source, {}


@stage("ingest", outputs=("products", "queries", "query_log", "judgments", "quarantine"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, source: str | None = None, **options) -> dict[str, int]:
    """Ingest `source` (default: `ingest.source` with its configured options; see `SOURCES`) with `options`;
    counts of changed, landed and quarantined rows."""
    if source is None:
        source, configured = configured_source(lh.cfg)
        options = {**configured, **options}
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: use {', '.join(SOURCES)}")
    rec.message = f"source={source}"
    counts = SOURCES[source](lh, run_date, **options)
    if "grade_mapping" in counts:   # said, not guessed: the judgments' grade mapping stays with the run
        rec.message += f"; {counts.pop('grade_mapping')}"
    return counts
