"""SparkSession factory: local Spark with Delta Lake by default; on a cluster, the active session untouched."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from mmrank.config import MMRankConfig
from mmrank.paths import StoragePaths

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


def get_spark(cfg: MMRankConfig) -> SparkSession:
    """Return the active session on a cluster (Databricks), else build a local one with Delta.

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
    sc = cfg.spark
    builder = (
        SparkSession.builder.master(sc.master)
        .appName(sc.app_name)
        .config("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
        .config("spark.default.parallelism", str(sc.shuffle_partitions))
        .config("spark.driver.memory", sc.driver_memory)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(sc.arrow_batch_size))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.sql.warehouse.dir", str(StoragePaths(cfg).warehouse))
        .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=ERROR -Dderby.system.home=/tmp/derby")
    )
    for k, v in {**_DELTA_CONF, **sc.extra}.items():
        builder = builder.config(k, v)
    if not _under_spark_submit():
        builder = configure_spark_with_delta_pip(builder)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(sc.log_level)
    _check_delta_loaded(spark)
    return spark
