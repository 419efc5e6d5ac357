"""`get_encoder`: the configured encoder of a modality, built once per Python process and configuration.

Encoders register themselves in `mmrank.registry.ENCODERS[modality]` (`@ENCODERS["image"].register("resnet18")`),
so `features.<modality>.name` accepts exactly the registered names.
"""
from __future__ import annotations

import threading

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder
from mmrank.registry import ENCODERS

_CACHE: dict[tuple[str, str], Encoder] = {}
_LOCK = threading.Lock()


def get_encoder(modality: str, features: FeaturesConf) -> Encoder:
    """The encoder configured in `features.<modality>`, cached per process and configuration.

    Construction is cheap (version and dim only); weights load on the first encode.
    """
    if modality not in ENCODERS:
        raise KeyError(f"unknown modality {modality!r}; known: {', '.join(ENCODERS)}")
    key = (modality, features.model_dump_json())
    with _LOCK:
        if key not in _CACHE:
            name = getattr(features, modality).name
            _CACHE[key] = ENCODERS[modality].get(name)(name, features)
        return _CACHE[key]
