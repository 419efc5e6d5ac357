"""The mapper of scoring: a trained FusionRanker applied to (query, product) pairs with their features.

- Plain numpy/PyTorch (`score_pairs`, `score_frame`, `score_arrow`): usable outside Spark (tests, benchmarks,
  notebooks). Pairs whose query or product lack some modality are scored with masks (absent modality = zero
  vector, mask 0), exactly as in training.
- Inside Spark (`score_df`): an iterator `mapInArrow` (default; engine `pandas` = the same scorer through
  `mapInPandas`, slower because every embedding becomes a numpy object per row). The model is loaded once per
  worker process (`load_scorer`, cached by artifacts dir + version + quantize) and called on exact
  `score.batch_size` chunks, with one torch thread per task cpu.
- `quantize_model` (defined in `mmrank.ranker.compress`): int8 dynamic quantization of every `nn.Linear`
  (CPU). Dynamic quantization scales activations per batch, so scores depend (slightly) on batch composition;
  `score_df` hash-partitions and sorts pairs by key first, so a re-run is bit-identical.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from mmrank.encoders.device import resolve_device, set_threads, task_threads
from mmrank.lexical import N_LEX
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
from mmrank.ranker.compress import quantize_model  # noqa: F401  (re-exported: scorer.quantize_model)


QUANT_SUFFIX = "+int8"
SCORED_SCHEMA = ("query_id string, product_id string, score float, contrib_text float, contrib_image float, "
                 "contrib_audio float")


# ---------------------------------------------------------------------------------------------------------
# model loading (once per worker process)
# ---------------------------------------------------------------------------------------------------------
_MODEL_CACHE: dict[tuple[str, str, bool, str], tuple[Any, dict]] = {}
_CACHE_LOCK = threading.Lock()


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

    Quantized models run on CPU; fp32 models on the GPU Spark assigned to the task (`resolve_device`) when
    one is visible, cached per device too (a reused worker can serve tasks on different GPUs).
    """
    import torch

    device = torch.device("cpu") if quantize else resolve_device("auto")
    key = (str(artifacts_dir), str(version), bool(quantize), str(device))
    with _CACHE_LOCK:
        hit = _MODEL_CACHE.get(key)
        if hit is not None:
            return hit
        from mmrank.ranker.artifact import load_artifact

        model, meta = load_artifact(str(artifacts_dir), version)
        model = model.eval()
        model = quantize_model(model) if quantize else model.to(device)
        _MODEL_CACHE[key] = (model, meta)
        return model, meta


# ---------------------------------------------------------------------------------------------------------
# mapper: plain numpy/PyTorch scoring, callable outside Spark
# ---------------------------------------------------------------------------------------------------------
def model_device(model):
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
                    device=None, lex: np.ndarray | None = None):
    """Tensors of the uniform batch contract for N single pairs (L = 1), as `mmrank.ranker.batch` defines.

    `query_feats`: {'text': [N, Dt], 'audio': [N, Da], 'mask': [N, 2] (optional)};
    `product_feats`: {'text': [N, Dt], 'image': [N, Di], 'audio': [N, Da], 'mask': [N, 3] (optional)}.
    A missing key (or None) = modality absent for every row (zeros, mask 0). `lex`: [N, N_LEX] lexical match
    features of the pairs (`mmrank.lexical.features.with_lex`), or None (no `p_lex` key: the model sees zeros).
    """
    import torch

    pa, pm, n = _as_feats(product_feats, PRODUCT_MODALITIES, dims, None)
    qa, qm, _ = _as_feats(query_feats, QUERY_MODALITIES, dims, n)

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
    if lex is not None:
        tensors["p_lex"] = t(np.asarray(lex, np.float32)[:, None, :])
    return tensors


def score_pairs(model, query_feats: Mapping[str, Any], product_feats: Mapping[str, Any],
                dims: Mapping[str, int] | None = None, lex: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score N (query, product) pairs: returns (scores [N] float32, contributions [N, 3] text/image/audio).

    Plain PyTorch on numpy arrays (see `make_pair_batch` for the inputs); no Spark involved. A model in
    training mode is switched to eval mode.
    """
    if model.training:
        model.eval()  # scoring is deterministic: no dropout / modality dropout
    dims = dims or model.dims.as_dict()
    batch = make_pair_batch(query_feats, product_feats, dims, device=model_device(model), lex=lex)
    scores, contrib = _score_and_contrib(model, batch)
    return (scores[:, 0].float().cpu().numpy().astype(np.float32),
            contrib[:, 0, :].float().cpu().numpy().astype(np.float32))


def _score_and_contrib(model, batch):
    """(scores [B, L], occlusion contributions [B, L, 3]) in one encoding pass (FusionRanker, also quantized)."""
    import torch

    with torch.inference_mode():
        return model.score_and_contributions(batch)


def column_matrix(col: pd.Series, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
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
    for m in QUERY_MODALITIES:
        q[m], pres = column_matrix(pdf[f"q_{m}"], dims[m], f"query {m}")
        qmask.append(pres)
    p, pmask = {}, []
    for m in PRODUCT_MODALITIES:
        p[m], pres = column_matrix(pdf[f"p_{m}"], dims[m], f"product {m}")
        pmask.append(pres)
    q["mask"], p["mask"] = np.stack(qmask, 1), np.stack(pmask, 1)
    lex = column_matrix(pdf["p_lex"], N_LEX, "lexical")[0] if "p_lex" in pdf.columns else None
    scores, contrib = score_pairs(model, q, p, dims, lex)
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


def make_partition_scorer(artifacts_dir: str, version: str, quantize: bool, batch_size: int):
    """The iterator function for `mapInPandas`: loads the model once per worker, scores exact batches."""

    def _score_partition(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        set_threads(task_threads())
        model, _ = load_scorer(artifacts_dir, version, quantize)
        dims = model.dims.as_dict()
        for chunk in rechunk(frames, batch_size):
            yield score_frame(model, chunk, dims)

    return _score_partition


def arrow_matrix(col, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
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
    for m in QUERY_MODALITIES:
        q[m], pres = arrow_matrix(rb.column(f"q_{m}"), dims[m], f"query {m}")
        qmask.append(pres)
    for m in PRODUCT_MODALITIES:
        p[m], pres = arrow_matrix(rb.column(f"p_{m}"), dims[m], f"product {m}")
        pmask.append(pres)
    q["mask"], p["mask"] = np.stack(qmask, 1), np.stack(pmask, 1)
    lex = arrow_matrix(rb.column("p_lex"), N_LEX, "lexical")[0] if "p_lex" in rb.schema.names else None
    scores, contrib = score_pairs(model, q, p, dims, lex)
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
        set_threads(task_threads())
        model, _ = load_scorer(artifacts_dir, version, quantize)
        dims = model.dims.as_dict()
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
