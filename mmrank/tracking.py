"""MLflow runs and model registry: every training and evaluation is a run; every trained model a registered
version; aliases `champion` (what scoring uses) and `challenger` (trained, not yet promoted).

Where (the `tracking` config section):
- embedded default: a SQLite tracking store and registry at `<storage.artifacts_dir>/mlflow/mlflow.db`, run
  artifacts under `<storage.artifacts_dir>/mlflow/artifacts`, created on first use (nothing to start);
- Databricks: `tracking_uri: databricks` (the workspace tracking server) and `registry_uri: databricks-uc`
  (Unity Catalog; `model_name` is then `catalog.schema.name`).

What is logged (`Tracker.log_training`): the whole config (`config.json`) and the training settings as params,
the Delta versions of the training inputs (`data.<table>` params), the encoder versions, the per-epoch
`train_loss` and validation metrics (step = epoch; `@` written `_at_`: `val_ndcg_at_10`), the kept epoch's
metrics, and the artifact folder as it is (`weights.safetensors` + `model.json`) under `model/` with an
`MLmodel` file that describes it (flavor `mmrank`, a tensor signature) but holds no pickled code: a model is
only ever loaded by `mmrank.ranker.artifact.load_artifact` from safetensors. A registered version carries the
artifact version as tag `mmrank_artifact_version`; scoring loads that version from `storage.artifacts_dir`.
Re-logging the same artifact version reuses its run and its registered version (idempotent re-runs).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from mmrank.lakehouse import Lakehouse
from mmrank.storage import PathLike, local_path

log = logging.getLogger("mmrank.tracking")

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_PATH = "model"
TAG_ARTIFACT = "mmrank_artifact_version"
TAG_RUN_DATE = "mmrank_run_date"
TAG_STAGE = "mmrank_stage"
TAG_DATASET = "mmrank_dataset"
TAG_PREVIOUS = "mmrank_previous_champion"
TAG_GATE = "mmrank_gate"
_DB_FILE = "mlflow.db"


def metric_key(name: str) -> str:
    """An mmrank metric name as an MLflow metric key (`ndcg@10` -> `ndcg_at_10`: `@` is not allowed)."""
    return name.replace("@", "_at_")


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and the mmrank artifact version it holds."""

    name: str
    version: str
    artifact_version: str
    run_id: str | None = None

    def __str__(self) -> str:
        return f"{self.artifact_version} (registry {self.name} v{self.version})"


def locations(lh: Lakehouse) -> tuple[str, str, str | None]:
    """(tracking URI, registry URI, experiment artifact location or None = the server's default)."""
    tc = lh.cfg.tracking
    if tc.tracking_uri:
        tracking, artifacts = tc.tracking_uri, None
    else:
        local = local_path(lh.paths.tracking)
        if local is None:
            raise ValueError(f"the embedded MLflow store (SQLite) needs a local or file:// storage.artifacts_dir, "
                             f"not {lh.paths.tracking}; set tracking.tracking_uri to a tracking server")
        folder = Path(local)
        tracking, artifacts = f"sqlite:///{folder / _DB_FILE}", (folder / "artifacts").as_uri()
    return tracking, tc.registry_uri or tracking, artifacts


@contextmanager
def _on_local_disk(p: PathLike) -> Iterator[Path]:
    """`p` (a file or a flat folder) as a local path for MLflow's uploads: itself when it is local or
    `file://`, else a temporary copy."""
    local = local_path(p)
    if local is not None:
        yield Path(local)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / p.name
        if p.is_dir():
            dest.mkdir()
            for f in p.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
        else:
            dest.write_bytes(p.read_bytes())
        yield dest


def store_exists(lh: Lakehouse) -> bool:
    """False only when the embedded SQLite store was never created (a remote store is assumed to exist)."""
    return bool(lh.cfg.tracking.tracking_uri) or (lh.paths.tracking / _DB_FILE).exists()


_CLIENTS: dict[tuple[str, str], Any] = {}


def _mlflow_client(tracking_uri: str, registry_uri: str):
    """One MlflowClient per (tracking, registry) URI and process (opening a store is not free)."""
    if (tracking_uri, registry_uri) not in _CLIENTS:
        with warnings.catch_warnings():  # mlflow's own pydantic models warn about the `model_` namespace
            warnings.simplefilter("ignore")
            from mlflow import MlflowClient

            _CLIENTS[(tracking_uri, registry_uri)] = MlflowClient(tracking_uri, registry_uri)
    return _CLIENTS[(tracking_uri, registry_uri)]


class Tracker:
    """MLflow client for one configuration: its experiment, runs and registered model."""

    def __init__(self, lh: Lakehouse):
        self.lh, self.cfg = lh, lh.cfg.tracking
        self.tracking_uri, self.registry_uri, self._artifact_location = locations(lh)
        if not self.cfg.tracking_uri:
            lh.paths.tracking.mkdir(parents=True, exist_ok=True)
        self.client = _mlflow_client(self.tracking_uri, self.registry_uri)
        self.model_name = self.cfg.model_name
        self._experiment_id: str | None = None

    # ---- experiment and runs -------------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            self._experiment_id = (exp.experiment_id if exp is not None else
                                   self.client.create_experiment(self.cfg.experiment, self._artifact_location))
        return self._experiment_id

    def find_runs(self, **tags: str) -> list:
        """Active runs of the experiment whose tags equal `tags`, newest first."""
        flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        return list(self.client.search_runs([self.experiment_id], flt, order_by=["attributes.start_time DESC"]))

    def _new_run(self, name: str, tags: dict[str, str], params: dict[str, Any], metrics: list) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        rid = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(rid, params=items[i:i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(rid, metrics=metrics[i:i + 1000])
        return rid

    def log_training(self, run_date: dt.date, artifact_dir: PathLike, meta: dict[str, Any], history: list[dict],
                     data_versions: dict[str, int]) -> str:
        """Log one training run (see the module doc); returns its run id (the existing one for a re-run)."""
        from mlflow.entities import Metric

        version = meta["version"]
        found = self.find_runs(**{TAG_STAGE: "train", TAG_ARTIFACT: version})
        if found:
            log.info("mlflow: artifact %s already logged as run %s", version, found[0].info.run_id)
            return found[0].info.run_id
        cfg = self.lh.cfg
        now = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
        metrics = [Metric(metric_key(k), float(v), now + int(rec["epoch"]), int(rec["epoch"]))
                   for rec in history for k, v in rec.items() if k != "epoch" and v == v]
        metrics += [Metric(metric_key(f"best_val_{k}"), float(v), now, 0)
                    for k, v in (meta.get("val_metrics") or {}).items() if v == v]
        metrics += [Metric(k, float(meta[k]), now, 0) for k in ("best_epoch", "epochs_run", "samples_per_sec")
                    if meta.get(k) is not None]
        params = {f"train.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v
                  for k, v in cfg.train.model_dump(mode="json").items()}
        params |= {f"data.{t}_version": v for t, v in sorted(data_versions.items())}
        params |= {f"encoder.{m}": ",".join(v) for m, v in (meta.get("encoder_versions") or {}).items()}
        params |= {"backend": meta.get("backend"), "world_size": meta.get("world_size"),
                   "data_loader": meta.get("data_loader"), "config_hash": cfg.fingerprint(),
                   "artifact_version": version}
        tags = {TAG_STAGE: "train", TAG_ARTIFACT: version, TAG_RUN_DATE: run_date.isoformat()}
        rid = self._new_run(f"train-{run_date.isoformat()}", tags, params, metrics)
        self.client.log_dict(rid, cfg.model_dump(mode="json", by_alias=True), "config.json")
        with _on_local_disk(artifact_dir) as folder:
            self.client.log_artifacts(rid, str(folder), MODEL_PATH)
        with tempfile.TemporaryDirectory() as tmp:
            _mlmodel(meta, rid).save(str(Path(tmp) / "MLmodel"))
            self.client.log_artifact(rid, str(Path(tmp) / "MLmodel"), MODEL_PATH)
        self.client.set_terminated(rid)
        log.info("mlflow: logged training run %s for artifact %s", rid, version)
        return rid

    def log_evaluation(self, run_date: dt.date, dataset: str, rows: pd.DataFrame, files: list[PathLike],
                       artifact_version: str | None) -> str:
        """Log an evaluation: one metric per (model, split, metric@k), the report files as artifacts. A re-run
        of the same date and dataset replaces (deletes) the earlier run."""
        from mlflow.entities import Metric

        tags = {TAG_STAGE: "evaluate", TAG_RUN_DATE: run_date.isoformat(), TAG_DATASET: dataset}
        for old in self.find_runs(**tags):
            self.client.delete_run(old.info.run_id)
        now = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
        metrics = [Metric(metric_key(f"{r.model_name}.{r.split}.{r.metric}" + (f"@{int(r.k)}" if r.k == r.k and
                                                                              r.k is not None else "")),
                          float(r.value), now, 0) for r in rows.itertuples() if r.value == r.value]
        if artifact_version:
            tags[TAG_ARTIFACT] = artifact_version
        rid = self._new_run(f"evaluate-{dataset}-{run_date.isoformat()}", tags,
                            {"config_hash": self.lh.cfg.fingerprint(), "dataset": dataset}, metrics)
        for f in files:
            if f.exists():
                with _on_local_disk(f) as local:
                    self.client.log_artifact(rid, str(local), "evaluation")
        self.client.set_terminated(rid)
        return rid

    # ---- registry ------------------------------------------------------------------------------------------
    def _ref(self, mv) -> ModelRef:
        return ModelRef(mv.name, str(mv.version), str((mv.tags or {}).get(TAG_ARTIFACT, "")), mv.run_id)

    def register(self, run_id: str, artifact_version: str, run_date: dt.date) -> ModelRef:
        """The registered version of `run_id`'s model, creating the registered model and version if needed."""
        from mlflow.exceptions import MlflowException

        for mv in self.client.search_model_versions(f"name = '{self.model_name}' and run_id = '{run_id}'"):
            return self._ref(mv)
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(self.model_name, description="mmrank multimodal fusion ranker")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
        mv = self.client.create_model_version(self.model_name, source, run_id,
                                              tags={TAG_ARTIFACT: artifact_version, TAG_RUN_DATE: run_date.isoformat()})
        return self._ref(mv)

    def alias(self, alias: str) -> ModelRef | None:
        """The version holding `alias`, or None (no registered model yet, or alias unset)."""
        from mlflow.exceptions import MlflowException

        try:
            return self._ref(self.client.get_model_version_by_alias(self.model_name, alias))
        except MlflowException:
            return None

    def set_alias(self, alias: str, ref: ModelRef) -> None:
        self.client.set_registered_model_alias(self.model_name, alias, ref.version)

    def delete_alias(self, alias: str) -> None:
        if self.alias(alias) is not None:
            self.client.delete_registered_model_alias(self.model_name, alias)

    def tag(self, ref: ModelRef, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.model_name, ref.version, key, value)

    def version(self, ident: str) -> ModelRef:
        """A registered version by registry number (`3`) or artifact version (`fusion-...`); KeyError if absent."""
        for mv in self.client.search_model_versions(f"name = '{self.model_name}'"):
            ref = self._ref(mv)
            if ident in (ref.version, ref.artifact_version):
                return ref
        raise KeyError(f"no registered version {ident!r} of model {self.model_name!r}")

    def tags_of(self, ref: ModelRef) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, ref.version).tags or {})

    # ---- views (notebooks) ---------------------------------------------------------------------------------
    def versions_frame(self) -> pd.DataFrame:
        """One row per registered version: version, artifact version, aliases, run id, gate decision."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = dict(self.client.get_registered_model(self.model_name).aliases or {})
        except MlflowException:
            aliases = {}
        rows = [{"version": int(mv.version), "artifact_version": (mv.tags or {}).get(TAG_ARTIFACT),
                 "aliases": ", ".join(sorted(a for a, v in aliases.items() if str(v) == str(mv.version))),
                 "run_id": mv.run_id, "gate": (mv.tags or {}).get(TAG_GATE, "")}
                for mv in self.client.search_model_versions(f"name = '{self.model_name}'")]
        return pd.DataFrame(rows, columns=["version", "artifact_version", "aliases", "run_id", "gate"]
                            ).sort_values("version").reset_index(drop=True)

    def runs_frame(self, stage: str = "train") -> pd.DataFrame:
        """Runs of one stage (newest first): run id, run date, artifact version and their metrics."""
        rows = [{"run_id": r.info.run_id, "run_date": r.data.tags.get(TAG_RUN_DATE),
                 "artifact_version": r.data.tags.get(TAG_ARTIFACT), **r.data.metrics}
                for r in self.find_runs(**{TAG_STAGE: stage})]
        return pd.DataFrame(rows)


def _mlmodel(meta: dict[str, Any], run_id: str):
    """The `MLmodel` description of an mmrank artifact: flavor `mmrank` (files and loader) and a tensor
    signature (Unity Catalog requires one); no python_function flavor, nothing pickled."""
    import numpy as np
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    d = meta["dims"]
    f32 = np.dtype("float32")
    inputs = [TensorSpec(f32, (-1, d["text"]), "q_text"), TensorSpec(f32, (-1, d["audio"]), "q_audio"),
              TensorSpec(f32, (-1, 2), "q_mask")]
    inputs += [TensorSpec(f32, (-1, -1, d[m]), f"p_{m}") for m in ("text", "image", "audio")]
    inputs.append(TensorSpec(f32, (-1, -1, 3), "p_mask"))
    sig = ModelSignature(Schema(inputs), Schema([TensorSpec(f32, (-1, -1), "scores")]))
    flavor = {"weights": "weights.safetensors", "meta": "model.json", "version": meta["version"],
              "loader": "mmrank.ranker.artifact.load_artifact (safetensors only)"}
    return Model(artifact_path=MODEL_PATH, run_id=run_id, flavors={"mmrank": flavor}, signature=sig)


def tracker(lh: Lakehouse) -> Tracker | None:
    """The configuration's Tracker, or None when `tracking.enabled` is off."""
    return Tracker(lh) if lh.cfg.tracking.enabled else None


def champion_version(lh: Lakehouse) -> str | None:
    """Artifact version of the registered `champion`, or None (tracking off, no store yet, no champion)."""
    if not lh.cfg.tracking.enabled or not store_exists(lh):
        return None
    ref = tracker(lh).alias(CHAMPION)
    return ref.artifact_version if ref is not None and ref.artifact_version else None
