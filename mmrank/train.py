"""The `train` stage: fit the fusion ranker on `training_lists` with the configured backend and data loader,
then save the model artifact (`mmrank.ranker.artifact`) with its provenance.

Checkpoints go to `lh.work_path("checkpoints", <run key>)`; the run key covers run_date, backend, loader,
process count, the `training_lists` version and the training settings except `max_epochs`/`patience`, so a
re-started run (or one given more epochs) resumes from its last checkpoint. They are deleted once the
artifact is saved.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path

from pyspark.sql import functions as F

from mmrank.config import TrainConf
from mmrank.distributed.backends import TrainOutcome, train_with_backend, world_size_of
from mmrank.lakehouse import Lakehouse
from mmrank.ranker.artifact import save_artifact
from mmrank.ranker.batch import ModalityDims
from mmrank.ranker.fit import CHECKPOINT_FILE
from mmrank.runs import track_stage

log = logging.getLogger("mmrank")

_NOT_IN_RUN_KEY = ("max_epochs", "patience", "train_every_days")


def infer_dims(lh: Lakehouse) -> ModalityDims:
    """Embedding dims from the `training_lists` array lengths; `product_features.dim` for a modality that is
    absent from every list."""
    r = lh.read("training_lists").agg(
        F.max(F.size("grades")).alias("l"), F.max(F.size("q_text")).alias("t"),
        F.max(F.size("p_image")).alias("i"), F.max(F.size("q_audio")).alias("a"),
        F.max(F.size("p_audio")).alias("pa")).first()
    if r is None or not r["l"] or r["l"] <= 0:
        raise ValueError("training_lists is empty: run the training_lists stage first")
    found = {"text": r["t"], "image": (r["i"] or 0) // r["l"], "audio": max(r["a"] or 0, (r["pa"] or 0) // r["l"])}
    missing = [m for m, d in found.items() if not d or d <= 0]
    if missing:
        feats = {row["modality"]: row["d"] for row in lh.read("product_features").groupBy("modality")
                 .agg(F.max("dim").alias("d")).collect()}
        for m in missing:
            if not feats.get(m):
                raise ValueError(f"cannot infer the {m} embedding dim from training_lists or product_features")
            found[m] = feats[m]
    return ModalityDims(**{m: int(d) for m, d in found.items()})


def encoder_versions(lh: Lakehouse) -> dict[str, list[str]]:
    """modality -> sorted `encoder:encoder_version` strings present in product_features ({} if absent)."""
    if not lh.exists("product_features"):
        return {}
    rows = lh.read("product_features").select("modality", "encoder", "encoder_version").distinct().collect()
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["modality"], []).append(f"{r['encoder']}:{r['encoder_version']}")
    return {m: sorted(v) for m, v in sorted(out.items())}


def run_key(run_date: dt.date, train: TrainConf, backend: str, lists_version: int | None) -> str:
    settings = {k: v for k, v in train.model_dump(mode="json").items() if k not in _NOT_IN_RUN_KEY}
    blob = json.dumps({"settings": settings, "backend": backend, "lists": lists_version}, sort_keys=True)
    return f"{run_date:%Y%m%d}-{backend}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def train_and_save(lh: Lakehouse, run_date: dt.date, backend: str | None = None) -> tuple[TrainOutcome, str]:
    """Train with `backend` (default cfg.train.backend), resuming from this run's checkpoint if one exists;
    save the artifact; returns (outcome, artifact version)."""
    train = lh.cfg.train
    backend = backend or train.backend
    dims = infer_dims(lh)
    lists_version = lh.version("training_lists")
    ckpt: Path = lh.work_path("checkpoints", run_key(run_date, train, backend, lists_version))
    resume = (ckpt / CHECKPOINT_FILE).exists()
    if resume:
        log.info("resuming from checkpoint in %s", ckpt)
    out = train_with_backend(lh, train, dims, backend=backend, checkpoint_dir=ckpt, resume=resume)
    meta = {
        "run_date": run_date.isoformat(), "backend": out.backend, "world_size": out.world_size,
        "data_loader": out.data_loader, "training_lists_version": lists_version,
        "encoder_versions": encoder_versions(lh), "val_metrics": out.fit.best_metrics,
        "best_epoch": out.fit.best_epoch, "epochs_run": out.fit.epochs_run,
        "samples_per_sec": out.fit.samples_per_sec,
    }
    version = save_artifact(out.model, meta, lh.cfg.resolve_path(lh.cfg.storage.artifacts_dir))
    log.info("train %s: saved model artifact %s (best epoch %d of %d)", run_date, version, out.fit.best_epoch + 1,
             out.fit.epochs_run)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out, version


def run(lh: Lakehouse, run_date: dt.date, backend: str | None = None) -> dict[str, int]:
    """The `train` stage: counts train/val lists, epochs, samples/s; `rec.model_version` = artifact version."""
    with track_stage(lh, "train", run_date, inputs=("training_lists",)) as rec:
        out, version = train_and_save(lh, run_date, backend)
        by_split = dict(lh.read("training_lists").groupBy("split").count().collect())
        rec.model_version = version
        rec.counts.update({
            "train_lists": int(by_split.get("train", 0)), "val_lists": int(by_split.get("validation", 0)),
            "epochs": out.fit.epochs_run, "samples_per_sec": int(round(out.fit.samples_per_sec)),
            "world_size": world_size_of(out.backend, lh.cfg.train.num_proc)})
        return dict(rec.counts)
