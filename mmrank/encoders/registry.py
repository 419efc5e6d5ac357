"""`get_encoder`: the configured encoder of a modality, built once per Python process, configuration and device;
`encoder_identity`: its name, version and dim without a device (what the driver needs).

Encoders register themselves in `mmrank.registry.ENCODERS[modality]` (`@ENCODERS["image"].register("resnet18")`),
so `features.<modality>.name` accepts exactly the registered names.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder
from mmrank.encoders.device import resolve_device
from mmrank.registry import ENCODERS

_CACHE: dict[tuple[str, str], Encoder] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class EncoderIdentity:
    """What the driver records about an encoder: no weights loaded, no device touched."""

    modality: str
    name: str
    version: str
    dim: int


def _build(modality: str, features: FeaturesConf, device: torch.device | None) -> Encoder:
    if modality not in ENCODERS:
        raise KeyError(f"unknown modality {modality!r}; known: {', '.join(ENCODERS)}")
    name = getattr(features, modality).name
    return ENCODERS[modality].get(name)(name, features, device=device)


def encoder_identity(modality: str, features: FeaturesConf) -> EncoderIdentity:
    """Name, version and dim of the configured encoder, computed without a device (a CPU driver planning work
    for GPU workers, or a driver configured with `features.device=cuda` and no GPU, can call it)."""
    enc = _build(modality, features, None)
    return EncoderIdentity(modality, enc.name, enc.version, enc.dim)


def get_encoder(modality: str, features: FeaturesConf, device: torch.device | None = None) -> Encoder:
    """The encoder configured in `features.<modality>` on `device` (default `resolve_device(features.device)`: the
    GPU Spark assigned to this task), cached per process and configuration.

    A reused Spark Python worker can serve tasks assigned different GPUs: the cached encoder is then rebuilt on
    the new device (the old one is dropped, so one process never holds a model on every GPU).
    Construction is cheap (version and dim only); weights load on the first encode.
    """
    if modality not in ENCODERS:
        raise KeyError(f"unknown modality {modality!r}; known: {', '.join(ENCODERS)}")
    device = device if device is not None else resolve_device(features.device)
    key = (modality, features.model_dump_json())
    with _LOCK:
        enc = _CACHE.get(key)
        if enc is None or enc.device != device:
            _CACHE[key] = enc = _build(modality, features, device)
        return enc
