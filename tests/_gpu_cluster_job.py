"""Run by tests/test_device_cluster.py in a process of its own (pytest's session SparkSession stays the only one
there): a `local-cluster` Spark (a worker and an executor in their own JVMs, Python workers of their own) whose
worker discovers FAKE GPUs through scripts/fake_gpu_discovery.sh (a GPU cannot exist on this machine; the
fake is only the discovery script's output). Tasks ask for `spark.task.resource.gpu.amount` GPUs each and
report which addresses Spark gave them and which CUDA ordinal mmrank's device choice resolves from them:
through a barrier RDD stage (all tasks hold their GPUs at once), a `mapInPandas` stage (the featurize path)
and Horovod on Spark (the training ranks). Prints one line `RESULT <json>`.

Usage: python tests/_gpu_cluster_job.py N_GPUS N_TASKS GPUS_PER_TASK
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def resolved(n_gpus: int) -> tuple[list[str], int]:
    """(addresses Spark gave this task as mmrank reads them, the CUDA ordinal mmrank picks). Only the GPU's
    existence is faked (`cuda_available=True`, `device_count=n_gpus`)."""
    from mmrank.encoders.device import choose_device, task_gpu_addresses

    addresses = task_gpu_addresses()
    device = choose_device("cuda", cuda_available=True, device_count=n_gpus, addresses=addresses,
                           visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return addresses, int(device.index)


def main(n_gpus: int, n_tasks: int, per_task: int) -> None:
    import pandas as pd
    from pyspark.sql import SparkSession

    t0 = time.perf_counter()
    os.environ["MMRANK_FAKE_GPUS"] = str(n_gpus)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter (and its packages)
    spark = (SparkSession.builder.master(f"local-cluster[1,{n_tasks},1024]").appName("mmrank-fake-gpus")
             .config("spark.worker.resource.gpu.amount", str(n_gpus))
             .config("spark.worker.resource.gpu.discoveryScript", str(REPO / "scripts/fake_gpu_discovery.sh"))
             .config("spark.executor.resource.gpu.amount", str(n_gpus))
             .config("spark.task.resource.gpu.amount", str(per_task))
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", str(n_tasks))
             .getOrCreate())
    sc = spark.sparkContext

    def barrier_task(_):
        from pyspark import BarrierTaskContext

        tc = BarrierTaskContext.get()
        tc.barrier()
        seen, index = resolved(n_gpus)
        tc.barrier()  # every task holds its GPUs at the same time
        yield {"partition": tc.partitionId(), "spark": list(tc.resources()["gpu"].addresses), "seen": seen,
               "index": index}

    def pandas_task(batches):
        from pyspark import TaskContext

        for pdf in batches:
            seen, index = resolved(n_gpus)
            tc = TaskContext.get()
            yield pd.DataFrame({"partition": [tc.partitionId()], "spark": [",".join(tc.resources()["gpu"].addresses)],
                                "seen": [",".join(seen)], "index": [index], "rows": [len(pdf)]})

    def horovod_rank():
        import horovod.torch as hvd

        hvd.init()
        try:
            from horovod.spark.task import get_available_devices

            seen, index = resolved(n_gpus)
            return {"rank": hvd.rank(), "spark": list(get_available_devices()), "seen": seen, "index": index}
        finally:
            hvd.shutdown()

    seconds = {"start": time.perf_counter() - t0}
    t = time.perf_counter()
    barrier = sc.parallelize(range(n_tasks), n_tasks).barrier().mapPartitions(barrier_task).collect()
    seconds["barrier"], t = time.perf_counter() - t, time.perf_counter()
    df = spark.range(4 * n_tasks).repartition(n_tasks)
    pandas = [r.asDict() for r in df.mapInPandas(
        pandas_task, "partition int, spark string, seen string, index int, rows int").collect()]
    seconds["pandas"], t = time.perf_counter() - t, time.perf_counter()
    import horovod.spark

    hvd_ranks = horovod.spark.run(horovod_rank, num_proc=2, use_gloo=True, verbose=0)
    seconds["horovod"] = time.perf_counter() - t
    spark.stop()
    print("RESULT " + json.dumps({"barrier": barrier, "pandas": pandas, "horovod": hvd_ranks,
                                  "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
