"""A small Spark application for the cluster tests, submitted with scripts/submit.sh. It starts its session
with `mmrank.spark.get_spark` (as every job does) and writes OUT (JSON):

- `probe`: what the driver and its tasks saw: the master, the session's settings, and per task the executor's
  working directory, its Python and where `mmrank` was imported from;
- `train`: the checks of tests/test_distributed.py on the cluster: Horovod (petastorm) and TorchDistributor
  (parquet, resumed from a checkpoint) against the local backend on the same synthetic lists, with the
  petastorm cache and the checkpoints on `storage.work_dir`, and the Spark tasks each training ran as.

    scripts/submit.sh [--master URL] tests/cluster_app.py probe|train OUT [--set key=value ...]
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the driver runs from the checkout, like jobs/*.py


def probe(partition):
    import os
    import sys

    import mmrank

    for _ in partition:
        yield {"pid": os.getpid(), "cwd": os.getcwd(), "python": sys.executable, "prefix": sys.prefix,
               "mmrank": mmrank.__file__, "pythonpath": os.environ.get("PYTHONPATH", "")}


def _tasks_of_group(sc, group: str) -> int:
    """Spark tasks that ran in the jobs of `group` (the distributed ranks, when they are Spark tasks)."""
    st = sc.statusTracker()
    return sum(st.getStageInfo(s).numCompletedTasks for j in st.getJobIdsForGroup(group)
               for s in st.getJobInfo(j).stageIds if st.getStageInfo(s) is not None)


def train(spark, cfg) -> dict:
    import datetime as dt

    from mmrank.distributed.backends import train_with_backend
    from mmrank.distributed.loaders import make_loader, prepare_specs
    from mmrank.lakehouse import Lakehouse
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.batch import concat_batches
    from mmrank.ranker.fit import validation_sums
    from mmrank.stages import train as train_stage
    from mmrank.testing.lists import synthetic_lists_df

    dims = ModalityDims(text=16, image=8, audio=8)
    lh = Lakehouse(spark, cfg)
    lh.overwrite("training_lists", synthetic_lists_df(spark, 120, cfg.train.list_size, dims, seed=11,
                                                      splits=(0.6, 0.4)).repartition(2))
    with prepare_specs(lh, cfg.train, dims, 1, kind="parquet") as specs:
        val = concat_batches(list(make_loader(specs["validation"]).epoch_batches(0)))

    def ndcg(model) -> float:
        s = validation_sums(model, [val])
        return s[2] / s[3]

    sc = spark.sparkContext
    out: dict = {}
    local = train_with_backend(lh, cfg.train, dims, backend="local", data_loader="parquet")
    out["local"] = {"ndcg": local.fit.best_metrics["ndcg@10"], "epochs": local.fit.epochs_run}
    sc.setJobGroup("mmrank-horovod", "horovod")
    hv = train_with_backend(lh, cfg.train, dims, backend="horovod", data_loader="petastorm")
    out["horovod"] = {"ndcg": hv.fit.best_metrics["ndcg@10"], "model_ndcg": ndcg(hv.model),
                      "world": hv.world_size, "epochs": hv.fit.epochs_run}
    # TorchDistributor: a 1-epoch run leaves a checkpoint on shared storage; the stage resumes it
    run_date = dt.date(2026, 11, 21)
    lh_td = Lakehouse(spark, cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"backend": "torch_distributor", "data_loader": "parquet"})}))
    ckpt = lh_td.paths.checkpoints(train_stage.run_key(run_date, lh_td.cfg.train, "torch_distributor",
                                                       lh_td.version("training_lists")))
    short = lh_td.cfg.train.model_copy(update={"max_epochs": 1})
    first = train_with_backend(lh_td, short, dims, checkpoint_dir=ckpt)
    ckpt_written = (ckpt / "checkpoint.pt").exists()
    resumed, version = train_stage.train_and_save(lh_td, run_date)
    full = train_with_backend(lh_td, lh_td.cfg.train, dims)
    from mmrank.ranker.artifact import load_artifact

    model, meta = load_artifact(lh_td.paths.artifacts, version)
    out["torch_distributor"] = {
        "ndcg": resumed.fit.best_metrics["ndcg@10"], "model_ndcg": ndcg(resumed.model),
        "artifact_ndcg": ndcg(model), "world": resumed.world_size, "epochs": resumed.fit.epochs_run,
        "first_epoch_equal": [h["val_ndcg@10"] for h in first.fit.history] == [
            h["val_ndcg@10"] for h in resumed.fit.history][:1],
        "resumed_history": [h["val_ndcg@10"] for h in resumed.fit.history],
        "full_history": [h["val_ndcg@10"] for h in full.fit.history],
        "max_weight_diff": max(float((resumed.model.state_dict()[k] - v).abs().max())
                               for k, v in full.model.state_dict().items()),
        "checkpoint": str(ckpt), "checkpoint_written": ckpt_written, "checkpoint_cleaned": not ckpt.exists(),
        "meta": [meta["backend"], meta["world_size"], meta["data_loader"]]}
    # Horovod's ranks are the tasks of its own job groups; TorchDistributor's barrier job shares its group with
    # the jobs that prepare the data, so its ranks are shown by its own log line (local_mode=False, executors)
    out["tasks"] = {"horovod": sum(_tasks_of_group(sc, f"horovod.spark.run.{i}") for i in range(3))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("probe", "train"))
    ap.add_argument("out")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from mmrank.config import load_config
    from mmrank.spark import get_spark

    cfg = load_config(None, args.overrides)
    spark = get_spark(cfg)
    sc = spark.sparkContext
    result = {"master": sc.master, "conf": dict(sc.getConf().getAll())}
    if args.mode == "probe":
        result["tasks"] = sc.parallelize(range(6), 6).mapPartitions(probe).collect()
        result["block_managers"] = sc._jsc.sc().getExecutorMemoryStatus().keys().mkString(",").split(",")  # noqa: SLF001
    else:
        result.update(train(spark, cfg))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    spark.stop()


if __name__ == "__main__":
    main()
