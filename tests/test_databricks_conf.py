"""Databricks (issue 13, item 8): the asset bundle describes the nightly as tasks on a CPU and a GPU job
cluster, every task runs an existing job with conf/databricks.yaml, and conf/databricks.yaml itself, loaded
with a local override (local Spark, tmp folders, upstream tables in tmp), runs the ingest-from-Delta stage.
A Databricks workspace cannot exist here: the bundle is checked for structure, the config by running it."""
from __future__ import annotations

import datetime as dt
import re

import pytest
import yaml

from mmrank import nightly
from mmrank.config import REPO_ROOT, load_config
from mmrank.lakehouse import Lakehouse
from mmrank.stages import generate, ingest

CONF = REPO_ROOT / "conf" / "databricks.yaml"
JOB_OF_STAGE = {"ingest": "ingest", "labels": "labels", "featurize": "featurize", "lexical": "lexical",
                "training_lists": "build_lists",
                "train": "train", "promote": "promote", "score": "score", "evaluate": "evaluate", "report": "nightly"}
CPU_TASKS = {"ingest", "labels", "lexical", "build_lists", "promote", "score", "evaluate", "report"}
GPU_TASKS = {"featurize", "train"}
NEEDS = {"labels": {"ingest"}, "featurize": {"ingest"}, "lexical": {"ingest"},
         "build_lists": {"labels", "featurize", "lexical"}, "train": {"build_lists"}, "promote": {"train"},
         "score": {"promote", "featurize", "lexical"}, "evaluate": {"score"}}
D = dt.date(2026, 11, 21)


def _bundle() -> tuple[dict, dict]:
    root = yaml.safe_load((REPO_ROOT / "databricks.yml").read_text())
    jobs: dict = {}
    for pattern in root["include"]:
        for f in sorted(REPO_ROOT.glob(pattern)):
            jobs.update(yaml.safe_load(f.read_text())["resources"]["jobs"])
    return root, jobs


def test_bundle_runs_the_nightly_as_tasks_on_cpu_and_gpu_clusters():
    root, jobs = _bundle()
    job = jobs["mmrank_nightly"]
    assert "package.sh wheel" in root["artifacts"]["mmrank_wheel"]["build"]
    assert (REPO_ROOT / "scripts" / "package.sh").exists()
    assert root["variables"]["conf"]["default"].endswith("conf/databricks.yaml")
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert "gpu" in clusters["gpu"]["spark_version"] and clusters["gpu"]["spark_conf"]["spark.task.resource.gpu.amount"]
    assert clusters["gpu"]["driver_node_type_id"] == clusters["cpu"]["node_type_id"]  # CPU driver, GPU workers
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert {k for k, t in tasks.items() if t["job_cluster_key"] == "cpu"} == CPU_TASKS
    assert {k for k, t in tasks.items() if t["job_cluster_key"] == "gpu"} == GPU_TASKS
    resource_dir = REPO_ROOT / "resources"
    for key, t in tasks.items():
        script = (resource_dir / t["spark_python_task"]["python_file"]).resolve()
        assert script.exists(), f"{key}: {script} missing"
        params = t["spark_python_task"]["parameters"]
        assert params[params.index("--conf") + 1] == "${var.conf}"
        assert "{{job.parameters.run_date}}" in params and t["libraries"] == [{"whl": "../dist/*.whl"}]
    # every nightly stage (generate is for the embedded default only) is a task that runs after its inputs
    assert {t["spark_python_task"]["python_file"] for t in tasks.values()} == {
        f"../jobs/{JOB_OF_STAGE[s]}.py" for s in nightly.STAGE_NAMES if s != "generate"}
    for key, needs in NEEDS.items():
        assert _upstream(tasks, key) >= needs, (key, needs)
    assert _upstream(tasks, "report") == set(tasks) - {"report"}


def _upstream(tasks: dict, key: str) -> set[str]:
    seen: set[str] = set()
    todo = [d["task_key"] for d in tasks[key].get("depends_on", [])]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo += [d["task_key"] for d in tasks[k].get("depends_on", [])]
    return seen


def test_databricks_conf_is_a_cluster_configuration():
    cfg = load_config(CONF)
    assert cfg.env == "databricks" and cfg.storage.kind == "metastore" and cfg.ingest.source == "delta"
    assert generate.skip_reason(cfg) is not None
    assert cfg.features.device == "auto"               # a CPU driver must not need a GPU
    assert cfg.train.backend == "torch_distributor"
    for key in ("raw_dir", "artifacts_dir", "reports_dir", "work_dir"):  # shared storage, never a node's disk
        v = getattr(cfg.storage, key)
        assert re.match(r"^(/Volumes/|dbfs:/|s3a://|abfss://|gs://)", v), (key, v)


def _upstream_tables(spark, root) -> dict[str, str]:
    """Tiny upstream tables with the column names conf/databricks.yaml maps."""
    from pyspark.sql import Row

    products = [Row(sku=f"p{i}", name=f"red wool scarf {i}", description="warm", brand="acme", category="scarf",
                    image_uri=None) for i in range(6)]
    events = [Row(id=f"e{q}{i}", session_id=f"s{q}", search_id=f"q{q}", sku=f"p{i}", rank=i + 1, clicked=i == 0,
                  carted=False, purchased=False, ts=dt.datetime(2026, 11, 21, 10, q, i),
                  search_text=f"scarf {q}") for q in range(3) for i in range(4)]
    events.append(Row(id="e-bad", session_id="s9", search_id="q9", sku="p-none", rank=1, clicked=False,
                      carted=False, purchased=False, ts=dt.datetime(2026, 11, 21, 11), search_text="gloves"))
    judgments = [Row(search_id="q0", sku="p0", grade=3), Row(search_id="q1", sku="p1", grade=2)]
    paths = {}
    product_schema = "sku string, name string, description string, brand string, category string, image_uri string"
    for name, rows, schema in (("products", products, product_schema), ("events", events, None),
                               ("judgments", judgments, None)):
        paths[name] = str(root / name)
        spark.createDataFrame(rows, schema=schema).write.format("delta").save(paths[name])
    return paths


def test_databricks_conf_with_local_override_ingests_from_delta(spark, tmp_path):
    up = _upstream_tables(spark, tmp_path / "upstream")
    lake = tmp_path / "lake"
    cfg = load_config(CONF, [
        "env=local", "storage.kind=path", f"storage.root={lake}", f"storage.raw_dir={lake}/_landing",
        f"storage.artifacts_dir={lake}/_artifacts", f"storage.reports_dir={lake}/_reports",
        f"storage.work_dir=file://{lake}/_work", f"ingest.delta.catalog.table={up['products']}",
        f"ingest.delta.events.table={up['events']}", f"ingest.delta.judgments.table={up['judgments']}"])
    lh = Lakehouse(spark, cfg)
    counts = ingest.run(lh, D)
    assert counts["products_changed"] == 6 and counts["queries_changed"] == 4 and counts["log_days"] == 1
    assert lh.read("query_log").count() == 12
    assert counts["judgments_landed"] == 2
    bad = lh.read("quarantine").where("stage = 'ingest_delta'").collect()
    assert [(r["record_id"], r["reason"]) for r in bad] == [("query_log:e-bad", "unknown_product_id")]
    assert {r["query_text"] for r in lh.read("queries").collect()} == {"scarf 0", "scarf 1", "scarf 2", "gloves"}
    assert lh.read("runs").where("stage = 'ingest'").first()["message"] == "source=delta"


def test_databricks_conf_is_refused_when_upstream_tables_are_missing(tmp_path):
    with pytest.raises(Exception, match="needs ingest.delta.catalog"):
        load_config(CONF, ["ingest.delta.catalog=null"])
