"""Every folder mmrank uses besides its tables, derived from the `storage` config in one place.

- `artifacts`: model versions (`ranker.artifact`); `tracking`: the embedded MLflow store (`mmrank.tracking`);
  `text_encoders`: fine-tuned text encoders (`ranker.finetune`, one versioned HF folder each);
  `reports(run_date)`: the nightly and evaluation reports;
- `work(*parts)`: scratch space (training checkpoints, the petastorm cache), created on demand;
- `landing`: the raw landing zone (`sample/` is the generated sample's).
Each is a storage location (`mmrank.storage`): a `pathlib.Path` for a local folder, a `StoragePath` for a URI
(`file://`, `s3a://`, `abfss://`, `gs://`, `dbfs:/`), with the same pathlib-style methods. Relative paths in
config are relative to the repository root (`MMRankConfig.resolve_path`); URIs are kept exactly as configured.
On a cluster every one of them must be shared storage that the driver and all executors can reach.
"""
from __future__ import annotations

import datetime as dt

from mmrank.config import MMRankConfig
from mmrank.storage import PathLike, configure, spark_uri


class StoragePaths:
    """Folders of one configuration (see the module doc); applies `storage.fs_options` to this process."""

    def __init__(self, cfg: MMRankConfig):
        self.cfg = cfg
        if cfg.storage.fs_options:
            configure(cfg.storage.fs_options)

    def _resolve(self, p: str) -> PathLike:
        return self.cfg.resolve_path(p)

    @property
    def artifacts(self) -> PathLike:
        return self._resolve(self.cfg.storage.artifacts_dir)

    @property
    def tracking(self) -> PathLike:
        """The embedded MLflow tracking store and registry (SQLite + run artifacts), when no URI is configured."""
        return self.artifacts / "mlflow"

    @property
    def text_encoders(self) -> PathLike:
        """`<artifacts_dir>/text_encoders/` (not created)."""
        return self.artifacts / "text_encoders"

    def reports(self, run_date: dt.date) -> PathLike:
        """`<reports_dir>/<run_date>/` (not created)."""
        return self._resolve(self.cfg.storage.reports_dir) / run_date.isoformat()

    def work(self, *parts: str) -> PathLike:
        """A scratch folder under `storage.work_dir` (created)."""
        p = self._resolve(self.cfg.storage.work_dir).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def checkpoints(self, run_key: str) -> PathLike:
        return self.work("checkpoints", run_key)

    def petastorm_cache(self) -> PathLike:
        return self.work("petastorm_cache")

    def petastorm_cache_url(self) -> str:
        """The petastorm cache folder as the URL petastorm wants (`file:///...` for local folders)."""
        p = self.petastorm_cache()
        return spark_uri(p).replace("file:/", "file:///", 1) if spark_uri(p).startswith("file:/") else str(p)

    @property
    def landing(self) -> PathLike:
        return self._resolve(self.cfg.storage.raw_dir)

    @property
    def warehouse(self) -> PathLike:
        """Spark SQL's warehouse folder (local sessions only)."""
        return self._resolve(self.cfg.storage.root) / "_spark_warehouse"
