"""Scoring throughput: the Spark path (iterator mapInPandas, model cached per worker) vs the same model called
directly in one process on the same batches; fp32 and int8 (dynamic quantization); int8 vs fp32 NDCG.

    python bench/score.py                       # standalone: random features + a fresh FusionRanker artifact
    python bench/score.py --pairs 100000 --batch-size 1024
    python bench/score.py --lakehouse           # also: real test-split lists + latest model of conf's lakehouse

Fairness: the same pairs, the same `--batch-size` chunks and the same thread budget. Spark runs
`spark.master` (local[T]) task slots x 1 torch thread each (spark.task.cpus = 1); the direct run gets one
process with T torch threads, and also 1 thread (the best of the two is the baseline of the ratio, which
favours the direct path). Spark timing starts from a cached, materialised DataFrame of pairs with features
and ends when every scored row has been produced (`noop` sink), so it includes the JVM -> Arrow transfer
to the Python workers, Arrow -> numpy conversion, batching, and the return trip; the direct timing starts
from the same batches already as numpy matrices (model time only: the strictest baseline).
The score stage uses `mapInArrow`; the `mapInPandas` column shows the same scorer fed through pandas.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmrank.modalities import PRODUCT_MODALITIES  # noqa: E402

DIMS = {"text": 384, "image": 512, "audio": 128}  # MiniLM text, ResNet-18 image, log-mel CNN audio sizes


def random_pairs(n: int, n_queries: int, seed: int = 0, missing: float = 0.1) -> pd.DataFrame:
    """n pairs over n_queries queries with random features; `missing` of image/audio (and query audio) absent."""
    rng = np.random.default_rng(seed)
    q = {m: rng.normal(size=(n_queries, DIMS[m])).astype(np.float32) for m in ("text", "audio")}
    qi = np.arange(n) % n_queries
    cols = {"query_id": [f"q{i:06d}" for i in qi], "product_id": [f"p{i:08d}" for i in range(n)]}
    for m in ("text", "audio"):
        vals = list(q[m][qi])
        if m == "audio":
            drop = rng.random(n_queries) < 0.7  # most queries are typed
            vals = [None if drop[i] else v for i, v in zip(qi, vals)]
        cols[f"q_{m}"] = vals
    for m in PRODUCT_MODALITIES:
        arr = rng.normal(size=(n, DIMS[m])).astype(np.float32)
        gone = rng.random(n) < (missing if m != "text" else 0.0)
        cols[f"p_{m}"] = [None if g else a for g, a in zip(gone, arr)]
    return pd.DataFrame(cols)


def synthetic_grades(pairs: pd.DataFrame) -> np.ndarray:
    """Hidden truth for the standalone NDCG check: grade 0..3 from the query-product text cosine quartiles."""
    qt, pt = np.stack(pairs["q_text"].to_numpy()), np.stack(pairs["p_text"].to_numpy())
    cos = (qt * pt).sum(1) / (np.linalg.norm(qt, axis=1) * np.linalg.norm(pt, axis=1))
    return np.digitize(cos, np.quantile(cos, [0.5, 0.8, 0.95])).astype(np.float64)


def ndcg_of(pairs: pd.DataFrame, scores: np.ndarray, grades: np.ndarray, k: int = 10) -> float:
    from mmrank.ranker.metrics import has_relevant, mean_metric, ndcg_at_k

    df = pd.DataFrame({"q": pairs["query_id"].to_numpy(), "s": scores, "g": grades})
    L = int(df.groupby("q").size().max())
    S, G = [], []
    for _, g in df.groupby("q", sort=True):
        pad = L - len(g)
        S.append(np.concatenate([g["s"].to_numpy(), np.zeros(pad)]))
        G.append(np.concatenate([g["g"].to_numpy(), -np.ones(pad)]))
    S, G = np.stack(S), np.stack(G)
    return mean_metric(ndcg_at_k(S, G, k), has_relevant(G), "skip")


def stacked(frames: list[pd.DataFrame], dims) -> list[tuple[dict, dict]]:
    """The batches as ready numpy matrices + masks (what `score_pairs` takes): the direct path then times the
    model only, the strictest baseline for the Spark path (which also converts Arrow columns)."""
    from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
    from mmrank.scoring.scorer import column_matrix

    out = []
    for f in frames:
        q, qm, p, pm = {}, [], {}, []
        for m in QUERY_MODALITIES:
            q[m], pres = column_matrix(f[f"q_{m}"], dims[m], m)
            qm.append(pres)
        for m in PRODUCT_MODALITIES:
            p[m], pres = column_matrix(f[f"p_{m}"], dims[m], m)
            pm.append(pres)
        q["mask"], p["mask"] = np.stack(qm, 1), np.stack(pm, 1)
        out.append((q, p))
    return out


def time_direct(model, batches, dims, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    import torch

    from mmrank.scoring.scorer import score_pairs

    torch.set_num_threads(threads)
    score_pairs(model, *batches[0], dims)  # warm-up
    best, scores = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [score_pairs(model, q, p, dims)[0] for q, p in batches]
        best = min(best, time.perf_counter() - t0)
        scores = np.concatenate(out)
    return best, scores


def time_spark(df, artifacts_dir: str, version: str, quantize: bool, batch_size: int, engine: str,
               repeats: int) -> float:
    from mmrank.scoring.scorer import SCORED_SCHEMA, make_arrow_partition_scorer, make_partition_scorer

    if engine == "arrow":
        fn = make_arrow_partition_scorer(artifacts_dir, version, quantize, batch_size)
        run = lambda: df.mapInArrow(fn, SCORED_SCHEMA).write.format("noop").mode("overwrite").save()  # noqa
    else:
        fn = make_partition_scorer(artifacts_dir, version, quantize, batch_size)
        run = lambda: df.mapInPandas(fn, SCORED_SCHEMA).write.format("noop").mode("overwrite").save()  # noqa
    run()  # warm-up: python workers start and load (and cache) the model
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def task_slots(spark) -> int:
    """Concurrent Spark tasks: N of local[N] (local[*] = cores), else the default parallelism."""
    import os
    import re

    master = spark.sparkContext.master
    m = re.match(r"local\[(\d+|\*)", master)
    if m:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1))
    return spark.sparkContext.defaultParallelism


def lakehouse_ndcg(lh, artifacts_dir: str) -> tuple[float, float, str] | None:
    """NDCG@10 of the latest model and its int8 copy on the test split of training_lists (if any)."""
    import torch

    from mmrank.ranker.metrics import has_relevant, mean_metric, ndcg_at_k
    from mmrank.scoring.scorer import load_scorer, resolve_version
    from mmrank.stages.training_lists import load_split

    if not lh.exists("training_lists"):
        return None
    batch = load_split(lh, "test")
    if not batch:
        return None
    version = resolve_version(artifacts_dir)
    res = []
    for q in (False, True):
        model, _ = load_scorer(artifacts_dir, version, q)
        with torch.inference_mode():
            s = model({k: v.to("cpu") for k, v in batch.items()}).float().numpy()
        g = batch["grades"].numpy()
        res.append(mean_metric(ndcg_at_k(s, g, 10), has_relevant(g), "skip"))
    return res[0], res[1], version


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60_000)
    ap.add_argument("--queries", type=int, default=3_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conf", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--lakehouse", action="store_true",
                    help="also measure int8 vs fp32 NDCG on the conf lakehouse's test split with its latest model")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    from mmrank.config import TrainConf, load_config
    from mmrank.lakehouse import Lakehouse
    from mmrank.ranker.artifact import save_artifact
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.fit import build_model
    from mmrank.scoring.scorer import load_scorer
    from mmrank.spark import get_spark

    tmp = Path(tempfile.mkdtemp(prefix="mmrank-bench-"))
    overrides = list(args.overrides)
    if not args.lakehouse:
        overrides = [f"storage.root={tmp}/lakehouse", f"storage.work_dir={tmp}/work"] + overrides
    cfg = load_config(args.conf, overrides)
    spark = get_spark(cfg)
    slots = task_slots(spark)
    lh = Lakehouse(spark, cfg)

    # the model: a freshly initialised FusionRanker saved as an artifact (same path the score stage loads)
    adir = str(tmp / "artifacts")
    model = build_model(ModalityDims(**DIMS), TrainConf())
    version = save_artifact(model, {"run_date": "2026-01-01", "note": "bench/score.py random init"}, adir)

    pairs = random_pairs(args.pairs, args.queries)
    frames = [pairs.iloc[i:i + args.batch_size].reset_index(drop=True)
              for i in range(0, len(pairs), args.batch_size)]
    # Spark input: the same pairs (ordered by query as the score stage does), cached in memory
    sdf = (spark.createDataFrame(pairs, "query_id string, product_id string, q_text array<float>, "
                                        "q_audio array<float>, p_text array<float>, p_image array<float>, "
                                        "p_audio array<float>")
           .repartition(slots, "query_id").sortWithinPartitions("query_id", "product_id").cache())
    sdf.count()

    results = {}
    for quant in (False, True):
        m, _ = load_scorer(adir, version, quant)
        dims = m.dims.as_dict()
        batches = stacked(frames, dims)
        d_budget, s_budget = time_direct(m, batches, dims, slots, args.repeats)
        d_one, _ = time_direct(m, batches, dims, 1, args.repeats)
        sp_arrow = time_spark(sdf, adir, version, quant, args.batch_size, "arrow", args.repeats)
        sp_pandas = time_spark(sdf, adir, version, quant, args.batch_size, "pandas", args.repeats)
        results[quant] = {"spark": args.pairs / sp_arrow, "spark_pandas": args.pairs / sp_pandas,
                          "direct_budget": args.pairs / d_budget, "direct_1": args.pairs / d_one,
                          "scores": s_budget}
    torch.set_num_threads(slots)
    grades = synthetic_grades(pairs)
    nd = {q: ndcg_of(pairs, results[q]["scores"], grades) for q in (False, True)}
    top_agree = np.corrcoef(results[False]["scores"], results[True]["scores"])[0, 1]

    def row(q):
        r = results[q]
        direct = max(r["direct_budget"], r["direct_1"])
        return r["spark"], r["spark_pandas"], r["direct_budget"], r["direct_1"], r["spark"] / direct

    f, i8 = row(False), row(True)
    print(f"\nscoring throughput, pairs/s ({args.pairs} pairs, {args.queries} queries, batch {args.batch_size}, "
          f"dims {DIMS}, thread budget {slots}: Spark local[{slots}] x 1 torch thread per task vs 1 process; "
          f"torch {torch.__version__}, best of {args.repeats})\n")
    print(f"| model | spark mapInArrow (score stage) | spark mapInPandas | direct ({slots} threads) "
          "| direct (1 thread) | spark (arrow) / best direct |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("fp32", f), ("int8 (dynamic)", i8)):
        print(f"| {name} | {r[0]:,.0f} | {r[1]:,.0f} | {r[2]:,.0f} | {r[3]:,.0f} | {r[4]:.2f}x |")
    print(f"\nint8 / fp32 throughput: spark {i8[0] / f[0]:.2f}x, direct {max(i8[2], i8[3]) / max(f[2], f[3]):.2f}x")
    print(f"int8 - fp32 NDCG@10 (random-init model vs synthetic text-cosine grades, {args.queries} lists): "
          f"{nd[True] - nd[False]:+.4f} (fp32 {nd[False]:.4f}, int8 {nd[True]:.4f}); "
          f"score correlation {top_agree:.4f}")
    if args.lakehouse:
        got = lakehouse_ndcg(lh, str(lh.paths.artifacts))
        if got:
            print(f"int8 - fp32 NDCG@10 on the lakehouse test split (model {got[2]}): {got[1] - got[0]:+.4f} "
                  f"(fp32 {got[0]:.4f}, int8 {got[1]:.4f})")
        else:
            print("no training_lists test split / model in the lakehouse: NDCG on real lists not measured")
    sdf.unpersist()
    return 0


if __name__ == "__main__":
    sys.exit(main())
