"""Scoring throughput: the score stage's Spark path (keys only, features looked up from a bucketed snapshot,
each query and product encoded once) vs the same model called directly on the same pairs; fp32 and int8.

    python bench/score.py                                   # 200k pairs, 4000 queries
    python bench/score.py --pairs 60000 --queries 1200 --repeats 2
    python bench/score.py --lakehouse                       # also int8 vs fp32 NDCG on conf's lakehouse lists

Data: `--pairs` pairs over `--queries` queries, one distinct product per pair (the worst case for encoding once:
no product is shared), random features of the sizes of the default encoders (text 384, image 512, audio 128),
10% of products without image / audio, 30% of queries with audio, and 15 lexical features per pair that travel
with its keys (as the score stage's `p_lex`); the model is the default `TrainConf()` (prior + residual, lexical
features, alignment), randomly initialised. They are generated inside Spark tasks into
real `product_features` / `query_features` Delta tables (nothing passes through the driver), and the direct
path generates the identical arrays in memory (the same function of the id block).

Spark timing = what the score stage does after choosing the pairs: the feature snapshot
(`snapshot.snapshot_tables`: the tables are stored in id buckets, so it lists their files and writes nothing) +
score every pair (`lookup.score_by_key`, each task reading its buckets' files) until every scored row has been
produced (`noop` sink). Direct timing starts from the features already as numpy matrices in memory (model time only,
the strictest baseline): encode every query and product once, score the pairs in `score.batch_size` chunks,
with the same thread budget split two ways: 1 process x T threads, T processes x 1 thread (each scoring its
share of the pairs); the better is the baseline of the first ratio (1 process x 1 thread is shown for
reference). That baseline starts with the features in memory; a direct scorer would first have to read them from
where they live, so a second ratio compares with the better of 1 process x T threads reading both feature
tables' Parquet files (pyarrow, no Spark) and then scoring, and T processes x 1 thread each reading every query
and its share of the product files and scoring those products' pairs: the like-for-like comparison with the
Spark timing, which includes its reads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DIMS = {"text": 384, "image": 512, "audio": 128}  # MiniLM text, ResNet-18 image, log-mel CNN audio sizes
BLOCK = 1024  # ids per generated block (the unit both paths generate the same way)
MISSING = 0.1
VOICE = 0.3


def block_features(side: str, block: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ids [k] (and their numbers `num`) and per modality [k, D] float32 + mask [k, M] of ids block*BLOCK ..
    min(n, (block+1)*BLOCK)."""
    lo, hi = block * BLOCK, min(n, (block + 1) * BLOCK)
    rng = np.random.default_rng([seed, 0 if side == "queries" else 1, block])
    mods = ("text", "audio") if side == "queries" else ("text", "image", "audio")
    out = {m: rng.normal(size=(hi - lo, DIMS[m])).astype(np.float32) for m in mods}
    u = rng.random((hi - lo, len(mods)))
    if side == "queries":
        mask = np.stack([np.ones(hi - lo), u[:, 1] < VOICE], axis=1)
    else:
        mask = np.stack([np.ones(hi - lo), u[:, 1] >= MISSING, u[:, 2] >= MISSING], axis=1)
    out["mask"] = mask.astype(np.float32)
    out["ids"] = np.array([f"{'q' if side == 'queries' else 'p'}{i:08d}" for i in range(lo, hi)], dtype=object)
    out["num"] = np.arange(lo, hi)
    return out


def all_features(side: str, n: int) -> dict[str, np.ndarray]:
    parts = [block_features(side, b, n) for b in range(-(-n // BLOCK))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def write_tables(lh, n_queries: int, n_products: int) -> None:
    """`query_features` / `product_features` rows generated in Spark tasks (one task per id block)."""
    import pyarrow as pa

    from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

    for side, table, n, mods in (("queries", "query_features", n_queries, QUERY_MODALITIES),
                                 ("products", "product_features", n_products, PRODUCT_MODALITIES)):
        key = "query_id" if side == "queries" else "product_id"

        def gen(batches, side=side, n=n, mods=mods, key=key):
            for b in batches:
                for block in b.column("id").to_numpy():
                    f = block_features(side, int(block), n)
                    for i, m in enumerate(mods):
                        have = f["mask"][:, i] > 0
                        k, d = int(have.sum()), DIMS[m]
                        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (k + 1) * d, d, dtype=np.int32)),
                                                       pa.array(f[m][have].ravel()))
                        yield pa.RecordBatch.from_arrays(
                            [pa.array(f["ids"][have], pa.string()), pa.array([m] * k), emb,
                             pa.array(np.full(k, d, np.int32)), pa.array(["bench"] * k), pa.array(["v1"] * k),
                             pa.array(f["ids"][have], pa.string())],
                            names=[key, "modality", "embedding", "dim", "encoder", "encoder_version",
                                   "content_hash"])

        blocks = -(-n // BLOCK)
        rows = lh.spark.range(0, blocks, 1, max(1, min(blocks, 16))).mapInArrow(
            gen, f"{key} string, modality string, embedding array<float>, dim int, encoder string, "
                 "encoder_version string, content_hash string")
        from pyspark.sql import functions as F
        lh.overwrite(table, rows.withColumn("run_date", F.lit("2026-01-01").cast("date")))


def pair_lex(ids: np.ndarray) -> np.ndarray:
    """[n, N_LEX] lexical features of pairs `ids` (a fixed function of the pair id, the same in Spark)."""
    from mmrank.lexical import N_LEX

    return (((ids[:, None] * 7 + np.arange(N_LEX) * 13) % 17) / 4).astype(np.float32)


def pair_keys(spark, n_pairs: int, n_queries: int):
    """Pair keys plus `p_lex`, the per-pair lexical features that travel with the keys (as in the score stage)."""
    from pyspark.sql import functions as F

    from mmrank.lexical import N_LEX

    lex = F.array(*[(((F.col("id") * 7 + i * 13) % 17) / 4).cast("float") for i in range(N_LEX)])
    return spark.range(n_pairs).select(F.format_string("q%08d", F.col("id") % n_queries).alias("query_id"),
                                       F.format_string("p%08d", F.col("id")).alias("product_id"), lex.alias("p_lex"))


def time_spark(lh, pairs, adir: str, version: str, quantize: bool, batch_size: int, bucket_mb: float
               ) -> tuple[float, float]:
    """(seconds for snapshot + scoring, seconds for the snapshot alone: listing the tables' bucket files)."""
    from mmrank.scoring.lookup import score_by_key
    from mmrank.scoring.snapshot import snapshot_tables, task_slots

    root = tempfile.mkdtemp(prefix="mmrank-score-snap-", dir=str(lh.paths.work()))
    try:
        t0 = time.perf_counter()
        snap = snapshot_tables(lh, root, DIMS, bucket_mb, task_slots(lh.spark))
        t1 = time.perf_counter()
        score_by_key(pairs, snap, adir, version, quantize, batch_size, lex_col="p_lex").write.format("noop").mode(
            "overwrite").save()
        return time.perf_counter() - t0, t1 - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def read_features(location: str, side: str, n: int, share: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The features of one side read from its Delta table's Parquet files (`location`) with pyarrow (no Spark;
    the tables are written once, so every data file is current): what a direct scorer must do first when
    features live in tables. Same layout as `all_features` (rows in id order). `share` (k, of): only the data
    files k, k + of, ... (each holds whole products: the table is stored in id buckets)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
    from mmrank.storage import filesystem

    key, mods = ("query_id", QUERY_MODALITIES) if side == "queries" else ("product_id", PRODUCT_MODALITIES)
    fs, path = filesystem(location)  # local or any fsspec store, as the snapshot reader
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    if share is not None:
        ds = pads.dataset(sorted(ds.files)[share[0]::share[1]], filesystem=fs, format="parquet")
    t = ds.to_table(columns=[key, "modality", "embedding"])
    rows = pc.cast(pc.utf8_slice_codeunits(t.column(key), 1), "int64").to_numpy()
    out = {"mask": np.zeros((n, len(mods)), np.float32), "num": np.arange(n)}
    modality = t.column("modality")
    for i, m in enumerate(mods):
        sel = pc.equal(modality, m)
        idx = rows[sel.to_numpy(zero_copy_only=False)]
        emb = t.column("embedding").filter(sel).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        out[m] = np.zeros((n, DIMS[m]), np.float32)
        out[m][idx] = emb.reshape(len(idx), DIMS[m])
        out["mask"][idx, i] = 1.0
    return out


def time_direct_with_read(lh, model, n_queries: int, n_pairs: int, batch_size: int, threads: int) -> float:
    """Seconds to read both feature tables (pyarrow) and score every pair in one process x `threads`."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    q = read_features(lh.location("query_features"), "queries", n_queries)
    p = read_features(lh.location("product_features"), "products", n_pairs)
    direct_scores(model, q, p, np.arange(n_pairs) % n_queries, np.arange(n_pairs), batch_size)
    return time.perf_counter() - t0


def read_shard_work(arg: tuple) -> Callable[[], np.ndarray]:
    """Process setup for the direct scorer that reads the tables, split over processes: one thread and the model;
    the work reads every query's features and its share of the product files, and scores those products' pairs
    (pair j's product is product j)."""
    import torch

    from mmrank.scoring.scorer import load_scorer

    adir, version, quant, locations, n_pairs, n_queries, k, of, bs = arg
    torch.set_num_threads(1)
    model, _ = load_scorer(adir, version, quant)

    def work() -> np.ndarray:
        q = read_features(locations[0], "queries", n_queries)
        p = read_features(locations[1], "products", n_pairs, (k, of))
        pi = np.flatnonzero(p["mask"][:, 0] > 0)  # every product has text: the products of this share
        return direct_scores(model, q, p, pi % n_queries, pi, bs)
    return work


def direct_scores(model, q: dict, p: dict, qi: np.ndarray, pi: np.ndarray, batch_size: int) -> np.ndarray:
    from mmrank.scoring.lookup import encode_side, score_indexed

    return score_indexed(model, encode_side(model, "queries", q), encode_side(model, "products", p), qi, pi,
                         batch_size, pair_lex(p["num"][pi]))[0]


def features_range(side: str, n: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The generated features of ids lo..hi-1 (whole blocks generated, then cut)."""
    parts = [block_features(side, b, n) for b in range(lo // BLOCK, -(-hi // BLOCK))]
    f = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    off = (lo // BLOCK) * BLOCK
    return {k: v[lo - off:hi - off] for k, v in f.items()}


def shard_work(arg: tuple) -> Callable[[], np.ndarray]:
    """Process setup for `side_by_side`: one thread, the model, queries and this shard's products; the work
    scores the shard's pairs (pair j's product is product j)."""
    import torch

    from mmrank.scoring.scorer import load_scorer

    adir, version, quant, n_pairs, n_queries, lo, hi, bs = arg
    torch.set_num_threads(1)
    model, _ = load_scorer(adir, version, quant)
    q, p = all_features("queries", n_queries), features_range("products", n_pairs, lo, hi)
    qi = np.arange(lo, hi) % n_queries
    return lambda: direct_scores(model, q, p, qi, np.arange(hi - lo), bs)


def time_direct(model, q, p, qi, pi, batch_size: int, threads: int) -> tuple[float, np.ndarray]:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    s = direct_scores(model, q, p, qi, pi, batch_size)
    return time.perf_counter() - t0, s


def synthetic_grades(q: dict, p: dict, qi: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Hidden truth for the int8 NDCG check: grade 0..3 from the query-product text cosine quartiles."""
    qt, pt = q["text"][qi], p["text"][pi]
    cos = (qt * pt).sum(1) / (np.linalg.norm(qt, axis=1) * np.linalg.norm(pt, axis=1))
    return np.digitize(cos, np.quantile(cos, [0.5, 0.8, 0.95])).astype(np.float64)


def ndcg_of(qi: np.ndarray, scores: np.ndarray, grades: np.ndarray, k: int = 10) -> float:
    from mmrank.ranker.metrics import has_relevant, mean_metric, ndcg_at_k

    order = np.argsort(qi, kind="stable")
    q, s, g = qi[order], scores[order], grades[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    L = int(np.diff(np.r_[starts, len(q)]).max())
    S, G = np.zeros((len(starts), L)), -np.ones((len(starts), L))
    for r, (a, b) in enumerate(zip(starts, np.r_[starts[1:], len(q)])):
        S[r, :b - a], G[r, :b - a] = s[a:b], g[a:b]
    return mean_metric(ndcg_at_k(S, G, k), has_relevant(G), "skip")


def lakehouse_ndcg(lh, artifacts_dir: str) -> tuple[float, float, str] | None:
    """NDCG@10 of the latest model and its int8 copy on (a bounded sample of) the test lists, if any."""
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
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=4_000)
    ap.add_argument("--batch-size", type=int, default=None, help="default: score.batch_size")
    ap.add_argument("--repeats", type=int, default=2)
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
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.artifact import save_artifact
    from mmrank.ranker.fit import build_model
    from mmrank.scoring.snapshot import task_slots
    from mmrank.scoring.scorer import load_scorer
    from mmrank.spark import get_spark
    from mmrank.testing.timing import side_by_side

    tmp = Path(tempfile.mkdtemp(prefix="mmrank-bench-score-"))
    bench_lh = [f"storage.root={tmp}/lakehouse", f"storage.work_dir={tmp}/work"]
    cfg = load_config(args.conf, bench_lh + list(args.overrides))
    spark = get_spark(cfg)
    slots = min(task_slots(spark), os.cpu_count() or 1)  # the cores Spark runs tasks on (local[N])
    lh = Lakehouse(spark, cfg)
    bs = args.batch_size or cfg.score.batch_size
    load = os.getloadavg()
    try:
        write_tables(lh, args.queries, args.pairs)
        pairs = pair_keys(spark, args.pairs, args.queries).cache()
        pairs.count()
        adir = str(tmp / "artifacts")
        version = save_artifact(build_model(ModalityDims(**DIMS), TrainConf()),
                                {"run_date": "2026-01-01", "note": "bench/score.py random init"}, adir)
        q, p = all_features("queries", args.queries), all_features("products", args.pairs)
        qi, pi = np.arange(args.pairs) % args.queries, np.arange(args.pairs)
        results = {}
        for quant in (False, True):
            model, _ = load_scorer(adir, version, quant)
            time_spark(lh, pairs.limit(4 * bs), adir, version, quant, bs, cfg.score.bucket_mb)  # warm-up
            sp = [time_spark(lh, pairs, adir, version, quant, bs, cfg.score.bucket_mb) for _ in range(args.repeats)]
            direct: dict[str, float] = {}
            for name, threads in ((f"1 proc x {slots} threads", slots), ("1 proc x 1 thread", 1)):
                time_direct(model, q, {k: v[:4 * bs] for k, v in p.items()}, qi[:4 * bs], pi[:4 * bs], bs,
                            threads)  # warm-up
                runs = [time_direct(model, q, p, qi, pi, bs, threads) for _ in range(args.repeats)]
                direct[name] = args.pairs / min(r[0] for r in runs)
                results.setdefault(quant, {})["scores"] = runs[0][1]
            cuts = np.linspace(0, args.pairs, slots + 1).astype(int)
            shards = [(adir, version, quant, args.pairs, args.queries, lo, hi, bs) for lo, hi in zip(cuts, cuts[1:])]
            direct[f"{slots} procs x 1 thread"] = args.pairs / min(side_by_side(shard_work, shards)
                                                                    for _ in range(args.repeats))
            read = {f"1 proc x {slots} threads": args.pairs / min(
                time_direct_with_read(lh, model, args.queries, args.pairs, bs, slots) for _ in range(args.repeats))}
            locations = (lh.location("query_features"), lh.location("product_features"))
            shares = [(adir, version, quant, locations, args.pairs, args.queries, k, slots, bs) for k in range(slots)]
            read[f"{slots} procs x 1 thread"] = args.pairs / min(side_by_side(read_shard_work, shares)
                                                                  for _ in range(args.repeats))
            best = min(sp)
            results[quant].update(spark=args.pairs / best[0], snapshot=best[1], total=best[0], direct=direct,
                                  read=read)
        torch.set_num_threads(slots)
        grades = synthetic_grades(q, p, qi, pi)
        nd = {k: ndcg_of(qi, results[k]["scores"], grades) for k in (False, True)}
        corr = np.corrcoef(results[False]["scores"], results[True]["scores"])[0, 1]
        names = list(results[False]["direct"])
        print(f"\nscoring throughput, pairs/s ({args.pairs} pairs, {args.queries} queries, batch {bs}, dims {DIMS}; "
              f"Spark local[{slots}] = {slots} task slots x 1 torch thread; best of {args.repeats}; torch "
              f"{torch.__version__}; load average before the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              f"on {os.cpu_count()} cores)\n")
        print("| model | Spark: keys + bucketed lookup (score stage) | of which snapshot (s) | "
              + " | ".join(f"direct {n}" for n in names) + " | Spark / best direct (features in memory) | "
              + " | ".join(f"direct {n} incl. reading the tables" for n in results[False]["read"])
              + " | Spark / best direct incl. reading |")
        print("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|")
        for name, quant in (("fp32", False), ("int8 (dynamic)", True)):
            r = results[quant]
            best_direct = max(v for n, v in r["direct"].items() if n != "1 proc x 1 thread")
            print(f"| {name} | {r['spark']:,.0f} | {r['snapshot']:.1f} of {r['total']:.1f} | "
                  + " | ".join(f"{r['direct'][n]:,.0f}" for n in names)
                  + f" | {r['spark'] / best_direct:.2f}x | "
                  + " | ".join(f"{v:,.0f}" for v in r["read"].values())
                  + f" | {r['spark'] / max(r['read'].values()):.2f}x |")
        print(f"\n(best direct = the better of the two ways to use {slots} cores; 1 proc x 1 thread is for reference)")
        print(f"int8 - fp32 NDCG@10 (random-init model vs synthetic text-cosine grades, {args.queries} lists): "
              f"{nd[True] - nd[False]:+.4f} (fp32 {nd[False]:.4f}, int8 {nd[True]:.4f}); "
              f"score correlation {corr:.4f}")
        if args.lakehouse:
            real = Lakehouse(spark, load_config(args.conf, args.overrides))
            got = lakehouse_ndcg(real, str(real.paths.artifacts))
            print(f"int8 - fp32 NDCG@10 on the lakehouse test split (model {got[2]}): {got[1] - got[0]:+.4f} "
                  f"(fp32 {got[0]:.4f}, int8 {got[1]:.4f})" if got else
                  "no training_lists test split / model in the lakehouse: NDCG on real lists not measured")
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
