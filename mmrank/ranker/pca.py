"""Optional per-modality PCA of the model's inputs (`train.pca_dim`), fitted on the train split.

The second design note reduces each modality's features before fusion. Here that is a fixed linear map
x -> (x - mean_m) @ components_m ([D_m] -> [k_m], k_m = min(pca_dim, D_m)) applied to the raw embeddings of
modality m before its projection, on the product side and, for text and audio, on the query side (query and
product of a modality come from one encoder, so they share one PCA). Means and components are buffers of the
model, so they are saved in the artifact's safetensors file and restored with it; nothing is refitted at
scoring time. The match features (query-product cosines) keep using the raw embeddings.

Fitting needs only the first two moments of each modality's vectors (count, sum, sum of outer products), which
add across partitions: `moments_of_batch` computes them for one batch (a Spark partition or an in-memory split),
`add_moments` combines them, `pca_buffers` turns them into the buffers (top-k eigenvectors of the covariance,
signs fixed so the largest entry of each component is positive: deterministic).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES, ModalityDims
from mmrank.ranker.batch import Batch

Moments = dict[str, tuple[float, np.ndarray, np.ndarray]]  # modality -> (n, sum [D], sum of x x^T [D, D])


class PCAInputs(nn.Module):
    """Buffers `<modality>_mean` [D] and `<modality>_components` [D, k] per product modality."""

    def __init__(self, dims: ModalityDims, k: int):
        super().__init__()
        for m in PRODUCT_MODALITIES:
            d = dims.of(m)
            self.register_buffer(f"{m}_mean", torch.zeros(d))
            self.register_buffer(f"{m}_components", torch.eye(d)[:, :min(k, d)].contiguous())

    def out_dim(self, modality: str) -> int:
        return int(getattr(self, f"{modality}_components").shape[1])

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (x - getattr(self, f"{modality}_mean")) @ getattr(self, f"{modality}_components")


def moments_of_batch(batch: Batch, dims: ModalityDims) -> Moments:
    """Moments of every present product vector and, for text/audio, every present query vector."""
    out: Moments = {}
    for i, m in enumerate(PRODUCT_MODALITIES):
        p = batch[f"p_{m}"].reshape(-1, dims.of(m))[batch["p_mask"][..., i].reshape(-1) > 0]
        parts = [p]
        if m in QUERY_MODALITIES:
            parts.append(batch[f"q_{m}"][batch["q_mask"][:, QUERY_MODALITIES.index(m)] > 0])
        x = torch.cat(parts).double().numpy()
        out[m] = (float(len(x)), x.sum(0), x.T @ x)
    return out


def add_moments(a: Moments | None, b: Moments) -> Moments:
    if a is None:
        return b
    return {m: (a[m][0] + b[m][0], a[m][1] + b[m][1], a[m][2] + b[m][2]) for m in b}


def pca_buffers(moments: Moments, ks: dict[str, int]) -> dict[str, np.ndarray]:
    """`<m>_mean` and `<m>_components` (float32) from the moments, k = ks[m] components each."""
    out = {}
    for m, k in ks.items():
        n, s, ss = moments[m]
        d = len(s)
        if n < 1:
            out[f"{m}_mean"], out[f"{m}_components"] = np.zeros(d, np.float32), np.eye(d, dtype=np.float32)[:, :k]
            continue
        mean = s / n
        cov = ss / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        comp = vectors[:, np.argsort(values)[::-1][:k]]
        signs = np.sign(comp[np.abs(comp).argmax(axis=0), np.arange(k)])
        out[f"{m}_mean"] = mean.astype(np.float32)
        out[f"{m}_components"] = np.ascontiguousarray(comp * np.where(signs == 0, 1.0, signs), np.float32)
    return out


def pca_init_state(moments: Moments, dims: ModalityDims, k: int) -> dict[str, np.ndarray]:
    """The model's `pca.*` state entries (see `FusionRanker`) for `train.pca_dim = k`."""
    ks = {m: min(k, dims.of(m)) for m in PRODUCT_MODALITIES}
    return {f"pca.{name}": value for name, value in pca_buffers(moments, ks).items()}


def train_split_moments(lh, dims: ModalityDims, list_size: int) -> Moments:
    """Moments of the `training_lists` train split, computed per Spark partition and tree-reduced (the driver
    holds a few D x D matrices, whatever the number of lists)."""
    from mmrank.ranker.batch import rows_to_batch

    def per_partition(rows):
        import pandas as pd

        acc = None
        chunk = []
        for r in rows:
            chunk.append(r.asDict())
            if len(chunk) == 256:
                acc = add_moments(acc, moments_of_batch(rows_to_batch(pd.DataFrame(chunk), dims, list_size), dims))
                chunk = []
        if chunk:
            acc = add_moments(acc, moments_of_batch(rows_to_batch(pd.DataFrame(chunk), dims, list_size), dims))
        if acc is not None:
            yield acc

    cols = ["grades", "q_text", "q_audio", "q_mask", "p_text", "p_image", "p_audio", "p_mask"]
    rdd = lh.read("training_lists").where("split = 'train'").select(*cols).rdd.mapPartitions(per_partition)
    if rdd.isEmpty():
        raise ValueError("train.pca_dim is set but training_lists has no train lists to fit the PCA on")
    return rdd.treeReduce(add_moments)
