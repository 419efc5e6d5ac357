"""Data: sample generator, landing zone, ingestion (sample, fashion, BYO), validation. See docs/data.md."""
from __future__ import annotations

import datetime as dt


def build_sample_lakehouse(lh, run_date: dt.date) -> dict[str, int]:
    """Generate the sample landing zone, ingest it and derive labels: stages generate, ingest, labels.

    Returns the merged counts of the three stages (keys prefixed `generate.`, `ingest.`, `labels.`)."""
    from mmrank import labels
    from mmrank.data import ingest, landing

    out: dict[str, int] = {}
    for name, fn in (("generate", landing.run), ("ingest", ingest.run), ("labels", labels.run)):
        out.update({f"{name}.{k}": v for k, v in fn(lh, run_date).items()})
    return out
