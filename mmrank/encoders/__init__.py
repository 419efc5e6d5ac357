"""Encoders: text, image and audio models behind one interface (`Encoder`), chosen by name in conf.

`get_encoder(modality, cfg.features)` returns the configured encoder, built once per Python process
(a Spark Python worker loads each model once and reuses it for every batch it receives).
"""
from mmrank.encoders.base import Encoder, ItemError
from mmrank.encoders.registry import ENCODERS, get_encoder, register

__all__ = ["ENCODERS", "Encoder", "ItemError", "get_encoder", "register"]
