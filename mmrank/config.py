"""Typed, validated configuration loaded from `conf/*.yaml` plus `--set key=value` overrides.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key or a bad value fails at start-up
with a message that names the key, the value given and what is allowed (see `ConfigError`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ValidationError

from mmrank.config_base import DEFAULT_CONF, REPO_ROOT, VALIDATION_METRICS, ConfigError, _Section, check_path
from mmrank.config_data import (UPSTREAM_COLUMNS, AudioEncoderConf, ByoSourceConf, DeltaSourceConf,
                                FeaturesConf, FinetuneConf, GeneratorConf, ImageEncoderConf, IngestConf, LabelsConf,
                                LexicalConf, SparkConf, StorageConf, TextEncoderConf, UpstreamTable)
from mmrank.config_model import AlignConf, EvaluateConf, LossSpec, ScoreConf, TrackingConf, TrainConf, TuneConf

if TYPE_CHECKING:
    from mmrank.storage import PathLike

__all__ = ["DEFAULT_CONF", "REPO_ROOT", "UPSTREAM_COLUMNS", "VALIDATION_METRICS", "AlignConf", "AudioEncoderConf",
           "ByoSourceConf", "ConfigError", "DeltaSourceConf", "EvaluateConf", "FeaturesConf", "FinetuneConf",
           "GeneratorConf", "ImageEncoderConf", "IngestConf", "LabelsConf", "LexicalConf", "LossSpec", "MMRankConfig",
           "ScoreConf", "SparkConf", "StorageConf", "TextEncoderConf", "TrackingConf", "TrainConf", "TuneConf",
           "UpstreamTable", "check_path", "load_config"]


class MMRankConfig(_Section):
    """The whole configuration of one mmrank deployment."""

    env: Literal["local", "databricks"] = "local"
    spark: SparkConf = SparkConf()
    storage: StorageConf = StorageConf()
    generator: GeneratorConf = GeneratorConf()
    ingest: IngestConf = IngestConf()
    labels: LabelsConf = LabelsConf()
    features: FeaturesConf = FeaturesConf()
    lexical: LexicalConf = LexicalConf()
    finetune: FinetuneConf = FinetuneConf()
    train: TrainConf = TrainConf()
    score: ScoreConf = ScoreConf()
    evaluate: EvaluateConf = EvaluateConf()
    tracking: TrackingConf = TrackingConf()

    def fingerprint(self) -> str:
        """Stable short hash of the effective configuration (recorded in run metadata)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def resolve_path(self, p: str) -> "PathLike":
        """A storage location: URIs stay URIs (`StoragePath`, exactly as configured); relative local paths
        are relative to the repository root (`pathlib.Path`)."""
        from mmrank.storage import is_uri, location

        if is_uri(p):
            return location(p)
        path = Path(p).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _set_in(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


_SENSITIVE = ("secret", "password", "token", "credential", "key")


def _shown(key: str, value: object) -> str:
    """A bad value as the error may print it: short scalars under harmless keys; anything else (mappings may
    hold credentials, e.g. `spark.extra`) is withheld."""
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 60):
        if not any(s in key.lower() for s in _SENSITIVE):
            return f" (value {value!r})"
    return " (value withheld)"


def _format_errors(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}{_shown(key, e['input'])}: not a setting; check the spelling")
        else:
            allowed = e.get("ctx", {}).get("expected") or e["msg"]
            lines.append(f"{key}{_shown(key, e['input'])} is invalid: {allowed}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MMRankConfig:
    """Load YAML at `path` (default conf/local.yaml), apply `key.path=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONF
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_in(raw, keys, value)
    try:
        return MMRankConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw)) from None
