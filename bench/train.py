"""Benchmark the training backends: throughput and time to a target validation NDCG@10.

    python bench/train.py [--queries 480] [--epochs 4] [--loader parquet] [--num-proc 2] [--sample]

Data: synthetic `training_lists` with the sample encoders' dims (MiniLM text 384, ResNet-18 image 512,
log-mel audio 232) and list_size 20 in a temporary lakehouse; `--sample` uses the configured lakehouse's
`training_lists` instead (run the pipeline up to `training_lists` first).
Throughput = train lists over all ranks / training seconds (rank 0's epoch timer, validation excluded).
Scaling efficiency = throughput_N / (N * throughput_1). Time to target = training seconds until validation
NDCG@10 first reaches `--target-frac` x the local backend's best. Wall = whole call incl. process start-up.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrank.config import load_config  # noqa: E402
from mmrank.distributed.backends import train_with_backend, world_size_of  # noqa: E402
from mmrank.lakehouse import Lakehouse  # noqa: E402
from mmrank.modalities import ModalityDims  # noqa: E402

SAMPLE_DIMS = ModalityDims(text=384, image=512, audio=232)


def _time_to(history: list[dict], target: float) -> float | None:
    t = 0.0
    for h in history:
        t += h["seconds"]
        if h["val_ndcg@10"] >= target:
            return t
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=480)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--loader", choices=("parquet", "petastorm"), default="parquet")
    p.add_argument("--backends", default="local,horovod,torch_distributor")
    p.add_argument("--target-frac", type=float, default=0.97)
    p.add_argument("--sample", action="store_true", help="use the configured lakehouse's training_lists")
    args = p.parse_args(argv)

    from mmrank.spark import get_spark
    from mmrank.stages.training_lists import list_dims

    root = Path(tempfile.mkdtemp(prefix="mmrank-bench-"))
    common = [f"train.max_epochs={args.epochs}", "train.patience=100", f"train.num_proc={args.num_proc}",
              f"train.data_loader={args.loader}"]
    paths = [] if args.sample else [f"storage.root={root}", f"storage.work_dir={root}/_work",
                                    f"storage.artifacts_dir={root}/_artifacts"]
    cfg = load_config(None, common + paths)
    lh = Lakehouse(get_spark(cfg), cfg)
    if args.sample:
        dims, source = list_dims(lh), "sample lakehouse training_lists"
    else:
        from mmrank.testing.lists import synthetic_lists_df

        dims, source = SAMPLE_DIMS, f"synthetic training_lists ({args.queries} queries)"
        lists = synthetic_lists_df(lh.spark, args.queries, cfg.train.list_size, dims, seed=1)
        lh.overwrite("training_lists", lists.repartition(4))
    n_train = lh.read("training_lists").where("split = 'train'").count()

    rows = []
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        out = train_with_backend(lh, cfg.train, dims, backend=backend)
        wall = time.perf_counter() - t0
        secs = sum(h["seconds"] for h in out.fit.history)
        rows.append({"backend": backend, "n": world_size_of(backend, args.num_proc), "wall": wall,
                     "thr": n_train * out.fit.epochs_run / secs, "hist": out.fit.history,
                     "ndcg": out.fit.best_metrics["ndcg@10"]})
    base = next((r for r in rows if r["n"] == 1), rows[0])
    target = args.target_frac * base["ndcg"]

    print(f"\n{source}, dims {dims}, list_size {cfg.train.list_size}, {n_train} train lists, "
          f"global batch {cfg.train.batch_size}, {args.epochs} epochs, loader {args.loader}; "
          f"target NDCG@10 = {args.target_frac} x local best = {target:.4f}\n")
    print("| backend | procs | lists/s | speed-up | scaling eff. | best val NDCG@10 | time to target (s) "
          "| wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["thr"] / base["thr"]
        ttt = _time_to(r["hist"], target)
        print(f"| {r['backend']} | {r['n']} | {r['thr']:.1f} | {speed:.2f} | {speed / r['n']:.2f} | "
              f"{r['ndcg']:.4f} | {'not reached' if ttt is None else f'{ttt:.1f}'} | {r['wall']:.1f} |")


if __name__ == "__main__":
    main()
