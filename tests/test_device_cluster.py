"""Spark's GPU assignment reaches mmrank's device choice, on a real multi-process Spark cluster.

FAKE: the GPUs. A `local-cluster` (own worker and executor JVMs, own Python workers) discovers 8 GPUs through
scripts/fake_gpu_discovery.sh and schedules them for real (`spark.{worker,executor,task}.resource.gpu.*`);
since no GPU can exist here, the tasks resolve their device with `choose_device(cuda_available=True,
device_count=8)`, everything else (TaskContext resources, Horovod's task info, the environment) is real.
The cluster runs in a subprocess (tests/_gpu_cluster_job.py): the suite keeps one SparkSession.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_GPUS, N_TASKS, PER_TASK = 8, 4, 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_result() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests/_gpu_cluster_job.py"), str(N_GPUS), str(N_TASKS),
                           str(PER_TASK)], env=env, capture_output=True, text=True, timeout=1500)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"cluster job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _check_tasks(rows: list[dict], key: str) -> None:
    for r in rows:
        spark = r["spark"].split(",") if isinstance(r["spark"], str) else r["spark"]
        seen = r["seen"].split(",") if isinstance(r["seen"], str) else r["seen"]
        assert len(spark) == PER_TASK and seen == spark, r  # mmrank reads exactly what Spark gave the task
        assert r["index"] == int(spark[0]), r                 # and trains/encodes on the first of them
    indices = [r["index"] for r in rows]
    assert len(set(indices)) == len(indices), f"{key}: two tasks resolved the same GPU: {rows}"


def test_concurrent_tasks_each_resolve_the_gpu_spark_gave_them(cluster_result):
    rows = cluster_result["barrier"]  # barrier stage: all N_TASKS hold their GPUs at the same time
    assert sorted(r["partition"] for r in rows) == list(range(N_TASKS))
    _check_tasks(rows, "barrier")
    held = sorted(a for r in rows for a in r["spark"])
    assert held == sorted(str(i) for i in range(N_GPUS))  # together they use every GPU, none twice


def test_map_in_pandas_tasks_resolve_their_gpu(cluster_result):
    rows = cluster_result["pandas"]  # the featurize / scoring path: iterator mapInPandas in Python workers
    assert sum(r["rows"] for r in rows) == 4 * N_TASKS
    _check_tasks(rows, "pandas")


def test_horovod_ranks_use_the_gpu_of_their_spark_task(cluster_result):
    rows = cluster_result["horovod"]  # a Horovod rank is a subprocess of its Spark task: no TaskContext there
    assert sorted(r["rank"] for r in rows) == [0, 1]
    _check_tasks(rows, "horovod")
