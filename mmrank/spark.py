"""SparkSession factory. mmrank only fills in what is unset: an active session (Databricks, a notebook) is used
untouched, and under spark-submit every setting spark-submit was given (`--master`, `--conf`, its properties
file) wins over `cfg.spark`; locally a `local[2]` session with Delta Lake is built from `cfg.spark`.
"""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from mmrank.config import MMRankConfig
from mmrank.paths import StoragePaths
from mmrank.storage import executor_env

_DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def delta_maven_coordinate() -> str:
    """The Delta Lake Maven package matching the installed delta-spark (what spark-submit --packages needs)."""
    from importlib.metadata import version

    return f"io.delta:delta-spark_2.13:{version('delta-spark')}"


def _under_spark_submit() -> bool:
    """spark-submit starts the JVM before Python runs; builder-time spark.jars.packages is then ignored."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _check_delta_loaded(spark: SparkSession) -> None:
    try:
        spark._jvm.org.apache.spark.util.Utils.classForName("io.delta.tables.DeltaTable", True, False)
    except Exception:
        raise RuntimeError(
            "Delta Lake classes are not on the Spark classpath. Under spark-submit pass "
            f"--packages {delta_maven_coordinate()} (scripts/submit.sh does this).") from None


def given_settings() -> dict[str, str]:
    """The settings spark-submit already decided (its `--master`, `--conf`, properties file): the SparkConf of
    the JVM it started. Empty when Python started first (no spark-submit)."""
    if not _under_spark_submit():
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM (PYSPARK_GATEWAY_PORT)
    return dict(SparkConf(loadDefaults=True).getAll())


def wanted_settings(cfg: MMRankConfig, given: dict[str, str]) -> dict[str, str]:
    """What `cfg` asks for (master, app name, partitions, Delta, quiet logs, ...), plus what executors need
    that only the driver knows: the shipped `--py-files` on their PYTHONPATH (so processes that tasks start,
    e.g. torchrun and Horovod ranks, import the shipped package) and the file-system options."""
    sc = cfg.spark
    out = {
        "spark.master": sc.master,
        "spark.app.name": sc.app_name,
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
        "spark.default.parallelism": str(sc.shuffle_partitions),
        "spark.driver.memory": sc.driver_memory,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(sc.arrow_batch_size),
        "spark.sql.parquet.columnarReaderBatchSize": str(sc.reader_batch_size),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.sql.warehouse.dir": str(StoragePaths(cfg).warehouse),
        "spark.driver.extraJavaOptions": "-Dlog4j2.level=ERROR -Dderby.system.home=/tmp/derby",
        **_DELTA_CONF,
        **sc.extra,
    }
    if given.get("spark.master", sc.master).startswith("local"):  # one machine: nothing listens beyond loopback
        out.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"})
        # and its Delta logs are replayed in as many partitions as it shuffles into, not Delta's cluster-sized 50
        out.setdefault("spark.databricks.delta.snapshotPartitions", str(sc.shuffle_partitions))
    shipped = [os.path.basename(p) for p in given.get("spark.submit.pyFiles", "").split(",") if p]
    if shipped:  # executors fetch --py-files into their working directory, where their tasks run
        out["spark.executorEnv.PYTHONPATH"] = os.pathsep.join(shipped)
    for k, v in executor_env(cfg.storage.fs_options).items():
        out[f"spark.executorEnv.{k}"] = v
    return out


def get_spark(cfg: MMRankConfig) -> SparkSession:
    """The active session if there is one (Databricks, notebooks), else a session that fills in only the
    settings nobody gave: under spark-submit, `cfg.spark` never overrides its `--master` or `--conf`.

    Local sessions get Delta from Maven Central via `configure_spark_with_delta_pip` (cached in ~/.ivy2),
    Arrow-backed pandas UDFs, quiet logs and a workers' Python equal to the driver's.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if cfg.env == "databricks":
        return SparkSession.builder.getOrCreate()
    from delta import configure_spark_with_delta_pip

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    given = given_settings()
    builder = SparkSession.builder
    for k, v in wanted_settings(cfg, given).items():
        if k not in given:
            builder = builder.config(k, v)
    if not _under_spark_submit():
        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    _check_delta_loaded(spark)
    return spark
