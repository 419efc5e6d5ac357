"""The modality vocabulary, defined once: which modalities products and queries have, which one a query searches
with, how embeddings are normalised, and the embedding widths of a model (`ModalityDims`).

Products have text, image and audio; queries have text (typed) and audio (voice), in that order everywhere
(tensor slots, mask columns, table values). A query searches the catalog with the first of `SEARCH_ORDER` it
has: a typed query with its text, a voice query with its audio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

PRODUCT_MODALITIES = ("text", "image", "audio")
QUERY_MODALITIES = ("text", "audio")
SEARCH_ORDER = QUERY_MODALITIES
MATCHED = tuple(m for m in PRODUCT_MODALITIES if m in QUERY_MODALITIES)  # modalities both sides have
_EPS = 1e-12


@dataclass(frozen=True)
class ModalityDims:
    """Embedding widths per modality; query text/audio share the product text/audio widths."""

    text: int
    image: int
    audio: int

    def of(self, modality: str) -> int:
        return int(getattr(self, modality))

    def as_dict(self) -> dict[str, int]:
        return {m: self.of(m) for m in PRODUCT_MODALITIES}


def widths_from_list_lengths(lengths: Mapping[str, int | None], list_size: int) -> dict[str, int]:
    """Embedding widths from the flattened array lengths of a `training_lists` row (`q_text`, `p_image`,
    `q_audio`, `p_audio`; a product array holds list_size x width values); 0 where no array says."""
    return {"text": int(lengths.get("q_text") or 0), "image": int(lengths.get("p_image") or 0) // list_size,
            "audio": max(int(lengths.get("q_audio") or 0), int(lengths.get("p_audio") or 0) // list_size)}


def search_choice(has: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per query modality, a boolean mask of the queries that search with it: the first modality of
    SEARCH_ORDER a query has (`has[m]`: which queries have modality m)."""
    taken: np.ndarray | None = None
    out = {}
    for m in SEARCH_ORDER:
        h = np.asarray(has[m], dtype=bool)
        out[m] = h if taken is None else h & ~taken
        taken = out[m] if taken is None else taken | out[m]
    return out


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero); dtype is kept."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS).astype(x.dtype, copy=False)
