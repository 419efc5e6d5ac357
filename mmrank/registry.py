"""Registries: the names a config key accepts are the names registered in code, nothing else.

A `Registry` maps a name to an implementation (a loss function, an encoder class, a training backend, a data
loader, a candidate source, a fusion, a scoring head). Implementations register themselves where they are defined::

    @LOSSES.register("lambdarank")
    def lambdarank(scores, grades, sigma=1.0): ...

and `mmrank.config` validates a setting with `LOSSES.check(name)`, so a new loss is one function plus its
decorator and config accepts it at once. Each registry names the modules that define its built-in members
(`providers`); they are imported on first use, so config can use a registry without importing torch or Spark
at start-up.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Generic, Iterator, TypeVar

from mmrank.modalities import PRODUCT_MODALITIES

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations for one config key (`key` is used in error messages)."""

    def __init__(self, key: str, *providers: str):
        self.key = key
        self.providers = providers
        self._items: dict[str, T] = {}
        self._loaded = False
        self._lock = threading.RLock()

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: make the decorated object selectable under each of `names`."""
        def deco(obj: T) -> T:
            for n in names:
                self._items[n] = obj
            return obj
        return deco

    def _load(self) -> None:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                for module in self.providers:
                    importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def check(self, name: str) -> str:
        """`name` if registered, else ValueError naming the key and the registered names (config validators)."""
        if name not in self.names():
            raise ValueError(f"{name!r} is not registered for {self.key}; known: {', '.join(self.names())}")
        return name

    def get(self, name: str) -> T:
        self.check(name)
        return self._items[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


LOSSES: Registry = Registry("train.loss", "mmrank.ranker.losses")
FUSIONS: Registry = Registry("train.fusion", "mmrank.ranker.fusion")
HEADS: Registry = Registry("train.head", "mmrank.ranker.heads")
BACKENDS: Registry = Registry("train.backend", "mmrank.distributed.backends")
LOADERS: Registry = Registry("train.data_loader", "mmrank.distributed.loaders")
CANDIDATE_SOURCES: Registry = Registry("score.candidates", "mmrank.scoring.candidates")
_EXTRA_ENCODER_MODULES = {"audio": ("mmrank.encoders.audio_lstm",)}
ENCODERS: dict[str, Registry] = {m: Registry(f"features.{m}.name", f"mmrank.encoders.{m}",
                                             *_EXTRA_ENCODER_MODULES.get(m, ())) for m in PRODUCT_MODALITIES}
