"""The text tower learns: fine-tune the text encoder on the training lists with the ranking loss.

The score of a (query, product) pair is `finetune.scale` x the cosine of their text embeddings (the zero-shot
similarity); the configured ranking loss (`train.loss`) is minimised over the train lists and the epoch with
the best validation NDCG@10 is kept, the untrained encoder being the one to beat (epoch -1). Modes
(`finetune.mode`):
- `adapter`: a residual linear map on the pooled embedding, e = normalize(x + x W), W starting at 0; the base
  embeddings are computed once, so an epoch costs a few matrix products (CPU-friendly at any size);
- `top`: the last `finetune.top_layers` transformer layers; the frozen layers' outputs are computed once per
  text and cached, so an epoch runs only the trained layers;
- `all`: every layer (costly on CPU).
The result is a versioned HF model folder `<artifacts_dir>/text_encoders/<base>-ft-<mode>-<hash>/` (the hash of
the trained weights, so every fine-tuned encoder has its own encoder version), with `finetune.json` recording
base, mode, data and validation metrics. Point `features.text.path` at it: featurize then re-encodes every
product and query text with it (the version is in each feature row's content hash), so both sides of every
match use the same tower. Lists, texts and cached states are bounded by `finetune.max_lists`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmrank.config import FinetuneConf
from mmrank.encoders.text import ADAPTER_FILE, mean_pool
from mmrank.ranker.batch import PAD_GRADE
from mmrank.ranker.losses import get_loss
from mmrank.ranker.metrics import evaluate_lists

log = logging.getLogger("mmrank.finetune")

META_FILE = "finetune.json"
_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class ListData:
    """Lists as indexes into `texts`: query `q` [n], products `p` [n, L] (-1 = padding), `grades` [n, L]."""

    q: np.ndarray
    p: np.ndarray
    grades: np.ndarray


@dataclass
class FinetuneResult:
    path: str | None          # the new encoder folder; None when no epoch beat the base encoder
    version: str | None
    base_val_ndcg10: float
    best_val_ndcg10: float
    best_epoch: int
    epochs_run: int
    seconds: float
    train_lists: int
    val_lists: int


def index_lists(lists: pd.DataFrame, q_index: dict[str, int], p_index: dict[str, int], list_size: int) -> ListData:
    """`training_lists` rows -> ListData; products without text become padding (grade -1)."""
    n = len(lists)
    q = np.array([q_index.get(x, -1) for x in lists["query_id"]])
    p = np.full((n, list_size), -1)
    g = np.full((n, list_size), PAD_GRADE, np.float32)
    for i, (pids, grades) in enumerate(zip(lists["product_ids"], lists["grades"])):
        for j, (pid, gr) in enumerate(zip(list(pids)[:list_size], list(grades)[:list_size])):
            if gr != PAD_GRADE and pid in p_index:
                p[i, j], g[i, j] = p_index[pid], gr
    keep = (q >= 0) & (g != PAD_GRADE).any(axis=1)
    return ListData(q[keep], p[keep], g[keep])


class Adapter(nn.Module):
    """e = normalize(x + x W) on fixed base embeddings x; W starts at 0 (the base encoder)."""

    def __init__(self, base: np.ndarray):
        super().__init__()
        self.base = torch.as_tensor(base, dtype=torch.float32)
        self.weight = nn.Parameter(torch.zeros(base.shape[1], base.shape[1]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.base[idx]
        return nn.functional.normalize(x + x @ self.weight, dim=-1)


class Tower(nn.Module):
    """The transformer with its last `k` layers trained; the frozen part's outputs are cached per text."""

    def __init__(self, path: Path, texts: list[str], cfg: FinetuneConf):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        layers = self.model.encoder.layer
        self.k = len(layers) if cfg.mode == "all" else min(cfg.top_layers, len(layers))
        self.texts, self.max_length = texts, cfg.max_length
        for prm in self.model.parameters():
            prm.requires_grad_(cfg.mode == "all")
        for layer in layers[len(layers) - self.k:]:
            for prm in layer.parameters():
                prm.requires_grad_(True)
        self.cache = None if cfg.mode == "all" else self._frozen_states()

    def _tokens(self, texts: list[str]):
        return self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    @torch.no_grad()
    def _frozen_states(self, chunk: int = 256) -> list[torch.Tensor]:
        layers, out = self.model.encoder.layer, []
        for s in range(0, len(self.texts), chunk):
            tok = self._tokens(self.texts[s:s + chunk])
            h = self.model.embeddings(input_ids=tok["input_ids"], token_type_ids=tok.get("token_type_ids"))
            ext = self.model.get_extended_attention_mask(tok["attention_mask"], tok["input_ids"].shape)
            for layer in layers[:len(layers) - self.k]:
                h = layer(h, attention_mask=ext)[0]
            lens = tok["attention_mask"].sum(1)
            out += [h[i, :int(lens[i])].to(torch.bfloat16) for i in range(len(lens))]
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            tok = self._tokens([self.texts[i] for i in idx.tolist()])
            return mean_pool(self.model(**tok).last_hidden_state, tok["attention_mask"])
        states = [self.cache[i] for i in idx.tolist()]
        h = nn.utils.rnn.pad_sequence(states, batch_first=True).float()
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(x)) for x in states], batch_first=True)
        ext = self.model.get_extended_attention_mask(mask, h.shape[:2])
        layers = self.model.encoder.layer
        for layer in layers[len(layers) - self.k:]:
            h = layer(h, attention_mask=ext)[0]
        return mean_pool(h, mask)


def list_scores(embed: Callable[[torch.Tensor], torch.Tensor], data: ListData, rows: np.ndarray,
                scale: float) -> torch.Tensor:
    """[len(rows), L] scale x cosine(query, product); padding slots score 0 (their grade is -1)."""
    q, p = data.q[rows], data.p[rows]
    uniq, inv = np.unique(np.concatenate([q, p[p >= 0]]), return_inverse=True)
    emb = embed(torch.as_tensor(uniq))
    qe = emb[torch.as_tensor(inv[:len(q)])]
    slots = torch.zeros(*p.shape, emb.shape[1])
    slots[torch.as_tensor(p >= 0)] = emb[torch.as_tensor(inv[len(q):])]
    return scale * (qe[:, None, :] * slots).sum(-1)


def _val_ndcg(module: nn.Module, data: ListData, scale: float, chunk: int = 64) -> float:
    module.eval()
    with torch.no_grad():
        scores = np.concatenate([list_scores(module, data, np.arange(s, min(s + chunk, len(data.q))), scale).numpy()
                                 for s in range(0, len(data.q), chunk)])
    return float(evaluate_lists(scores, data.grades.astype(np.float64), ks=(10,))["ndcg@10"])


def train_tower(module: nn.Module, train: ListData, val: ListData, cfg: FinetuneConf, loss_spec,
                seed: int) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Fit `module` (Adapter or Tower) on `train`, early-stopped on validation NDCG@10. Returns (best trained
    parameters or None when no epoch beat the untrained module, history)."""
    loss_fn = get_loss(loss_spec)
    params = [p for p in module.parameters() if p.requires_grad]
    lr = cfg.lr if isinstance(module, Adapter) else cfg.lr / 20
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    base = _val_ndcg(module, val, cfg.scale)
    best, best_epoch, best_state, bad, history = base, -1, None, 0, []
    for epoch in range(cfg.epochs):
        module.train()
        t0, total = time.perf_counter(), 0.0
        order = rng.permutation(len(train.q))
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            loss = loss_fn(list_scores(module, train, rows, cfg.scale), torch.as_tensor(train.grades[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        score = _val_ndcg(module, val, cfg.scale)
        history.append({"epoch": epoch, "train_loss": total / max(len(order), 1), "val_ndcg@10": score,
                        "seconds": round(time.perf_counter() - t0, 1)})
        log.info("finetune epoch %d: loss %.4f val ndcg@10 %.4f (base %.4f)", epoch + 1, history[-1]["train_loss"],
                 score, base)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    return best_state, {"base_val_ndcg10": base, "best_val_ndcg10": best, "best_epoch": best_epoch,
                        "history": history}


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()[:10]


def save_encoder(out_root: Path, base: Path, base_name: str, module: nn.Module, state: dict[str, torch.Tensor],
                 mode: str, meta: dict) -> Path:
    """Write the fine-tuned encoder as a new HF folder (atomic rename) and return it."""
    final = out_root / f"{base_name}-ft-{mode}-{_digest(state)}"
    if final.exists():
        return final
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{uuid.uuid4().hex}"
    try:
        if isinstance(module, Adapter):
            tmp.mkdir()
            for f in (*_HF_FILES, "model.safetensors", "pytorch_model.bin"):
                if (base / f).exists():
                    shutil.copy2(base / f, tmp / f)
            from safetensors.torch import save_file

            save_file({"weight": state["weight"].contiguous()}, str(tmp / ADAPTER_FILE))
        else:
            shutil.copytree(base, tmp)
            module.load_state_dict(state, strict=False)
            module.model.save_pretrained(str(tmp), safe_serialization=True)
            module.tok.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_module(mode: str, base_path: Path, texts: list[str], base_embed: Callable[[list[str]], np.ndarray],
                 cfg: FinetuneConf) -> nn.Module:
    """The trainable text tower of `mode` over `texts`."""
    if mode == "adapter":
        return Adapter(base_embed(texts))
    return Tower(base_path, texts, cfg)


def result_of(path: Path | None, version: str | None, info: dict, seconds: float, train: ListData,
              val: ListData) -> FinetuneResult:
    return FinetuneResult(str(path) if path else None, version, info["base_val_ndcg10"], info["best_val_ndcg10"],
                          info["best_epoch"], len(info["history"]), round(seconds, 1), len(train.q), len(val.q))

