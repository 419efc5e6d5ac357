"""Every folder mmrank uses besides its tables, derived from the `storage` config in one place.

- `artifacts`: model versions (`ranker.artifact`); `text_encoders`: fine-tuned text encoders
  (`ranker.finetune`, one versioned HF folder each); `reports(run_date)`: the nightly and evaluation reports;
- `work(*parts)`: scratch space (training checkpoints, the petastorm cache), created on demand;
- `landing`: the raw landing zone (`sample/` is the generated sample's).
Relative paths in config are relative to the repository root (`MMRankConfig.resolve_path`).
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from mmrank.config import MMRankConfig


class StoragePaths:
    """Folders of one configuration (see the module doc)."""

    def __init__(self, cfg: MMRankConfig):
        self.cfg = cfg

    def _resolve(self, p: str) -> Path:
        return self.cfg.resolve_path(p)

    @property
    def artifacts(self) -> Path:
        return self._resolve(self.cfg.storage.artifacts_dir)

    @property
    def text_encoders(self) -> Path:
        """`<artifacts_dir>/text_encoders/` (not created)."""
        return self.artifacts / "text_encoders"

    def reports(self, run_date: dt.date) -> Path:
        """`<reports_dir>/<run_date>/` (not created)."""
        return self._resolve(self.cfg.storage.reports_dir) / run_date.isoformat()

    def work(self, *parts: str) -> Path:
        """A scratch folder under `storage.work_dir` (created)."""
        p = self._resolve(self.cfg.storage.work_dir).joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def checkpoints(self, run_key: str) -> Path:
        return self.work("checkpoints", run_key)

    def petastorm_cache(self) -> Path:
        return self.work("petastorm_cache")

    @property
    def landing(self) -> Path:
        return self._resolve(self.cfg.storage.raw_dir)

    @property
    def warehouse(self) -> Path:
        """Spark SQL's warehouse folder (local sessions only)."""
        return self._resolve(self.cfg.storage.root) / "_spark_warehouse"
