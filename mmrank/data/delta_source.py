"""`ingest.source: delta`: the catalog and query log from Delta tables that upstream systems own -> `products`,
`queries`, `query_log`, `judgments` (source `delta`), with the same checks and writes as the file sources
(`data/ingest.py`): every row validated, rejects quarantined (stage `ingest_delta`) with a reason, products
and queries MERGEd only where their content hash changed, each log day present replaced in one commit.

Tables (`ingest.delta.<table>`, each a path / URI or a metastore name, plus `columns` mapping mmrank's names to
upstream's; `config.UPSTREAM_COLUMNS` lists the names):
- `catalog` (required): product_id, title [, description, brand, category, attributes (a map), image_path,
  audio_path]. Media paths are URIs, absolute paths or paths relative to `ingest.delta.media_base`.
- `events` (required): event_id, session_id, query_id, product_id, position, clicked, added_to_cart,
  purchased, event_ts [, query_text, kind]. Only the `ingest.delta.log_days` days up to the run_date are
  read (plus rows whose timestamp does not parse, which are quarantined); later events belong to later runs.
- `queries` (optional): query_id, kind, query_text, audio_path. Without it, typed queries are the distinct
  (query_id, query_text) of the events read, so the events then need `query_text`.
- `judgments` (optional): query_id, product_id, grade (in [0, 3]).
"""
from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from mmrank.config import UPSTREAM_COLUMNS, DeltaSourceConf, UpstreamTable
from mmrank.data import ingest as I
from mmrank.lakehouse import Lakehouse, sql_date

SOURCE = "delta"
REQUIRED = {"catalog": ("product_id",), "queries": ("query_id",),
            "events": ("event_id", "session_id", "query_id", "product_id", "position", "clicked",
                       "added_to_cart", "purchased", "event_ts"),
            "judgments": ("query_id", "product_id", "grade")}


def read_upstream(spark: SparkSession, t: UpstreamTable) -> DataFrame:
    """The current snapshot of an upstream Delta table given by path / URI or metastore name."""
    if "/" in t.table or ":" in t.table:
        return spark.read.format("delta").load(t.table)
    return spark.read.table(t.table)


def upstream_column(df: DataFrame, t: UpstreamTable, name: str) -> str | None:
    """The upstream column holding mmrank's `name` (mapped in `t.columns`, else the same name; any case)."""
    src = t.columns.get(name, name).lower()
    return next((c for c in df.columns if c.lower() == src), None)


def mapped(spark: SparkSession, kind: str, t: UpstreamTable) -> DataFrame:
    """Upstream `kind` table with mmrank's column names (UPSTREAM_COLUMNS[kind]), values as strings
    (`attributes` as map<string,string>); optional columns upstream lacks are null, a missing required
    column is an error naming the table, the column and the config key."""
    df = read_upstream(spark, t)
    cols = []
    for name in UPSTREAM_COLUMNS[kind]:
        real = upstream_column(df, t, name)
        want = "map<string,string>" if name == "attributes" else "string"
        if real is None:
            if name in REQUIRED[kind]:
                raise ValueError(f"upstream {kind} table {t.table!r} has no column "
                                 f"{t.columns.get(name, name)!r} for {name!r} "
                                 f"(columns: {', '.join(df.columns)}); map it with "
                                 f"ingest.delta.{kind}.columns.{name}")
            cols.append(F.lit(None).cast(want).alias(name))
        else:
            cols.append(F.col(f"`{real}`").cast(want).alias(name))
    return df.select(*cols, F.lit(None).cast("string").alias("_corrupt"))


def events_window(events: DataFrame, run_date: dt.date, days: int) -> DataFrame:
    """Events of the `days` days ending at run_date, and those whose timestamp does not parse."""
    day = F.to_date(F.col("event_ts").try_cast("timestamp"))
    first = run_date - dt.timedelta(days=days - 1)
    return events.where(day.isNull() | day.between(F.lit(sql_date(first)).cast("date"),
                                                   F.lit(sql_date(run_date)).cast("date")))


def queries_from_events(events: DataFrame) -> DataFrame:
    """Typed queries as the distinct (query_id, query_text) of the events (kind from `kind` when given)."""
    return (events.where(F.col("query_text").isNotNull())
            .select("query_id", F.coalesce("kind", F.lit("typed")).alias("kind"), "query_text")
            .distinct()
            .select("query_id", "kind", "query_text", F.lit(None).cast("string").alias("audio_path"),
                    F.lit(None).cast("string").alias("_corrupt")))


def ingest_delta(lh: Lakehouse, run_date: dt.date, conf: DeltaSourceConf | None = None) -> dict[str, int]:
    """Upstream Delta tables (`ingest.delta`, or `conf`) -> all four tables; counts like the file sources."""
    conf = conf or lh.cfg.ingest.delta
    if conf.catalog is None or conf.events is None:
        raise ValueError("ingest.source = delta needs ingest.delta.catalog and ingest.delta.events")
    spark, base = lh.spark, conf.media_base or "."
    counts: dict[str, int] = {}
    prods = I.check_products(lh, mapped(spark, "catalog", conf.catalog), base)
    counts["products_changed"] = I.land_products(lh, prods.valid, SOURCE, run_date)
    raw_events = events_window(mapped(spark, "events", conf.events), run_date, conf.log_days)
    if conf.queries is not None:
        qraw = mapped(spark, "queries", conf.queries)
    elif upstream_column(read_upstream(spark, conf.events), conf.events, "query_text") is not None:
        qraw = queries_from_events(raw_events)
    else:
        raise ValueError("ingest.source = delta: give ingest.delta.queries, or a query_text column in the "
                         "events table (ingest.delta.events.columns.query_text)")
    queries = I.check_queries(lh, qraw, base)
    counts["queries_changed"] = I.land_queries(lh, queries.valid, SOURCE, run_date)
    events = I.check_log(lh, raw_events.drop("query_text", "kind"), run_date)
    counts["log_days"] = I.land_log(lh, events.valid)
    checks = [prods, queries, events]
    if conf.judgments is not None:
        judg = I.check_judgments(lh, mapped(spark, "judgments", conf.judgments))
        counts["judgments_landed"] = I.land_judgments(lh, judg.valid, SOURCE, run_date)
        checks.append(judg)
    counts.update(I.finish(lh, checks, "ingest_delta", run_date))
    return counts
