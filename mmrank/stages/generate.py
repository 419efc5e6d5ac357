"""Stage `generate` (embedded default only): write the deterministic sample landing zone for the run_date.

Seeded by `generator.seed` and the date, so regenerating gives identical files. The nightly runs it only for
the embedded default: `env: local` with `ingest.source: sample`. On a cluster (`env` other than `local`), or
when the nightly ingests another source (`ingest.source`), it skips this stage (`skip_reason`).
"""
from __future__ import annotations

import datetime as dt

from mmrank.config import MMRankConfig
from mmrank.data.landing import sample_layout, write_sample
from mmrank.lakehouse import Lakehouse
from mmrank.runs import StageRun
from mmrank.stages import stage


def skip_reason(cfg: MMRankConfig) -> str | None:
    """Why the nightly skips this stage under `cfg`, or None when it runs."""
    if cfg.env != "local":
        return f"env={cfg.env}: the landing zone is fed upstream"
    if cfg.ingest.source != "sample":
        return f"ingest.source={cfg.ingest.source}: the sample is not ingested"
    return None


@stage("generate")
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Write the sample landing zone under `storage.raw_dir/sample` (replacing it); returns its counts."""
    return write_sample(lh.cfg.generator, run_date, sample_layout(lh.paths.landing).root)
