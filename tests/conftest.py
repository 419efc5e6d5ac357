"""Shared fixtures: one real local SparkSession with Delta for the whole suite, lakehouses in tmp folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmrank.config import MMRankConfig, load_config
from mmrank.lakehouse import Lakehouse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FASHION_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"


def make_config(root: Path, *overrides: str) -> MMRankConfig:
    """conf/local.yaml pointed at `root`, sized for tests, plus `overrides`."""
    base = [f"storage.root={root}", f"storage.raw_dir={root}/_landing",
            f"storage.artifacts_dir={root}/_artifacts", f"storage.reports_dir={root}/_reports",
            f"storage.work_dir={root}/_work", "generator.n_products=80", "generator.n_queries=16",
            "generator.sessions_per_query=8", "generator.log_days=1", "generator.image_size=32",
            "generator.audio_seconds=0.5", "features.image.image_size=64", "train.max_epochs=3"]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests (fast, reproducible CPU timings), restored afterwards."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from mmrank.spark import get_spark

    cfg = make_config(tmp_path_factory.mktemp("spark"), "spark.shuffle_partitions=2")
    s = get_spark(cfg)
    yield s
    s.stop()


@pytest.fixture
def cfg(tmp_path) -> MMRankConfig:
    return make_config(tmp_path)


@pytest.fixture
def lh(spark, cfg) -> Lakehouse:
    return Lakehouse(spark, cfg)
