"""Delta I/O for the table contracts: every write is one atomic Delta commit, idempotent per run_date.

- `replace(name, df, where)`: `replaceWhere` overwrite of exactly the rows matching `where` (a date, a stage).
- `merge(name, df)`: upsert on the table's keys; rows whose `content_hash` is unchanged are left untouched.
- `overwrite(name, df)`: whole-table replacement in one commit (readers see the old or the new version).
Schemas are enforced on write: a DataFrame must carry exactly the contract's columns (castable types). A table
with `bucket_by` (the feature tables) is stored partitioned by its id bucket (`mmrank.buckets`): the `bucket`
column is added on write and dropped on read, and a table written before it had buckets is rewritten into them
on its next write.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from typing import Callable, Collection

from delta.exceptions import DeltaConcurrentModificationException
from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from mmrank.buckets import BUCKET_COLUMN, FEATURE_BUCKETS, bucket_of
from mmrank.config import MMRankConfig
from mmrank.paths import StoragePaths
from mmrank.storage import hadoop_uri
from mmrank.tables import TableSpec, spec


log = logging.getLogger("mmrank.lakehouse")


WALL_CLOCK_COLUMNS = ("ingested_at", "started_at", "finished_at", "duration_s")
WALL_CLOCK_KEYS = ("samples_per_sec",)  # map entries (the runs `counts`) that measure speed, not data


class ConcurrentWriteError(RuntimeError):
    """Another writer kept committing to the same rows; this write gave up (the table is unchanged by it)."""


class SchemaMismatch(ValueError):
    """A DataFrame does not match a table contract (missing or unexpected columns)."""


def sql_date(d: dt.date | str) -> str:
    """A validated ISO date literal for SQL predicates (no injection through run_date)."""
    return dt.date.fromisoformat(str(d)).isoformat()


class Lakehouse:
    """Resolves logical table names to Delta locations and performs contract-checked writes."""

    def __init__(self, spark: SparkSession, cfg: MMRankConfig):
        self.spark = spark
        self.cfg = cfg
        self.paths = StoragePaths(cfg)
        st = cfg.storage
        self.root = cfg.resolve_path(st.root) if st.kind == "path" else None
        if st.kind == "metastore":
            prefix = f"{st.catalog}.{st.schema_}" if st.catalog else st.schema_
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {prefix}")
            self._prefix = prefix

    # ---- naming -------------------------------------------------------------------------------------
    def location(self, name: str) -> str:
        """Folder of a path-based table (local), or the metastore identifier (cluster)."""
        spec(name)
        if self.root is not None:
            return hadoop_uri(self.root / name)  # URIs stay URIs (mmrank.storage); file:/// as file:/
        return f"{self._prefix}.{name}"

    def ident(self, name: str) -> str:
        """SQL identifier usable in spark.sql / DeltaTable.forName."""
        loc = self.location(name)
        return f"delta.`{loc}`" if self.root is not None else loc

    def _delta(self, name: str) -> DeltaTable:
        if self.root is not None:
            return DeltaTable.forPath(self.spark, self.location(name))
        return DeltaTable.forName(self.spark, self.location(name))

    # ---- reads --------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        if self.root is not None:
            return DeltaTable.isDeltaTable(self.spark, self.location(name))
        return self.spark.catalog.tableExists(self.location(name))

    def ensure(self, name: str) -> None:
        """Create the table empty with its contract schema if it does not exist yet."""
        if self.exists(name):
            return
        t = spec(name)
        b = DeltaTable.createIfNotExists(self.spark).addColumns(t.stored_schema)
        b = b.location(self.location(name)) if self.root is not None else b.tableName(self.location(name))
        if t.stored_partitions:
            b = b.partitionedBy(*t.stored_partitions)
        b.execute()

    def _stored_read(self, name: str, version: int | None = None) -> DataFrame:
        if self.root is not None:
            r = self.spark.read.format("delta")
            if version is not None:
                r = r.option("versionAsOf", version)
            return r.load(self.location(name))
        if version is not None:
            return self.spark.read.option("versionAsOf", version).table(self.location(name))
        return self.spark.table(self.location(name))

    def keep_layout(self, name: str) -> None:
        """Give a bucketed table written before it was bucketed (no `bucket` column) its stored layout: one
        whole-table rewrite, in one commit, rows unchanged. Every write does this first; a job that writes the
        table calls it before it builds DataFrames over the table (those would still name the old files)."""
        t = spec(name)
        if not t.bucket_by:
            return
        self.ensure(name)
        if BUCKET_COLUMN not in self._stored_read(name).columns:
            log.warning("%s: rewriting the table once into its %d id buckets (written before it was bucketed)",
                        name, FEATURE_BUCKETS)
            self.overwrite(name, self.read(name))

    def read(self, name: str, version: int | None = None) -> DataFrame:
        """The table's rows in its contract's columns (a bucketed table's `bucket` column is left out)."""
        self.ensure(name)
        df = self._stored_read(name, version)
        return df.drop(BUCKET_COLUMN) if spec(name).bucket_by else df

    def checksum(self, name: str, exclude: tuple[str, ...] | list[str] = ()) -> str:
        """Order-independent sha256 of the table's current rows (a multiset hash: row order, file layout and
        Delta version do not matter; any changed, added, removed or duplicated row does).

        Wall-clock columns (`WALL_CLOCK_COLUMNS`: ingested_at, started_at, finished_at, duration_s), map
        entries that measure speed (`WALL_CLOCK_KEYS`) and `exclude` are left out. Each row is serialised to
        canonical JSON (maps as sorted entries), hashed, and the row hashes are summed as integers in Spark, so
        nothing is collected to the driver."""
        df = self.read(name)
        skip = set(WALL_CLOCK_COLUMNS) | set(exclude)
        unknown = sorted(set(exclude) - set(df.columns))
        if unknown:
            raise KeyError(f"{name}: cannot exclude unknown columns {unknown}")
        cols = []
        for f in df.schema.fields:
            if f.name in skip:
                continue
            c = F.col(f"`{f.name}`")
            if f.dataType.typeName() == "map":
                c = F.array_sort(F.map_entries(F.map_filter(c, lambda k, _: ~k.isin(*WALL_CLOCK_KEYS))))
            elif f.dataType.typeName() == "binary":
                c = F.sha2(c, 256)
            cols.append(c.alias(f.name))
        h = F.sha2(F.to_json(F.struct(*cols)), 256)
        # four 60-bit slices of each row hash, summed exactly as decimals: commutative, so order-independent
        sums = [F.sum(F.conv(F.substring(h, 1 + 15 * i, 15), 16, 10).cast("decimal(38,0)")).alias(f"s{i}")
                for i in range(4)]
        r = df.agg(F.count(F.lit(1)).alias("n"), *sums).first()
        blob = f"{name}|{sorted(c.name for c in df.schema.fields if c.name not in skip)}|{r['n']}|" + \
            "|".join(str(r[f"s{i}"] or 0) for i in range(4))
        return hashlib.sha256(blob.encode()).hexdigest()

    def parquet_readable(self, name: str, columns: Collection[str]) -> Row | None:
        """The table's `DESCRIBE DETAIL` row when `columns` of its current data files can be read as plain
        Parquet (by pyarrow, in a task): a Delta table without deletion vectors (its files would still hold
        deleted rows) or column mapping (physical column names), the columns stored in the files (not partition
        values); None otherwise."""
        d = self.spark.sql(f"DESCRIBE DETAIL {self.ident(name)}").first()
        props = d["properties"] or {}
        ok = (d["format"] == "delta" and props.get("delta.enableDeletionVectors", "false").lower() != "true"
              and props.get("delta.columnMapping.mode", "none") == "none"
              and not set(d["partitionColumns"] or []) & set(columns))
        return d if ok else None

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        return int(self._delta(name).history(1).select("version").first()[0])

    # ---- contract ---------------------------------------------------------------------------------
    def conform(self, name: str, df: DataFrame) -> DataFrame:
        """Select the contract's columns in order, cast to its types; fail naming missing/extra columns."""
        t: TableSpec = spec(name)
        have, want = set(df.columns), t.columns
        missing, extra = [c for c in want if c not in have], sorted(have - set(want))
        if missing or extra:
            raise SchemaMismatch(f"{name}: missing columns {missing}, unexpected columns {extra}")
        out = df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in t.schema.fields])
        return out.withColumn(BUCKET_COLUMN, bucket_of(t.bucket_by, FEATURE_BUCKETS)) if t.bucket_by else out

    # ---- writes -----------------------------------------------------------------------------------
    def _writer(self, name: str, df: DataFrame, mode: str):
        t = spec(name)
        if t.bucket_by:  # one task per bucket: one file per bucket, not one per (input partition, bucket)
            df = df.repartition(BUCKET_COLUMN)
        w = df.write.format("delta").mode(mode)
        if t.stored_partitions:
            w = w.partitionBy(*t.stored_partitions)
        return w

    def _save(self, name: str, w) -> None:
        def commit() -> None:
            if self.root is not None:
                w.save(self.location(name))
            else:
                w.saveAsTable(self.location(name))
        self._with_retry(name, commit)

    def _with_retry(self, name: str, commit: Callable[[], None]) -> None:
        """Run one Delta commit; if a concurrent writer touched the same rows first, retry (the write is
        idempotent), then raise `ConcurrentWriteError`. Delta's optimistic concurrency guarantees a losing
        attempt commits nothing, so readers never see a mixed version."""
        attempts = self.cfg.storage.commit_retries + 1
        for i in range(1, attempts + 1):
            try:
                commit()
                return
            except Exception as e:
                if not _is_commit_conflict(e):
                    raise
                if i == attempts:
                    raise ConcurrentWriteError(
                        f"{name}: gave up after {attempts} attempts because concurrent writers kept committing "
                        f"to the same rows ({type(e).__name__}); the table holds the other writer's complete "
                        "version. Re-run this job when the other run has finished.") from e
                log.warning("%s: concurrent commit conflict (%s), retry %d/%d", name, type(e).__name__, i,
                            attempts - 1)
                time.sleep(min(2.0 ** i, 10.0))

    def replace(self, name: str, df: DataFrame, where: str) -> None:
        """Atomically replace the rows matching `where` (e.g. run_date = '2026-11-21') with `df`."""
        self.ensure(name)
        self.keep_layout(name)
        self._save(name, self._writer(name, self.conform(name, df), "overwrite").option("replaceWhere", where))

    def replace_date(self, name: str, df: DataFrame, run_date: dt.date | str, extra: str = "") -> None:
        where = f"run_date = DATE'{sql_date(run_date)}'" + (f" AND {extra}" if extra else "")
        self.replace(name, df, where)

    def overwrite(self, name: str, df: DataFrame) -> None:
        """Replace the whole table in one commit (its schema too: a table written before its contract gained a
        column, e.g. `training_lists.p_lex`, takes the current contract)."""
        self.ensure(name)
        self._save(name, self._writer(name, self.conform(name, df), "overwrite").option("overwriteSchema", "true"))

    def append(self, name: str, df: DataFrame) -> None:
        self.ensure(name)
        self.keep_layout(name)
        self._save(name, self._writer(name, self.conform(name, df), "append"))

    def merge(self, name: str, df: DataFrame, delete_missing: Column | None = None,
              deletes: DataFrame | None = None) -> None:
        """Upsert `df` on the table's keys. With a `content_hash` column, unchanged rows are not rewritten.
        `deletes`: key columns of rows to delete in the same commit (so a change that also removes rows moves
        only the changed rows and the keys, never the unchanged rest of the table)."""
        self.ensure(name)
        self.keep_layout(name)
        t = spec(name)
        src = self.conform(name, df)
        if deletes is not None:
            src = src.withColumn("_delete", F.lit(False)).unionByName(deletes.select(
                *[F.col(f.name).cast(f.dataType) if f.name in t.keys else F.lit(None).cast(f.dataType).alias(f.name)
                  for f in t.stored_schema.fields], F.lit(True).alias("_delete")))
        cond = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in t.keys)
        m = self._delta(name).alias("t").merge(src.alias("s"), cond)
        keep = "NOT s._delete" if deletes is not None else "true"
        if deletes is not None:
            m = m.whenMatchedDelete(condition="s._delete")
        values = {f"`{c.name}`": f"s.`{c.name}`" for c in t.stored_schema.fields}
        changed = "NOT (t.content_hash <=> s.content_hash)" if "content_hash" in t.columns else "true"
        m = m.whenMatchedUpdate(condition=f"{keep} AND {changed}", set=values)
        m = m.whenNotMatchedInsert(condition=keep, values=values)
        if delete_missing is not None:
            m = m.whenNotMatchedBySourceDelete(condition=delete_missing)
        self._with_retry(name, m.execute)

    # ---- shared helpers ---------------------------------------------------------------------------
    def quarantine(self, df: DataFrame, stage: str, run_date: dt.date | str) -> int:
        """Replace this (run_date, stage)'s quarantine rows with `df` (record_id, reason, payload).

        Returns the number of quarantined rows. Payloads are truncated to 200 characters.
        """
        rows = df.select(
            F.lit(sql_date(run_date)).cast("date").alias("run_date"), F.lit(stage).alias("stage"),
            F.col("record_id").cast("string"), F.col("reason").cast("string"),
            F.substring(F.col("payload").cast("string"), 1, 200).alias("payload"),
        ).cache()
        n = rows.count()
        self.replace_date("quarantine", rows, run_date, extra=f"stage = '{_safe_name(stage)}'")
        rows.unpersist()
        return n


def _is_commit_conflict(e: BaseException) -> bool:
    """Delta's optimistic-concurrency conflicts, as raised by DeltaTable (Python) or DataFrameWriter (Py4J)."""
    if isinstance(e, DeltaConcurrentModificationException):
        return True
    java = getattr(e, "java_exception", None)
    name = java.getClass().getName() if java is not None else ""
    return name.startswith("io.delta.exceptions.Concurrent") or name.endswith(
        ("ConcurrentModificationException", "MetadataChangedException"))


def _safe_name(s: str) -> str:
    if not s.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"stage name {s!r} must be alphanumeric with _ or -")
    return s
