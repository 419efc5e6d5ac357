"""Encoders registered by (modality, name); `get_encoder` builds the configured one once per process."""
from __future__ import annotations

import importlib
import threading
from typing import Callable

from mmrank.config import FeaturesConf
from mmrank.encoders.base import Encoder

MODALITIES = ("text", "image", "audio")
ENCODERS: dict[str, dict[str, type[Encoder]]] = {m: {} for m in MODALITIES}
_CACHE: dict[tuple[str, str], Encoder] = {}
_LOCK = threading.Lock()


def register(modality: str, *names: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: make an encoder selectable as `features.<modality>.name: <name>`."""
    def deco(cls: type[Encoder]) -> type[Encoder]:
        for n in names:
            ENCODERS[modality][n] = cls
        return cls
    return deco


def _import_builtin() -> None:
    for m in MODALITIES:
        importlib.import_module(f"mmrank.encoders.{m}")


def get_encoder(modality: str, features: FeaturesConf) -> Encoder:
    """The encoder configured in `features.<modality>`, cached per process and configuration.

    Construction is cheap (version and dim only); weights load on the first encode.
    """
    if modality not in ENCODERS:
        raise KeyError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    key = (modality, features.model_dump_json())
    with _LOCK:
        if key not in _CACHE:
            _import_builtin()
            name = getattr(features, modality).name
            if name not in ENCODERS[modality]:
                raise KeyError(f"features.{modality}.name = {name!r} is not a registered encoder; "
                               f"known: {', '.join(sorted(ENCODERS[modality]))}")
            _CACHE[key] = ENCODERS[modality][name](name, features)
        return _CACHE[key]
