"""The `train` stage: fit the fusion ranker on `training_lists` with the configured backend and data loader,
then save the model artifact (`mmrank.ranker.artifact`) with its provenance, log the run to MLflow and register
the model as `challenger` (`mmrank.tracking`; the `promote` stage decides whether it becomes `champion`).
With `train.pca_dim` the per-modality PCA is fitted on the train split first (`mmrank.ranker.pca`); with
`train.prune_sparsity` the trained model is magnitude-pruned before it is saved (`mmrank.ranker.compress`).

Before training, the cross-modal alignment is learned from the catalog (`mmrank.ranker.align`, `train.align`) and
a bounded hyperparameter search picks lr / weight decay / patience on the validation split
(`mmrank.ranker.tune`, `train.tune`); both are recorded in the artifact's meta (`alignment`, `tuning`).

Checkpoints go to `lh.paths.checkpoints(<run key>)`; the run key covers run_date, backend, loader,
process count, the `training_lists` version and the training settings except `max_epochs`/`patience`, so a
re-started run (or one given more epochs) resumes from its last checkpoint. They are deleted once the
artifact is saved.

Unless forced (`jobs/train.py` always is; the nightly's `--force-train`), the stage trains only when it is
due (`train_due`): no model yet, or the latest model was trained `train.train_every_days` or more days before
the run_date. When it is not due it records a `succeeded` row with message `not due: ...` and the current model
version, and scoring keeps using that model.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging

from pyspark.sql import functions as F

from mmrank.config import TrainConf
from mmrank.distributed.backends import TrainOutcome, train_with_backend, world_size_of
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank import tracking
from mmrank.ranker.align import alignment_state
from mmrank.ranker.artifact import ArtifactError, latest_version, load_artifact, save_artifact, version_folder
from mmrank.ranker.compress import prune_model
from mmrank.ranker.fit import CHECKPOINT_FILE
from mmrank.ranker.pca import pca_init_state, train_split_moments
from mmrank.ranker.tune import tune_from_lists
from mmrank.runs import StageRun, versions
from mmrank.stages import stage
from mmrank.stages.training_lists import list_dims
from mmrank.storage import remove_tree

log = logging.getLogger("mmrank")

_NOT_IN_RUN_KEY = ("max_epochs", "patience", "train_every_days")


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
    dims = list_dims(lh)
    align, align_info = alignment_state(lh, train.align, dims, train.seed) or (None, None)
    train, tuning = tune_from_lists(lh, train, dims, align)   # train.tune: lr / weight decay / patience
    lists_version = lh.version("training_lists")
    ckpt = lh.paths.checkpoints(run_key(run_date, train, backend, lists_version))
    resume = (ckpt / CHECKPOINT_FILE).exists()
    if resume:
        log.info("resuming from checkpoint in %s", ckpt)
    pca = (pca_init_state(train_split_moments(lh, dims, train.list_size), dims, train.pca_dim)
           if train.pca_dim else None)
    out = train_with_backend(lh, train, dims, backend=backend, checkpoint_dir=ckpt, resume=resume, init_state=pca,
                             align=align)
    prune_model(out.model, train.prune_sparsity)
    meta = {
        "run_date": run_date.isoformat(), "backend": out.backend, "world_size": out.world_size,
        "data_loader": out.data_loader, "training_lists_version": lists_version,
        "encoder_versions": encoder_versions(lh), "val_metrics": out.fit.best_metrics,
        "best_epoch": out.fit.best_epoch, "epochs_run": out.fit.epochs_run,
        "samples_per_sec": out.fit.samples_per_sec, "initial_val_metrics": out.fit.initial_metrics,
        "tuning": tuning, "alignment": align_info,
    }
    version = save_artifact(out.model, meta, lh.paths.artifacts)
    log.info("train %s: saved model artifact %s (best epoch %d of %d)", run_date, version, out.fit.best_epoch + 1,
             out.fit.epochs_run)
    remove_tree(ckpt)
    return out, version


DATA_TABLES = ("training_lists", "labels", "product_features", "query_features")


def track_training(lh: Lakehouse, run_date: dt.date, version: str, out: TrainOutcome) -> str:
    """Log the training run to MLflow, register the model and make it the `challenger` (unless it already is
    the champion); returns what to say in the runs row."""
    tr = tracking.tracker(lh)
    if tr is None:
        return "tracking disabled"
    folder = version_folder(lh.paths.artifacts, version)
    meta = json.loads((folder / "model.json").read_text())
    run_id = tr.log_training(run_date, folder, meta, out.fit.history, versions(lh, DATA_TABLES))
    ref = tr.register(run_id, version, run_date)
    champion = tr.alias(tracking.CHAMPION)
    if champion is not None and champion.version == ref.version:
        return f"mlflow run {run_id}; {ref} is already champion"
    tr.set_alias(tracking.CHALLENGER, ref)
    return f"mlflow run {run_id}; registered {ref} as {tracking.CHALLENGER}"


def last_trained(lh: Lakehouse, run_date: dt.date) -> tuple[str | None, dt.date | None]:
    """(latest model version, run_date it was trained for) or (None, None) when there is no model.

    The date comes from the artifact meta (`run_date`) when present, else from the latest `succeeded`
    train row in `runs` that really trained (not a `not due` row), else the artifact's `created_at` day.
    """
    adir = lh.paths.artifacts
    try:
        version = latest_version(adir)
    except ArtifactError:
        return None, None
    trained: dt.date | None = None
    created = None
    try:
        _, meta = load_artifact(adir, version)
        raw = meta.get("run_date") or meta.get("trained_run_date")
        trained = dt.date.fromisoformat(str(raw)[:10]) if raw else None
        created = meta.get("created_at")
    except Exception as e:  # unreadable meta: fall back to the runs table
        log.warning("could not read model %s meta: %s", version, e)
    if trained is None and lh.exists("runs"):
        row = (lh.read("runs").where("stage = 'train' AND status = 'succeeded' AND "
                                     "coalesce(message, '') NOT LIKE 'not due%'")
               .where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
               .agg(F.max("run_date")).first())
        trained = row[0] if row else None
    if trained is None and created:
        trained = dt.date.fromisoformat(str(created)[:10])
    return str(version), trained


def train_due(lh: Lakehouse, run_date: dt.date, force: bool = False) -> tuple[bool, str, str | None]:
    """(due?, reason, current model version)."""
    version, trained = last_trained(lh, run_date)
    every = lh.cfg.train.train_every_days
    if force:
        return True, "forced", version
    if version is None:
        return True, "no model yet", None
    if trained is None:
        return True, f"model {version} has no training date", version
    age = (run_date - trained).days
    if age >= every:
        return True, f"model {version} is {age} day(s) old (train.train_every_days = {every})", version
    return False, f"not due: model {version} is {age} day(s) old (train.train_every_days = {every})", version


@stage("train", inputs=("training_lists",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, backend: str | None = None,
        force: bool = True) -> dict[str, int]:
    """Train (when due or `force`d) and save the artifact: counts of train/val lists, epochs, samples/s;
    `rec.model_version` = the artifact version (the kept model's when not due)."""
    due, reason, version = train_due(lh, run_date, force)
    if not due:
        rec.model_version, rec.message = version, reason
        log.info("train %s: %s: keeping it", run_date, reason)
        return {"trained": 0}
    log.info("train %s: training (%s)", run_date, reason)
    out, version = train_and_save(lh, run_date, backend)
    by_split = dict(lh.read("training_lists").groupBy("split").count().collect())
    rec.model_version = version
    rec.message = track_training(lh, run_date, version, out)
    return {"train_lists": int(by_split.get("train", 0)), "val_lists": int(by_split.get("validation", 0)),
            "epochs": out.fit.epochs_run, "samples_per_sec": int(round(out.fit.samples_per_sec)),
            "world_size": world_size_of(out.backend, lh.cfg.train.num_proc)}
