"""The generated sample's landing zone (`data/landing.py` layout) -> products, queries, query_log, judgments
(the generator's truth as judgments source `generator_truth`)."""
from __future__ import annotations

import datetime as dt

from mmrank.data import ingest as I
from mmrank.data.landing import sample_layout
from mmrank.lakehouse import Lakehouse


def ingest_sample(lh: Lakehouse, run_date: dt.date) -> dict[str, int]:
    """The generator's landing zone -> all four tables (truth as judgments source `generator_truth`)."""
    lay = sample_layout(lh.paths.landing)
    if not lay.manifest.exists():
        raise FileNotFoundError(f"no sample landing zone at {lay.root}; run jobs/generate.py first")
    spark, base = lh.spark, str(lay.root)
    counts: dict[str, int] = {}
    prods = I.check_products(lh, I.read_json(spark, str(lay.products), I.PRODUCT_RAW), base)
    counts["products_changed"] = I.land_products(lh, prods.valid, "sample", run_date)
    queries = I.check_queries(lh, I.read_json(spark, str(lay.queries), I.QUERY_RAW), base)
    counts["queries_changed"] = I.land_queries(lh, queries.valid, "sample", run_date)
    events = I.check_log(lh, I.read_csv(spark, str(lay.log_dir / "*.csv"), I.LOG_RAW), run_date)
    counts["log_days"] = I.land_log(lh, events.valid)
    judg = I.check_judgments(lh, I.read_csv(spark, str(lay.truth), I.JUDGMENT_RAW))
    counts["judgments_landed"] = I.land_judgments(lh, judg.valid, "generator_truth", run_date)
    counts.update(I.finish(lh, [prods, queries, events, judg], "ingest_sample", run_date))
    return counts
