"""Model artifacts: `artifacts_dir/models/<version>/{weights.safetensors, model.json}` plus `models/LATEST`.

Weights are safetensors only: loading never unpickles anything. `artifacts_dir` is any storage location
(`mmrank.storage`: a local folder or a `file://`, `s3a://`, `abfss://`, `gs://`, `dbfs:/` URI). Writes are
safe on object stores, where rename is not atomic: the version folder's weights are written first, then its
`model.json` (the marker that the version is complete), then the `LATEST` pointer, each one single-object
write. Readers only see versions whose `model.json` exists and follow `LATEST`, so they never see a
half-written model; a save interrupted before `model.json` leaves files that nothing reads and a re-save
overwrites. Version = `fusion-<yyyymmdd>-<first 8 hex of sha256 of the weights file>`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, save as save_bytes

from mmrank.config import TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.model import FusionRanker
from mmrank.storage import PathLike, location, write_atomic

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
LATEST_FILE = "LATEST"
VERSION_PREFIX = "fusion"
FORMAT_VERSION = 1
# On disk the gated fusion's parameters keep the names they had before fusions became modules of their own
# (`gate.*`, `gate_bias`), so every artifact, old or new, has one layout and identical weights give one version.
_DISK_NAMES = {"fusion.gate.": "gate.", "fusion.gate_bias": "gate_bias"}
_RESERVED = ("version", "created_at", "dims", "train", "format")


class ArtifactError(RuntimeError):
    """A model artifact is missing, incomplete or not in the safetensors format."""


def _models_dir(artifacts_dir: str | os.PathLike) -> PathLike:
    return location(artifacts_dir) / "models"


def _renamed(state: dict[str, Any], prefixes: dict[str, str]) -> dict[str, Any]:
    """`state` with each key starting with a prefix in `prefixes` given that prefix's replacement."""
    return {next((new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)), k): v
            for k, v in state.items()}


def save_artifact(model: FusionRanker, meta: dict[str, Any], artifacts_dir: str | os.PathLike,
                  now: dt.datetime | None = None) -> str:
    """Write `model` + `meta` (JSON-serialisable: encoder versions, metrics, ...) as a new version and point
    LATEST at it; returns the version. `model.json` = meta plus `version, created_at, dims, train, format`
    (meta may not use those keys). Re-saving identical weights on the same day reuses the version."""
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved for the artifact itself")
    now = now or dt.datetime.now(dt.timezone.utc)
    models = _models_dir(artifacts_dir)
    state = _renamed({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, _DISK_NAMES)
    weights = save_bytes(state)
    version = f"{VERSION_PREFIX}-{now:%Y%m%d}-{hashlib.sha256(weights).hexdigest()[:8]}"
    folder = models / version
    if not _complete(folder):
        doc = {**meta, "version": version, "created_at": now.isoformat(), "format": FORMAT_VERSION,
               "dims": model.dims.as_dict(), "train": model.cfg.model_dump(mode="json")}
        write_atomic(folder / WEIGHTS_FILE, weights)
        write_atomic(folder / META_FILE, json.dumps(doc, indent=2, sort_keys=True).encode())  # commits the version
    write_atomic(models / LATEST_FILE, version.encode())                                      # then the pointer
    return version


def _complete(folder: PathLike) -> bool:
    return (folder / META_FILE).exists() and (folder / WEIGHTS_FILE).exists()


def version_folder(artifacts_dir: str | os.PathLike, version: str) -> PathLike:
    """The folder holding one saved version (`weights.safetensors`, `model.json`)."""
    return _models_dir(artifacts_dir) / version


def latest_version(artifacts_dir: str | os.PathLike) -> str:
    """The version LATEST points at; ArtifactError if no model was saved yet."""
    path = _models_dir(artifacts_dir) / LATEST_FILE
    if not path.exists():
        raise ArtifactError(f"no model artifact in {_models_dir(artifacts_dir)} (no {LATEST_FILE} file)")
    return path.read_text().strip()


def list_versions(artifacts_dir: str | os.PathLike) -> list[str]:
    """Complete model versions saved under `artifacts_dir`, oldest first (by `created_at` in model.json)."""
    models = _models_dir(artifacts_dir)
    if not models.exists():
        return []
    found = []
    for d in models.iterdir():
        if not d.name.startswith(".") and d.name != LATEST_FILE and _complete(d):
            found.append((json.loads((d / META_FILE).read_text()).get("created_at", ""), d.name))
    return [v for _, v in sorted(found)]


def load_artifact(artifacts_dir: str | os.PathLike, version: str | None = None) -> tuple[FusionRanker, dict[str, Any]]:
    """(model in eval mode, the model.json dict) of `version` (default: LATEST). Never unpickles: a weights
    file that is not safetensors raises ArtifactError."""
    version = version or latest_version(artifacts_dir)
    folder = _models_dir(artifacts_dir) / version
    if not _complete(folder):
        raise ArtifactError(f"model version {version!r} not found or incomplete in {folder}")
    meta = json.loads((folder / META_FILE).read_text())
    # artifacts written before `match_features`, the prior, lexical features or alignment existed lack them
    train_cfg = TrainConf.model_validate({"match_features": False, "prior": "none", "lexical_features": False,
                                          "align": {"enabled": False}, **meta["train"]})
    model = FusionRanker(ModalityDims(**meta["dims"]), train_cfg)
    try:
        state = load_bytes((folder / WEIGHTS_FILE).read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file ({err}); "
                            "refusing to load it any other way") from None
    model.load_state_dict(_renamed(state, {v: k for k, v in _DISK_NAMES.items()}), strict=True)
    model.eval()
    return model, meta
