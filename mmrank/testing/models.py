"""Small models for tests and benchmarks that must run offline (no weights downloaded)."""
from __future__ import annotations

import os


def tiny_bert_dir(root: str | os.PathLike) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with the shipped MiniLM tokenizer, saved to `root`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmrank.encoders.text import shipped_minilm_path

    tok = AutoTokenizer.from_pretrained(str(shipped_minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)
