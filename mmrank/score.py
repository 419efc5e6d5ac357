"""Batch scoring: candidate (query, product) pairs -> trained FusionRanker -> top-N per query in `ranking_scores`.

Reader -> mapper -> writer (as in clip-retrieval):

- reader (`candidate_pairs`): the query log's impressions and/or, per `score.candidates`, the top-K products per
  query by embedding similarity (typed queries: query text vs product text; voice queries: query audio vs
  product audio). Similarity is computed without a cross join: each product partition is scored against a
  broadcast, L2-normalised query matrix keeping a running per-partition top-K (`_partition_topk`), then a
  window keeps the global top-K per query.
- mapper (`score_pairs`, `score_frame`, `score_arrow`): plain PyTorch on numpy arrays, usable outside Spark.
  Inside Spark it runs in an iterator `mapInArrow` (default; `score_df(engine="pandas")` = the same scorer
  through `mapInPandas`, ~1.6x slower in bench/score.py because every embedding becomes a numpy object per
  row); the model is loaded once per worker process (`_MODEL_CACHE`, keyed by artifacts dir + version +
  quantize) and called on exact `score.batch_size` chunks, with one torch thread per task cpu.
- writer (`run`): rank per query (score desc, product_id asc: deterministic), keep `score.top_n`, one atomic
  `replace_date` of that run_date's rows: readers see the old or the new complete day, never a mix.

Pairs whose query or product has no features at all are skipped (counted); pairs with some modalities missing
are scored with masks (absent modality = zero vector, mask 0), exactly as in training.

`score.quantize: true` scores with an int8 dynamically quantized copy of the model (`quantize_model`: every
`nn.Linear` -> int8 weights, activations quantized per batch at run time; CPU only) and suffixes the model
version with `+int8`. Dynamic quantization scales activations per batch, so scores depend (slightly) on batch
composition; partitions are hashed and sorted by key before scoring so a re-run is bit-identical.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.runs import track_stage

log = logging.getLogger("mmrank.score")

P_MODALITIES = ("text", "image", "audio")
Q_MODALITIES = ("text", "audio")
QUANT_SUFFIX = "+int8"

SCORED_SCHEMA = ("query_id string, product_id string, score float, contrib_text float, contrib_image float, "
                 "contrib_audio float")
SIM_SCHEMA = "query_id string, product_id string, sim float"


# ---------------------------------------------------------------------------------------------------------
# model loading (once per worker process)
# ---------------------------------------------------------------------------------------------------------
_MODEL_CACHE: dict[tuple[str, str, bool], tuple[Any, dict]] = {}
_CACHE_LOCK = threading.Lock()


def quantize_model(model):
    """int8 dynamic quantization of every `nn.Linear` (weights int8, activations quantized per batch, CPU).

    Uses `torch.ao.quantization.quantize_dynamic` (present, though deprecated in favour of torchao, in torch
    2.11). Returns a new module in eval mode; the original is left untouched.
    """
    import copy

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        qm = quantize_dynamic(copy.deepcopy(model).cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)
    return qm.eval()


def resolve_version(artifacts_dir: str, version: str | None = None) -> str:
    """The artifact version to score with: `version`, or the latest one (error if there is none)."""
    from mmrank.ranker.artifact import ArtifactError, latest_version

    if version:
        return str(version)
    try:
        return str(latest_version(artifacts_dir))
    except ArtifactError as e:
        raise ArtifactError(f"{e}: run the train stage first") from None


def load_scorer(artifacts_dir: str, version: str, quantize: bool = False) -> tuple[Any, dict]:
    """(model, meta) in eval mode, cached per process: each Spark worker loads an artifact once.

    Quantized models run on CPU; fp32 models use CUDA when visible.
    """
    key = (str(artifacts_dir), str(version), bool(quantize))
    with _CACHE_LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is not None:
            return hit
        import torch

        from mmrank.ranker.artifact import load_artifact

        model, meta = load_artifact(str(artifacts_dir), version)
        model = model.eval()
        if quantize:
            model = quantize_model(model)
        elif torch.cuda.is_available():
            model = model.cuda()
        _MODEL_CACHE[key] = (model, meta)
        return model, meta


def model_dims(model, meta: Mapping | None = None) -> dict[str, int]:
    """Embedding dims per modality the model expects: {'text': Dt, 'image': Di, 'audio': Da}."""
    d = getattr(model, "dims", None)
    if d is None and meta:
        d = meta.get("dims")
    if d is None:
        raise ValueError("model has no `dims` (ModalityDims) and the artifact meta has none")
    if isinstance(d, Mapping):
        return {m: int(d[m]) for m in P_MODALITIES}
    return {m: int(getattr(d, m)) for m in P_MODALITIES}


# ---------------------------------------------------------------------------------------------------------
# mapper: plain numpy/PyTorch scoring, callable outside Spark
# ---------------------------------------------------------------------------------------------------------
def _model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_feats(feats: Mapping[str, Any], modalities: tuple[str, ...], dims: Mapping[str, int], n: int | None):
    """Fill absent modalities with zeros; build the [N, M] presence mask unless given."""
    present = [m for m in modalities if feats.get(m) is not None]
    if n is None:
        if not present:
            raise ValueError("no features given")
        n = len(feats[present[0]])
    arrays, mask = {}, feats.get("mask")
    cols = []
    for m in modalities:
        a = feats.get(m)
        if a is None:
            arrays[m] = np.zeros((n, dims[m]), np.float32)
            cols.append(np.zeros(n, np.float32))
        else:
            a = np.asarray(a, dtype=np.float32)
            if a.shape != (n, dims[m]):
                raise ValueError(f"{m} features have shape {a.shape}; the model expects ({n}, {dims[m]}) "
                                 "(features from a different encoder than the model was trained on?)")
            arrays[m] = a
            cols.append(np.ones(n, np.float32))
    mask = np.asarray(mask, np.float32) if mask is not None else np.stack(cols, axis=1)
    return arrays, mask, n


def make_pair_batch(query_feats: Mapping[str, Any], product_feats: Mapping[str, Any], dims: Mapping[str, int],
                    device=None):
    """Tensors of the uniform batch contract for N single pairs (L = 1), as `mmrank.ranker.batch` defines.

    `query_feats`: {'text': [N, Dt], 'audio': [N, Da], 'mask': [N, 2] (optional)};
    `product_feats`: {'text': [N, Dt], 'image': [N, Di], 'audio': [N, Da], 'mask': [N, 3] (optional)}.
    A missing key (or None) = modality absent for every row (zeros, mask 0).
    """
    import torch

    pa, pm, n = _as_feats(product_feats, P_MODALITIES, dims, None)
    qa, qm, _ = _as_feats(query_feats, Q_MODALITIES, dims, n)

    def t(x):
        x = np.ascontiguousarray(x)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
        return x if device is None else x.to(device)

    tensors = {
        "q_text": t(qa["text"]), "q_audio": t(qa["audio"]), "q_mask": t(qm),
        "p_text": t(pa["text"][:, None, :]), "p_image": t(pa["image"][:, None, :]),
        "p_audio": t(pa["audio"][:, None, :]), "p_mask": t(pm[:, None, :]),
        "grades": t(np.zeros((n, 1), np.float32)),
    }
    return tensors


def score_pairs(model, query_feats: Mapping[str, Any], product_feats: Mapping[str, Any],
                dims: Mapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score N (query, product) pairs: returns (scores [N] float32, contributions [N, 3] text/image/audio).

    Plain PyTorch on numpy arrays (see `make_pair_batch` for the inputs); no Spark involved. A model in
    training mode is switched to eval mode.
    """
    import torch

    if model.training:
        model.eval()  # scoring is deterministic: no dropout / modality dropout
    dims = dims or model_dims(model)
    batch = make_pair_batch(query_feats, product_feats, dims, device=_model_device(model))
    scores, contrib = _score_and_contrib(model, batch)
    return (scores[:, 0].float().cpu().numpy().astype(np.float32),
            contrib[:, 0, :].float().cpu().numpy().astype(np.float32))


def _score_and_contrib(model, batch):
    """(scores [B, L], occlusion contributions [B, L, 3]) in one encoding pass (FusionRanker, also quantized)."""
    import torch

    with torch.inference_mode():
        return model.score_and_contributions(batch)


def _stack(col: pd.Series, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A pandas column of arrays (or None) -> ([N, dim] float32 with zeros for None, presence [N])."""
    out = np.zeros((len(col), dim), np.float32)
    present = col.notna().to_numpy()
    if present.any():
        vals = col.to_numpy()[present]
        try:
            out[present] = np.stack(vals).astype(np.float32, copy=False)
        except ValueError as e:
            lens = sorted({len(v) for v in vals})
            raise ValueError(f"{name} embeddings have lengths {lens}; the model expects {dim}") from e
    return out, present.astype(np.float32)


def score_frame(model, pdf: pd.DataFrame, dims: Mapping[str, int]) -> pd.DataFrame:
    """Score a pandas frame of pairs with columns query_id, product_id, q_text, q_audio, p_text, p_image,
    p_audio (arrays or None) -> query_id, product_id, score, contrib_text, contrib_image, contrib_audio."""
    q, qmask = {}, []
    for m in Q_MODALITIES:
        q[m], pres = _stack(pdf[f"q_{m}"], dims[m], f"query {m}")
        qmask.append(pres)
    p, pmask = {}, []
    for m in P_MODALITIES:
        p[m], pres = _stack(pdf[f"p_{m}"], dims[m], f"product {m}")
        pmask.append(pres)
    q["mask"], p["mask"] = np.stack(qmask, 1), np.stack(pmask, 1)
    scores, contrib = score_pairs(model, q, p, dims)
    return pd.DataFrame({"query_id": pdf["query_id"].to_numpy(), "product_id": pdf["product_id"].to_numpy(),
                         "score": scores, "contrib_text": contrib[:, 0], "contrib_image": contrib[:, 1],
                         "contrib_audio": contrib[:, 2]})


def rechunk(frames: Iterator[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of exactly `size` rows (the last one may be shorter)."""
    buf: list[pd.DataFrame] = []
    have = 0
    for f in frames:
        while len(f):
            take = f.iloc[: size - have]
            f = f.iloc[len(take):]
            buf.append(take)
            have += len(take)
            if have == size:
                yield pd.concat(buf, ignore_index=True) if len(buf) > 1 else buf[0].reset_index(drop=True)
                buf, have = [], 0
    if have:
        yield pd.concat(buf, ignore_index=True)


def _set_task_threads() -> None:
    """One torch thread per Spark task cpu (spark.task.cpus), so concurrent tasks do not oversubscribe."""
    from pyspark import TaskContext

    from mmrank.encoders.device import set_threads

    tc = TaskContext.get()
    if tc is not None:
        set_threads(max(1, int(tc.cpus())))


def make_partition_scorer(artifacts_dir: str, version: str, quantize: bool, batch_size: int):
    """The iterator function for `mapInPandas`: loads the model once per worker, scores exact batches."""

    def _score_partition(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        _set_task_threads()
        model, meta = load_scorer(artifacts_dir, version, quantize)
        dims = model_dims(model, meta)
        for chunk in rechunk(frames, batch_size):
            yield score_frame(model, chunk, dims)

    return _score_partition


def _arrow_matrix(col, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list<float> column -> ([N, dim] float32, zeros for nulls; presence [N]) without per-row
    Python objects (the flat child values are reshaped; null lists have no values)."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    present = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    k = int(present.sum())
    if flat.size != k * dim:
        lens = sorted(set(col.value_lengths().drop_null().to_pylist()))
        raise ValueError(f"{name} embeddings have lengths {lens}; the model expects {dim}")
    if k == n:
        return np.ascontiguousarray(flat.reshape(n, dim), dtype=np.float32), present.astype(np.float32)
    out = np.zeros((n, dim), np.float32)
    out[present] = flat.reshape(k, dim)
    return out, present.astype(np.float32)


def score_arrow(model, rb, dims: Mapping[str, int]):
    """`score_frame` for a pyarrow RecordBatch/Table of pairs (the `mapInArrow` path) -> RecordBatch."""
    import pyarrow as pa

    q, qmask, p, pmask = {}, [], {}, []
    for m in Q_MODALITIES:
        q[m], pres = _arrow_matrix(rb.column(f"q_{m}"), dims[m], f"query {m}")
        qmask.append(pres)
    for m in P_MODALITIES:
        p[m], pres = _arrow_matrix(rb.column(f"p_{m}"), dims[m], f"product {m}")
        pmask.append(pres)
    q["mask"], p["mask"] = np.stack(qmask, 1), np.stack(pmask, 1)
    scores, contrib = score_pairs(model, q, p, dims)
    return pa.RecordBatch.from_arrays(
        [rb.column("query_id"), rb.column("product_id"), pa.array(scores, pa.float32()),
         pa.array(contrib[:, 0], pa.float32()), pa.array(contrib[:, 1], pa.float32()),
         pa.array(contrib[:, 2], pa.float32())],
        names=["query_id", "product_id", "score", "contrib_text", "contrib_image", "contrib_audio"])


def rechunk_arrow(batches, size: int):
    """Re-cut a stream of RecordBatches into RecordBatches of exactly `size` rows (the last may be shorter)."""
    import pyarrow as pa

    def one(t):
        return t.combine_chunks().to_batches()[0]

    buf, have = [], 0
    for b in batches:
        if not b.num_rows:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= size:
            t = pa.Table.from_batches(buf)
            yield one(t.slice(0, size))
            rest = t.slice(size)
            buf, have = [r for r in rest.to_batches() if r.num_rows], rest.num_rows
    if have:
        yield one(pa.Table.from_batches(buf))


def make_arrow_partition_scorer(artifacts_dir: str, version: str, quantize: bool, batch_size: int):
    """The iterator function for `mapInArrow`: as `make_partition_scorer`, but Arrow list columns are
    reshaped to matrices without materialising one numpy object per row (5x less conversion time)."""

    def _score_partition(batches):
        _set_task_threads()
        model, meta = load_scorer(artifacts_dir, version, quantize)
        dims = model_dims(model, meta)
        for chunk in rechunk_arrow(batches, batch_size):
            if chunk.num_rows:
                yield score_arrow(model, chunk, dims)

    return _score_partition


ENGINES = ("arrow", "pandas")


def score_df(pairs: DataFrame, artifacts_dir: str, version: str, quantize: bool, batch_size: int,
             num_partitions: int | None = None, engine: str = "arrow") -> DataFrame:
    """Score a DataFrame of pairs with features (see `score_frame`) with an iterator `mapInArrow`
    (engine `arrow`, default) or `mapInPandas` (engine `pandas`); same model cache, batching and output.

    Pairs are hash-partitioned by query_id and sorted by key first, so batch composition (and with int8
    dynamic quantization, the scores) are identical across re-runs.
    """
    n = num_partitions or int(pairs.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    ordered = pairs.repartition(n, "query_id").sortWithinPartitions("query_id", "product_id")
    if engine == "arrow":
        return ordered.mapInArrow(make_arrow_partition_scorer(artifacts_dir, version, quantize, batch_size),
                                  SCORED_SCHEMA)
    if engine == "pandas":
        return ordered.mapInPandas(make_partition_scorer(artifacts_dir, version, quantize, batch_size),
                                   SCORED_SCHEMA)
    raise ValueError(f"engine {engine!r}: expected one of {ENGINES}")


# ---------------------------------------------------------------------------------------------------------
# reader: features and candidates
# ---------------------------------------------------------------------------------------------------------
def _usable(dims: Mapping[str, int] | None) -> Column:
    """Feature rows the model can use: finite values and (when `dims` is known) the model's width."""
    from mmrank.training_lists import finite

    ok = finite()
    if dims:
        width = F.element_at(F.create_map(*[x for m, d in dims.items() for x in (F.lit(m), F.lit(int(d)))]),
                             F.col("modality"))
        ok = ok & (F.size("embedding") == width)
    return ok


def bad_feature_rows(lh: Lakehouse, dims: Mapping[str, int]) -> DataFrame:
    """Quarantine rows (record_id `<id>:<modality>`, reason, payload) for unusable embeddings."""
    parts = []
    for table, key, mods in (("product_features", "product_id", P_MODALITIES),
                             ("query_features", "query_id", Q_MODALITIES)):
        df = lh.read(table).where(F.col("modality").isin(*mods))
        parts.append(df.where(~_usable(dims)).select(
            F.concat_ws(":", key, "modality").alias("record_id"),
            F.when(~_usable(None), F.lit("embedding has non-finite values (NaN/inf)"))
             .otherwise(F.lit("embedding width differs from the model's")).alias("reason"),
            F.concat(F.lit(f"{table} len="), F.size("embedding").cast("string")).alias("payload")))
    return parts[0].unionByName(parts[1])


def _pivot(df: DataFrame, key: str, modalities: tuple[str, ...], prefix: str,
           dims: Mapping[str, int] | None = None) -> DataFrame:
    aggs = [F.first(F.when(F.col("modality") == m, F.col("embedding")), ignorenulls=True).alias(f"{prefix}{m}")
            for m in modalities]
    return df.where(F.col("modality").isin(*modalities) & _usable(dims)).groupBy(key).agg(*aggs)


def product_feature_frame(lh: Lakehouse, dims: Mapping[str, int] | None = None) -> DataFrame:
    """product_id, p_text, p_image, p_audio (null where the modality is missing or its embedding unusable)."""
    return _pivot(lh.read("product_features"), "product_id", P_MODALITIES, "p_", dims)


def query_feature_frame(lh: Lakehouse, dims: Mapping[str, int] | None = None) -> DataFrame:
    """query_id, q_text, q_audio (null where the modality is missing or its embedding unusable)."""
    return _pivot(lh.read("query_features"), "query_id", Q_MODALITIES, "q_", dims)


def impression_pairs(lh: Lakehouse, run_date: dt.date) -> DataFrame:
    """Distinct (query_id, product_id) shown in the query log up to and including run_date."""
    return (lh.read("query_log").where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
            .select("query_id", "product_id").distinct())


def _partition_topk(queries: dict[str, tuple[np.ndarray, np.ndarray]], k: int, max_cells: int):
    """mapInPandas function: per product partition, the running top-k products per query by cosine.

    `queries` maps modality -> (query ids [Q], L2-normalised matrix [Q, D]) (a broadcast value or a
    closure). Products come as frames of (product_id, modality, embedding); output (query_id, product_id, sim).
    """

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        qs = queries.value if hasattr(queries, "value") else queries
        best: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for pdf in frames:
            for m, (qids, qmat) in qs.items():
                sub = pdf[pdf["modality"] == m]
                if sub.empty or len(qids) == 0:
                    continue
                pmat = np.stack(sub["embedding"].to_numpy()).astype(np.float32)
                if pmat.shape[1] != qmat.shape[1]:
                    raise ValueError(f"{m}: product dim {pmat.shape[1]} != query dim {qmat.shape[1]}")
                pmat /= np.maximum(np.linalg.norm(pmat, axis=1, keepdims=True), 1e-12)
                pids = sub["product_id"].to_numpy().astype(object)
                step = max(1, max_cells // max(1, len(qids)))
                for s in range(0, len(pids), step):
                    sims = qmat @ pmat[s:s + step].T  # [Q, n]
                    ids = np.broadcast_to(pids[s:s + step], sims.shape)
                    if m in best:
                        sims = np.concatenate([best[m][0], sims], axis=1)
                        ids = np.concatenate([best[m][1], ids], axis=1)
                    if sims.shape[1] > k:
                        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
                        sims = np.take_along_axis(sims, idx, 1)
                        ids = np.take_along_axis(ids, idx, 1)
                    best[m] = (np.ascontiguousarray(sims), np.ascontiguousarray(ids))
        for m, (sims, ids) in best.items():
            qids = qs[m][0]
            yield pd.DataFrame({"query_id": np.repeat(qids, sims.shape[1]), "product_id": ids.ravel(),
                                "sim": sims.ravel().astype(np.float32)})

    return run


def _query_matrices(lh: Lakehouse, dims: Mapping[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality, the queries that search with it: text when the query has text, else audio (voice)."""
    qf = query_feature_frame(lh, dims).toPandas()
    out = {}
    use_text = qf["q_text"].notna()
    for m, sel in (("text", use_text), ("audio", ~use_text & qf["q_audio"].notna())):
        sub = qf[sel]
        if sub.empty:
            continue
        mat = np.stack(sub[f"q_{m}"].to_numpy()).astype(np.float32)
        mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        out[m] = (sub["query_id"].to_numpy().astype(object), mat)
    return out


def similarity_pairs(lh: Lakehouse, k: int, max_cells: int = 4_000_000,
                     dims: Mapping[str, int] | None = None) -> DataFrame:
    """Top-k products per query by cosine similarity of embeddings, without a cross join.

    The query matrix is broadcast; every product_features partition keeps its own top-k per query
    (memory O(Q x k) plus one [Q x chunk] block of at most `max_cells` floats), then a window over the
    (partitions x k) survivors per query keeps the global top-k (ties: product_id ascending).
    Returns (query_id, product_id, sim).
    """
    spark = lh.spark
    qmats = _query_matrices(lh, dims)
    if not qmats:
        return spark.createDataFrame([], SIM_SCHEMA)
    try:
        shared = spark.sparkContext.broadcast(qmats)
    except Exception:  # Spark Connect / serverless: no SparkContext; the closure ships the matrix per task
        shared = qmats
    prods = lh.read("product_features").where(F.col("modality").isin(*qmats.keys()) & _usable(dims)).select(
        "product_id", "modality", "embedding")
    local = prods.mapInPandas(_partition_topk(shared, k, max_cells), SIM_SCHEMA)
    w = Window.partitionBy("query_id").orderBy(F.col("sim").desc(), F.col("product_id"))
    return local.withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= k).drop("_r")


def candidate_pairs(lh: Lakehouse, run_date: dt.date, mode: str | None = None, k: int | None = None,
                    dims: Mapping[str, int] | None = None) -> DataFrame:
    """Distinct (query_id, product_id) candidates per `score.candidates`: impressions | similarity | both."""
    sc = lh.cfg.score
    mode = mode or sc.candidates
    parts = []
    if mode in ("impressions", "both"):
        parts.append(impression_pairs(lh, run_date))
    if mode in ("similarity", "both"):
        parts.append(similarity_pairs(lh, k or sc.similarity_top_k, dims=dims).select("query_id", "product_id"))
    if not parts:
        raise ValueError(f"score.candidates = {mode!r}: expected impressions, similarity or both")
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.distinct()


# ---------------------------------------------------------------------------------------------------------
# writer: rank, keep top-N, replace the day
# ---------------------------------------------------------------------------------------------------------
def rank_top_n(scored: DataFrame, top_n: int) -> DataFrame:
    """rank 1..N per query by score descending, ties broken by product_id ascending; keep rank <= top_n."""
    w = Window.partitionBy("query_id").orderBy(F.col("score").desc(), F.col("product_id").asc())
    return scored.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= top_n)


def run(lh: Lakehouse, run_date: dt.date, version: str | None = None, quantize: bool | None = None,
        candidates: str | None = None) -> dict[str, int]:
    """Score stage: candidates -> model (latest artifact unless `version`) -> top-N per query for run_date."""
    sc = lh.cfg.score
    quantize = sc.quantize if quantize is None else quantize
    artifacts_dir = str(lh.cfg.resolve_path(lh.cfg.storage.artifacts_dir))
    with track_stage(lh, "score", run_date,
                     inputs=("query_log", "product_features", "query_features"),
                     outputs=("ranking_scores",)) as rec:
        t0 = time.perf_counter()
        version = resolve_version(artifacts_dir, version)
        model_version = version + (QUANT_SUFFIX if quantize else "")
        rec.model_version = model_version

        dims = model_dims(*load_scorer(artifacts_dir, version))
        # NaN/inf or wrong-width embeddings (e.g. from an external writer) are quarantined, never scored
        rec.counts["quarantined"] = lh.quarantine(bad_feature_rows(lh, dims), "score", run_date)
        cands = candidate_pairs(lh, run_date, candidates, dims=dims).persist()
        qf, pf = query_feature_frame(lh, dims), product_feature_frame(lh, dims)
        joined = (cands.join(qf, "query_id", "left")
                  .join(pf.withColumn("_p", F.lit(True)), "product_id", "left")
                  .withColumn("_q", F.col("q_text").isNotNull() | F.col("q_audio").isNotNull()))
        stats = joined.agg(
            F.count(F.lit(1)).alias("pairs"),
            F.sum(F.when(~F.col("_q"), 1).otherwise(0)).alias("no_q"),
            F.sum(F.when(F.col("_p").isNull(), 1).otherwise(0)).alias("no_p"),
            F.sum(F.when(~F.col("_q") | F.col("_p").isNull(), 1).otherwise(0)).alias("skipped"),
            F.countDistinct(F.when(~F.col("_q"), F.col("query_id"))).alias("q_missing"),
            F.countDistinct(F.when(F.col("_p").isNull(), F.col("product_id"))).alias("p_missing"),
        ).first()
        usable = joined.where(F.col("_q") & F.col("_p").isNotNull()).select(
            "query_id", "product_id", "q_text", "q_audio", "p_text", "p_image", "p_audio")
        scored = score_df(usable, artifacts_dir, version, quantize, sc.batch_size)
        top = rank_top_n(scored, sc.top_n)
        out = top.select(
            F.lit(sql_date(run_date)).cast("date").alias("run_date"), "query_id", "product_id", "score", "rank",
            F.lit(model_version).alias("model_version"), "contrib_text", "contrib_image", "contrib_audio")
        lh.replace_date("ranking_scores", out, run_date)
        cands.unpersist()

        written = lh.read("ranking_scores").where(F.col("run_date") == F.lit(sql_date(run_date)).cast("date"))
        wstats = written.agg(F.count(F.lit(1)).alias("rows"), F.countDistinct("query_id").alias("queries")).first()
        rec.counts.update({
            "candidate_pairs": int(stats["pairs"] or 0),
            "pairs_scored": int((stats["pairs"] or 0) - (stats["skipped"] or 0)),
            "pairs_skipped_no_query_features": int(stats["no_q"] or 0),
            "pairs_skipped_no_product_features": int(stats["no_p"] or 0),
            "queries_skipped_no_features": int(stats["q_missing"] or 0),
            "products_skipped_no_features": int(stats["p_missing"] or 0),
            "rows_written": int(wstats["rows"] or 0),
            "queries_ranked": int(wstats["queries"] or 0),
        })
        log.info("scored %d pairs with %s in %.1fs -> %d rows for %d queries", rec.counts["pairs_scored"],
                 model_version, time.perf_counter() - t0, rec.counts["rows_written"], rec.counts["queries_ranked"])
        return dict(rec.counts)



# ---------------------------------------------------------------------------------------------------------
# interactive helpers (notebooks): small samples on the driver
# ---------------------------------------------------------------------------------------------------------
def available_versions(lh: Lakehouse) -> list[str]:
    """Model versions saved under storage.artifacts_dir, oldest first (by created_at in model.json)."""
    import json
    from pathlib import Path

    models = Path(lh.cfg.resolve_path(lh.cfg.storage.artifacts_dir)) / "models"
    if not models.exists():
        return []
    found = []
    for d in models.iterdir():
        meta = d / "model.json"
        if d.is_dir() and not d.name.startswith(".") and meta.exists():
            found.append((json.loads(meta.read_text()).get("created_at", ""), d.name))
    return [v for _, v in sorted(found)]


def score_versions_local(lh: Lakehouse, run_date: dt.date, versions: list[str], max_queries: int = 50,
                         candidates: str = "impressions") -> pd.DataFrame:
    """Score the candidates of up to `max_queries` queries with each model version on the driver.

    Returns query_id, product_id and one `score@<version>` column per version (int8 versions allowed as
    `<version>+int8`). For notebooks and comparisons; the nightly path is `run`.
    """
    adir = str(lh.cfg.resolve_path(lh.cfg.storage.artifacts_dir))
    cands = candidate_pairs(lh, run_date, candidates)
    qids = [r[0] for r in cands.select("query_id").distinct().orderBy("query_id").limit(max_queries).collect()]
    pairs = (cands.where(F.col("query_id").isin(qids)).join(query_feature_frame(lh), "query_id")
             .join(product_feature_frame(lh), "product_id").toPandas()
             .sort_values(["query_id", "product_id"]).reset_index(drop=True))
    out = pairs[["query_id", "product_id"]].copy()
    for v in versions:
        base, quant = (v[: -len(QUANT_SUFFIX)], True) if v.endswith(QUANT_SUFFIX) else (v, False)
        model, meta = load_scorer(adir, resolve_version(adir, base), quant)
        out[f"score@{v}"] = score_frame(model, pairs, model_dims(model, meta))["score"].to_numpy()
    return out
