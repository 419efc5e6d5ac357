"""The `Encoder` interface: load once, decode items one by one, encode them in batches, never fail a batch.

Subclasses implement `decode(item)` (raw input -> tensor/string, raising `ItemError` with a quarantine
reason for bad input) and `_forward(batch)` (list of decoded items -> [n, dim] tensor); the base class
does batching, inference mode, autocast, device placement and per-item error collection.
"""
from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from mmrank.config import REPO_ROOT, FeaturesConf
from mmrank.encoders.device import autocast_dtype, inference, precision_name, resolve_device

log = logging.getLogger("mmrank.encoders")

_FINGERPRINT_BYTES = 1 << 20


class ItemError(ValueError):
    """One input item cannot be encoded; the message is the quarantine reason."""


def resolve(path: str | None) -> Path | None:
    """A configured local path; relative paths are relative to the repository root."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def file_fingerprint(*paths: Path) -> str:
    """Short content hash of files: size plus the first MB of each (cheap for multi-GB weights, mtime-free)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()[:12]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors` or a torch file (loaded with weights_only=True: never unpickles code)."""
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def warn_random_init(what: str, setting: str) -> None:
    """The loud warning for an encoder running without trained weights."""
    bar = "!" * 100
    log.warning("\n%s\n%s: NO PRETRAINED WEIGHTS (%s is not set). Using a seeded RANDOM-INIT network plus "
                "the documented hand-crafted features; the encoder version says 'random-init'. Set %s to a "
                "trained state_dict for real embeddings.\n%s", bar, what, setting, setting, bar)


class Encoder(ABC):
    """One modality's encoder. `encode(items) -> float32 [N, dim]`; `encode_safe` reports bad items instead."""

    modality: ClassVar[str]
    name: str
    version: str  # changes whenever weights or preprocessing change
    dim: int

    def __init__(self, name: str, features: FeaturesConf, batch_size: int):
        self.name = name
        self.features = features
        self.batch_size = batch_size
        self.device = resolve_device(features)
        self.dtype = autocast_dtype(features, self.device)
        self._loaded = False

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, version={self.version!r}, dim={self.dim}, " \
               f"device={self.device.type}, precision={self.precision})"

    # ---- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Build the model on `self.device` (called once, lazily, on the first encode)."""

    @abstractmethod
    def decode(self, item: Any) -> Any:
        """Validate and decode one raw item; raise `ItemError(reason)` if it cannot be encoded."""

    @abstractmethod
    def _forward(self, batch: list[Any]) -> torch.Tensor:
        """Decoded items -> [len(batch), dim] embeddings (runs under inference mode and autocast)."""

    def _length(self, decoded: Any) -> int:
        """Sort key for batching similar lengths together (less padding); 0 = keep input order."""
        return 0

    # ---- public ----------------------------------------------------------------------------------
    def load(self) -> "Encoder":
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def encode_decoded(self, decoded: Sequence[Any]) -> np.ndarray:
        """Embed already-decoded items in batches of `batch_size`; returns float32 [N, dim] in input order."""
        out = np.zeros((len(decoded), self.dim), dtype=np.float32)
        if not decoded:
            return out
        self.load()
        order = sorted(range(len(decoded)), key=lambda i: self._length(decoded[i]))
        with inference(self.device, self.dtype):
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                emb = self._forward([decoded[i] for i in idx])
                out[idx] = emb.float().cpu().numpy()
        return out

    def encode_safe(self, items: Sequence[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Per item: (embedding or None, None or the reason it failed). Bad items never fail the batch."""
        vecs: list[np.ndarray | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        ok, decoded = [], []
        for i, item in enumerate(items):
            try:
                decoded.append(self.decode(item))
                ok.append(i)
            except ItemError as e:
                errors[i] = str(e)[:300]
            except Exception as e:  # an unexpected decoder failure is still one item's problem
                errors[i] = f"{self.modality} decode failed: {type(e).__name__}: {e}"[:300]
        emb = self.encode_decoded(decoded)
        for j, i in enumerate(ok):
            vecs[i] = emb[j]
        return vecs, errors

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """float32 [N, dim]; raises `ItemError` naming the first bad item."""
        vecs, errors = self.encode_safe(items)
        bad = [(i, e) for i, e in enumerate(errors) if e is not None]
        if bad:
            raise ItemError(f"{len(bad)} of {len(items)} items failed; item {bad[0][0]}: {bad[0][1]}")
        return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, self.dim), np.float32)
