"""The mapper of scoring: a trained FusionRanker applied to (query, product) pairs with their features.

- Plain numpy/PyTorch (`score_pairs`, `score_frame`): usable outside Spark (tests, notebooks). Pairs whose
  query or product lack some modality are scored with masks (absent modality = zero vector, mask 0), exactly as
  in training.
- Inside Spark, `mmrank.scoring.lookup.score_by_key` ships keys only and scores from per-item codes; the model
  is loaded once per worker process (`load_scorer`, cached by artifacts dir + version + quantize).
- `quantize_model`: int8 dynamic quantization of every `nn.Linear` (CPU). Dynamic quantization scales
  activations per batch, so scores depend (slightly) on batch composition; `score_by_key` partitions and sorts
  pairs by key first, so a re-run is bit-identical.
"""
from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES

log = logging.getLogger("mmrank.scoring")

QUANT_SUFFIX = "+int8"


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


# ---------------------------------------------------------------------------------------------------------
# mapper: plain numpy/PyTorch scoring, callable outside Spark
# ---------------------------------------------------------------------------------------------------------
def model_device(model):
    """The device of a model's parameters (cpu for a model without any)."""
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
    dims = dims or model.dims.as_dict()
    batch = make_pair_batch(query_feats, product_feats, dims, device=model_device(model))
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
    scores, contrib = score_pairs(model, q, p, dims)
    return pd.DataFrame({"query_id": pdf["query_id"].to_numpy(), "product_id": pdf["product_id"].to_numpy(),
                         "score": scores, "contrib_text": contrib[:, 0], "contrib_image": contrib[:, 1],
                         "contrib_audio": contrib[:, 2]})
