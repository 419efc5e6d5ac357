"""The `Encoder` interface: load once, decode items one by one, encode them in batches, never fail a batch.

Subclasses implement `decode(item)` (raw input -> tensor/string, raising `ItemError` with a quarantine
reason for bad input), optionally `_collate(batch)` (decoded items -> what `_forward` takes, e.g. one pinned
host tensor; runs on the decode thread) and `_forward(collated)` (-> [n, dim] tensor, may raise `BadItems`
for items that fail only on the device). The base class does batching, inference mode, autocast, device
placement, per-item error collection and, when `features.overlap` is on (auto: on a GPU), decodes and
collates the next window of batches on a CPU thread while the model runs the current one.

An encoder is built without a device (`name`, `version`, `dim` need none: the driver only reads those) and is
placed on its device when it loads: `mmrank.encoders.device.resolve_device`, i.e. the GPU Spark gave the task.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from mmrank.config import REPO_ROOT, FeaturesConf
from mmrank.encoders.device import autocast_dtype, inference, precision_name, resolve_device

log = logging.getLogger("mmrank.encoders")

_FINGERPRINT_BYTES = 1 << 20
WINDOW_BATCHES = 4  # with overlap: batches decoded per window (one window ahead of the model)
_Prepared = tuple[dict[int, str], list[tuple[list[int], list[Any], Any]]]


class ItemError(ValueError):
    """One input item cannot be encoded; the message is the quarantine reason."""


class BadItems(Exception):
    """Raised by `_forward` when some items of its batch fail only there (e.g. a JPEG that both the GPU and the
    CPU decoder reject): batch position -> reason. The base class encodes the other items again without them."""

    def __init__(self, reasons: dict[int, str]):
        super().__init__(f"{len(reasons)} item(s) failed in the forward pass")
        self.reasons = reasons


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

    def __init__(self, name: str, features: FeaturesConf, batch_size: int, device: torch.device | None = None):
        self.name = name
        self.features = features
        self.batch_size = batch_size
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        if device is not None:
            self._place(device)
        self._loaded = False

    def _place(self, device: torch.device) -> None:
        self.device = device
        self.dtype = autocast_dtype(self.features.precision, device)

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    @property
    def overlaps(self) -> bool:
        """Whether decoding of the next window runs on a thread beside the model (`features.overlap`)."""
        o = self.features.overlap
        return o == "on" or (o == "auto" and self.device is not None and self.device.type == "cuda")

    def __repr__(self) -> str:
        where = self.device if self.device is not None else "not placed"
        return f"{type(self).__name__}({self.name!r}, version={self.version!r}, dim={self.dim}, " \
               f"device={where}, precision={self.precision})"

    # ---- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Build the model on `self.device` (called once, lazily, on the first encode)."""

    @abstractmethod
    def decode(self, item: Any) -> Any:
        """Validate and decode one raw item; raise `ItemError(reason)` if it cannot be encoded."""

    @abstractmethod
    def _forward(self, batch: Any) -> torch.Tensor:
        """`_collate(decoded items)` -> [n, dim] embeddings (runs under inference mode and autocast)."""

    def _collate(self, batch: list[Any]) -> Any:
        """Decoded items -> the input of `_forward` (on the decode thread when overlapping); default: the list."""
        return batch

    def _length(self, decoded: Any) -> int:
        """Sort key for batching similar lengths together (less padding); 0 = keep input order."""
        return 0

    # ---- public ----------------------------------------------------------------------------------
    def load(self) -> "Encoder":
        """Place the encoder (Spark's GPU for this task, see `resolve_device`) and build its model, once."""
        if not self._loaded:
            if self.device is None:
                self._place(resolve_device(self.features.device))
            self._load()
            self._loaded = True
        return self

    def encode_safe(self, items: Sequence[Any]) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Per item: (embedding or None, None or the reason it failed). Bad items never fail the batch.

        Without overlap all items are decoded, sorted by `_length` and batched; with overlap the same happens
        per window of WINDOW_BATCHES batches, the next window being decoded on a thread meanwhile.
        """
        self.load()
        vecs: list[np.ndarray | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        if not self.overlaps:
            self._run(self._prepare(items, 0, len(items), False), vecs, errors)
            return vecs, errors
        window = self.batch_size * WINDOW_BATCHES
        spans = [(s, min(len(items), s + window)) for s in range(0, len(items), window)]
        with ThreadPoolExecutor(1, thread_name_prefix=f"decode-{self.modality}") as pool:
            ahead = pool.submit(self._prepare, items, *spans[0], True) if spans else None
            for k in range(len(spans)):
                prepared = ahead.result()
                if k + 1 < len(spans):
                    ahead = pool.submit(self._prepare, items, *spans[k + 1], True)
                self._run(prepared, vecs, errors)
        return vecs, errors

    def encode(self, items: Sequence[Any]) -> np.ndarray:
        """float32 [N, dim]; raises `ItemError` naming the first bad item."""
        vecs, errors = self.encode_safe(items)
        bad = [(i, e) for i, e in enumerate(errors) if e is not None]
        if bad:
            raise ItemError(f"{len(bad)} of {len(items)} items failed; item {bad[0][0]}: {bad[0][1]}")
        return np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, self.dim), np.float32)

    # ---- internals -------------------------------------------------------------------------------
    def _prepare(self, items: Sequence[Any], lo: int, hi: int, collate: bool) -> _Prepared:
        """Decode items[lo:hi] into (decode errors by index, model batches sorted by `_length`: (indices, decoded
        items, their `_collate` when `collate` else None))."""
        errors, decoded = {}, {}
        for i in range(lo, hi):
            try:
                decoded[i] = self.decode(items[i])
            except ItemError as e:
                errors[i] = str(e)[:300]
            except Exception as e:  # an unexpected decoder failure is still one item's problem
                errors[i] = f"{self.modality} decode failed: {type(e).__name__}: {e}"[:300]
        ok = sorted(decoded, key=lambda i: self._length(decoded[i]))
        batches = []
        for s in range(0, len(ok), self.batch_size):
            idx = ok[s:s + self.batch_size]
            batch = [decoded[i] for i in idx]
            batches.append((idx, batch, self._collate(batch) if collate else None))
        return errors, batches

    def _run(self, prepared: _Prepared, vecs: list, errors: list) -> None:
        """Embed prepared batches into `vecs` / `errors` (by item index)."""
        decode_errors, batches = prepared
        for i, reason in decode_errors.items():
            errors[i] = reason
        with inference(self.device, self.dtype):
            for idx, batch, collated in batches:
                for i, vec, reason in zip(idx, *self._embed(batch, collated)):
                    vecs[i], errors[i] = vec, reason

    def _embed(self, batch: list[Any], collated: Any = None) -> tuple[list[np.ndarray | None], list[str | None]]:
        """One model batch -> per item (embedding, None), or (None, reason) for the items `_forward` rejected."""
        try:
            emb = self._forward(collated if collated is not None else self._collate(batch))
        except BadItems as e:
            reasons = {j: r[:300] for j, r in e.reasons.items()}
            keep = [j for j in range(len(batch)) if j not in reasons]
            vecs: list[np.ndarray | None] = [None] * len(batch)
            if keep:
                kept, kept_reasons = self._embed([batch[j] for j in keep])
                for j, vec, reason in zip(keep, kept, kept_reasons):
                    vecs[j] = vec
                    if reason is not None:
                        reasons[j] = reason
            return vecs, [reasons.get(j) for j in range(len(batch))]
        return list(emb.float().cpu().numpy()), [None] * len(batch)
