"""The batch tensor contract (docs/architecture.md): flattened `training_lists` rows <-> `[B, L, ...]` tensors.

A batch is a dict of float32 tensors::

    q_text [B, Dt]  q_audio [B, Da]  q_mask [B, 2]          (query modalities: text, audio)
    p_text [B, L, Dt]  p_image [B, L, Di]  p_audio [B, L, Da]  p_mask [B, L, 3]   (text, image, audio)
    p_lex [B, L, N_LEX]   lexical match features (`mmrank.lexical.features.LEX_FEATURES`), 0 for padding
    grades [B, L]   padding slots have grade PAD_GRADE (-1) and p_mask all 0

Absent modalities are zero vectors with mask 0; a row without `p_lex` (older lists) gets zeros. Scoring single
pairs uses L = 1.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from mmrank.lexical import N_LEX
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES, ModalityDims

PAD_GRADE = -1.0
BATCH_KEYS = ("q_text", "q_audio", "q_mask", "p_text", "p_image", "p_audio", "p_mask", "p_lex", "grades")

Batch = dict[str, torch.Tensor]


def _flat(value: Any) -> np.ndarray:
    """A row's flattened array; None / NaN-scalar / empty -> empty float32 array."""
    if value is None or (np.isscalar(value) and value != value):
        return np.zeros(0, np.float32)
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _fit_rows(flat: np.ndarray, n_rows: int, width: int, fill: float = 0.0) -> np.ndarray:
    """Reshape a flattened row-major `[n, width]` array to `[n_rows, width]`, truncating or padding with `fill`.

    An empty array (missing modality) becomes all `fill`.
    """
    out = np.full((n_rows, width), fill, np.float32)
    if flat.size == 0:
        return out
    if flat.size % width:
        raise ValueError(f"array of length {flat.size} is not a multiple of dim {width}")
    arr = flat.reshape(-1, width)[:n_rows]
    out[: len(arr)] = arr
    return out


def _features(row: Mapping[str, Any], col: str, n_rows: int, width: int) -> tuple[np.ndarray, bool]:
    flat = _flat(row.get(col))
    return _fit_rows(flat, n_rows, width), flat.size > 0


def _row_arrays(row: Mapping[str, Any], dims: ModalityDims, list_size: int) -> dict[str, np.ndarray]:
    """One row -> contract arrays. A null/empty feature array forces its mask bits to 0; a null mask column
    is inferred from which feature arrays are non-empty (and, for products, which slots are not padding)."""
    grades = _fit_rows(_flat(row["grades"]), list_size, 1, PAD_GRADE)[:, 0]
    real = (grades != PAD_GRADE).astype(np.float32)
    q_mask_flat, p_mask_flat = _flat(row.get("q_mask")), _flat(row.get("p_mask"))
    q_mask = _fit_rows(q_mask_flat, 1, 2)[0]
    p_mask = _fit_rows(p_mask_flat, list_size, 3)
    out = {"grades": grades}
    for i, m in enumerate(QUERY_MODALITIES):
        feats, present = _features(row, f"q_{m}", 1, dims.of(m))
        q_mask[i] = float(present) * (q_mask[i] if q_mask_flat.size else 1.0)
        out[f"q_{m}"] = np.where(q_mask[i] > 0, feats[0], 0.0).astype(np.float32)
    for i, m in enumerate(PRODUCT_MODALITIES):
        feats, present = _features(row, f"p_{m}", list_size, dims.of(m))
        p_mask[:, i] = float(present) * real * (p_mask[:, i] if p_mask_flat.size else 1.0)
        out[f"p_{m}"] = np.where(p_mask[:, i : i + 1] > 0, feats, 0.0).astype(np.float32)
    out["q_mask"], out["p_mask"] = q_mask, p_mask
    out["p_lex"] = _fit_rows(_flat(row.get("p_lex")), list_size, N_LEX) * real[:, None]
    return out


def _records(rows: Any) -> list[Mapping[str, Any]]:
    """pandas DataFrame, dict of per-row columns, or a sequence of row mappings -> list of row mappings."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return rows.to_dict("records")
    if isinstance(rows, Mapping):
        n = len(rows["grades"])
        return [{k: v[i] for k, v in rows.items()} for i in range(n)]
    return list(rows)


def rows_to_batch(rows: Any, dims: ModalityDims, list_size: int) -> Batch:
    """Reshape flattened `training_lists` rows into the batch contract.

    `rows`: a pandas DataFrame, a dict of columns (each a sequence with one array per row) or a list of row
    dicts, with columns `grades, q_text, q_audio, q_mask, p_text, p_image, p_audio, p_mask` and optionally
    `p_lex` (others ignored).
    Null/empty feature arrays (missing modality) become zeros; the corresponding mask bits are forced to 0
    when the mask column is null too. Lists longer than `list_size` are truncated, shorter ones padded with
    grade PAD_GRADE and mask 0. Features of masked-out slots are zeroed.
    """
    recs = [_row_arrays(r, dims, list_size) for r in _records(rows)]
    if not recs:
        raise ValueError("rows_to_batch needs at least one row")
    return {k: torch.from_numpy(np.stack([r[k] for r in recs])) for k in BATCH_KEYS}


def _zero_where_absent(arr: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(arr, np.float32))
    return torch.where(mask.unsqueeze(-1) > 0, x, torch.zeros_like(x))


def batch_from_arrays(*, q_text: np.ndarray, q_audio: np.ndarray, q_mask: np.ndarray, p_text: np.ndarray,
                      p_image: np.ndarray, p_audio: np.ndarray, p_mask: np.ndarray,
                      grades: np.ndarray | None = None, p_lex: np.ndarray | None = None) -> Batch:
    """Batch from already-shaped arrays (see module doc for shapes). `grades=None` -> zeros (pure scoring);
    `p_lex=None` -> zeros.

    Features of masked-out modalities are zeroed so the contract holds whatever the caller passed.
    """
    p_mask_t = torch.as_tensor(np.asarray(p_mask, np.float32))
    q_mask_t = torch.as_tensor(np.asarray(q_mask, np.float32))
    g = np.zeros(p_mask_t.shape[:2], np.float32) if grades is None else np.asarray(grades, np.float32)
    lex = np.zeros((*p_mask_t.shape[:2], N_LEX), np.float32) if p_lex is None else np.asarray(p_lex, np.float32)
    out: Batch = {"q_mask": q_mask_t, "p_mask": p_mask_t, "grades": torch.as_tensor(g), "p_lex": torch.as_tensor(lex)}
    for i, (name, arr) in enumerate((("q_text", q_text), ("q_audio", q_audio))):
        out[name] = _zero_where_absent(arr, q_mask_t[:, i])
    for i, (name, arr) in enumerate((("p_text", p_text), ("p_image", p_image), ("p_audio", p_audio))):
        out[name] = _zero_where_absent(arr, p_mask_t[..., i])
    return out


def batch_size_of(batch: Batch) -> int:
    return int(batch["grades"].shape[0])


def select(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """Sub-batch of the lists at `index` (first dim)."""
    return {k: v[index] for k, v in batch.items()}


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along the list (first) dimension."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def iterate_batches(batch: Batch, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
    """Yield sub-batches of at most `batch_size` lists; with `shuffle`, in an order fixed by `seed` only
    (a private torch.Generator, so the global RNG is untouched)."""
    n = batch_size_of(batch)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        yield select(batch, order[start : start + batch_size])


def collate(rows: Sequence[Mapping[str, Any]], dims: ModalityDims, list_size: int) -> Batch:
    """DataLoader `collate_fn`: a list of `training_lists` row dicts -> batch (see `make_collate`)."""
    return rows_to_batch(list(rows), dims, list_size)


def make_collate(dims: ModalityDims, list_size: int) -> Callable[[Sequence[Mapping[str, Any]]], Batch]:
    """`collate` bound to `dims` and `list_size`, for `torch.utils.data.DataLoader(collate_fn=...)`."""
    return partial(collate, dims=dims, list_size=list_size)
