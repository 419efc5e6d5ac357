"""What mmrank asks of Spark (fast, no cluster): it fills in only unset settings, gives executors the shipped
zip on their PYTHONPATH and the file-system options, and binds a local session to loopback. The cluster
itself (spark-submit's `--master` winning, code shipped to executors): tests/test_cluster.py."""
from __future__ import annotations

import json

from mmrank.config import load_config
from mmrank.spark import given_settings, wanted_settings


def test_given_settings_are_empty_without_spark_submit(monkeypatch):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert given_settings() == {}


def test_wanted_settings_fill_in_what_executors_need():
    cfg = load_config(None, ["spark.master=local[3]", "storage.fs_options={s3: {endpoint_url: 'http://127.0.0.1:9'}}"])
    given = {"spark.master": "spark://127.0.0.1:7077",
             "spark.submit.pyFiles": "/opt/x/mmrank-0.1.0.zip,/root/.ivy2/jars/io.delta_delta-spark.jar"}
    w = wanted_settings(cfg, given)
    assert w["spark.master"] == "local[3]"             # wanted, but get_spark only applies keys not given
    assert w["spark.executorEnv.PYTHONPATH"] == "mmrank-0.1.0.zip:io.delta_delta-spark.jar"
    assert json.loads(w["spark.executorEnv.FSSPEC_S3"]) == {"endpoint_url": "http://127.0.0.1:9"}
    assert "spark.driver.bindAddress" not in w         # the cluster decides where the driver listens
    assert "spark.databricks.delta.snapshotPartitions" not in w  # a cluster keeps Delta's own default
    local = wanted_settings(cfg, {})
    assert local["spark.driver.bindAddress"] == "127.0.0.1" and "spark.executorEnv.PYTHONPATH" not in local
    assert local["spark.databricks.delta.snapshotPartitions"] == str(cfg.spark.shuffle_partitions)
    mine = load_config(None, ['spark.extra={"spark.databricks.delta.snapshotPartitions": "9"}'])
    assert wanted_settings(mine, {})["spark.databricks.delta.snapshotPartitions"] == "9"  # spark.extra wins
