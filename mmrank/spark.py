"""SparkSession factory: local Spark with Delta Lake by default; on a cluster, the active session untouched."""
from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from mmrank.config import MMRankConfig

_DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


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
        .config("spark.sql.warehouse.dir", str(cfg.resolve_path(cfg.storage.root) / "_spark_warehouse"))
        .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=ERROR -Dderby.system.home=/tmp/derby")
    )
    for k, v in {**_DELTA_CONF, **sc.extra}.items():
        builder = builder.config(k, v)
    spark = configure_spark_with_delta_pip(builder).getOrCreate()
    spark.sparkContext.setLogLevel(sc.log_level)
    return spark
