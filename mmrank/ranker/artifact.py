"""Model artifacts: `artifacts_dir/models/<version>/{weights.safetensors, model.json}` plus `models/LATEST`.

Weights are safetensors only: loading never unpickles anything. A version is written to a temporary folder
and renamed into place, and `LATEST` is replaced atomically, so readers never see a half-written model.
Version = `fusion-<yyyymmdd>-<first 8 hex of sha256 of the weights file>`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmrank.config import TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.model import FusionRanker

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


def _models_dir(artifacts_dir: str | Path) -> Path:
    return Path(artifacts_dir) / "models"


def _renamed(state: dict[str, Any], prefixes: dict[str, str]) -> dict[str, Any]:
    """`state` with each key starting with a prefix in `prefixes` given that prefix's replacement."""
    return {next((new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)), k): v
            for k, v in state.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_artifact(model: FusionRanker, meta: dict[str, Any], artifacts_dir: str | Path,
                  now: dt.datetime | None = None) -> str:
    """Write `model` + `meta` (JSON-serialisable: encoder versions, metrics, ...) as a new version and point
    LATEST at it; returns the version. `model.json` = meta plus `version, created_at, dims, train, format`
    (meta may not use those keys). Re-saving identical weights on the same day reuses the version."""
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved for the artifact itself")
    now = now or dt.datetime.now(dt.timezone.utc)
    models = _models_dir(artifacts_dir)
    models.mkdir(parents=True, exist_ok=True)
    tmp = models / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state = _renamed({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, _DISK_NAMES)
        save_file(state, str(tmp / WEIGHTS_FILE))
        digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()[:8]
        version = f"{VERSION_PREFIX}-{now:%Y%m%d}-{digest}"
        doc = {**meta, "version": version, "created_at": now.isoformat(), "format": FORMAT_VERSION,
               "dims": model.dims.as_dict(),
               "train": model.cfg.model_dump(mode="json")}
        (tmp / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
        final = models / version
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(models / LATEST_FILE, version)
    return version


def latest_version(artifacts_dir: str | Path) -> str:
    """The version LATEST points at; ArtifactError if no model was saved yet."""
    path = _models_dir(artifacts_dir) / LATEST_FILE
    if not path.exists():
        raise ArtifactError(f"no model artifact in {_models_dir(artifacts_dir)} (no {LATEST_FILE} file)")
    return path.read_text().strip()


def list_versions(artifacts_dir: str | Path) -> list[str]:
    """Complete model versions saved under `artifacts_dir`, oldest first (by `created_at` in model.json)."""
    models = _models_dir(artifacts_dir)
    if not models.exists():
        return []
    found = []
    for d in models.iterdir():
        meta = d / META_FILE
        if d.is_dir() and not d.name.startswith(".") and meta.exists() and (d / WEIGHTS_FILE).exists():
            found.append((json.loads(meta.read_text()).get("created_at", ""), d.name))
    return [v for _, v in sorted(found)]


def load_artifact(artifacts_dir: str | Path, version: str | None = None) -> tuple[FusionRanker, dict[str, Any]]:
    """(model in eval mode, the model.json dict) of `version` (default: LATEST). Never unpickles: a weights
    file that is not safetensors raises ArtifactError."""
    version = version or latest_version(artifacts_dir)
    folder = _models_dir(artifacts_dir) / version
    if not (folder / META_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise ArtifactError(f"model version {version!r} not found or incomplete in {folder}")
    meta = json.loads((folder / META_FILE).read_text())
    # artifacts written before `match_features`, the prior, lexical features or alignment existed lack them
    train_cfg = TrainConf.model_validate({"match_features": False, "prior": "none", "lexical_features": False,
                                          "align": {"enabled": False}, **meta["train"]})
    model = FusionRanker(ModalityDims(**meta["dims"]), train_cfg)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} is not a valid safetensors file ({err}); "
                            "refusing to load it any other way") from None
    model.load_state_dict(_renamed(state, {v: k for k, v in _DISK_NAMES.items()}), strict=True)
    model.eval()
    return model, meta
