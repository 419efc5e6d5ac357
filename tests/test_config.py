"""Configuration: both shipped configs validate; bad keys and values fail naming key, value and what is allowed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mmrank.config import REPO_ROOT, ConfigError, load_config


def test_shipped_configs_load():
    local = load_config()
    assert local.env == "local" and local.storage.kind == "path"
    dbx = load_config(REPO_ROOT / "conf" / "databricks.yaml")
    assert dbx.storage.kind == "metastore" and dbx.storage.schema_ == "mmrank"
    assert dbx.features.device == "auto"  # the GPU Spark gave the task (issue 15); never built on the driver


def test_overrides_are_typed_and_change_the_fingerprint():
    base = load_config()
    cfg = load_config(None, ["train.lr=0.01", "evaluate.ks=[1,3]", "score.quantize=true"])
    assert cfg.train.lr == 0.01 and cfg.evaluate.ks == [1, 3] and cfg.score.quantize is True
    assert cfg.fingerprint() != base.fingerprint()


@pytest.mark.parametrize("override, expect", [
    ("train.lr=-1", ["train.lr", "-1", "greater than 0"]),
    ("train.fusion=sum", ["train.fusion", "'sum'", "known: avg_pool, concat, gated, max_pool, weighted_sum"]),
    ("trian.lr=1", ["unknown key", "trian"]),
    ("features.image.name=vgg", ["features.image.name", "'vgg'", "resnet18"]),
    ("train.split={train: 1.0}", ["train.split", "sum"]),
    ("storage.kind=metastore", ["storage.schema is required"]),
])
def test_bad_values_name_key_value_and_allowed(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for part in expect:
        assert part in str(e.value)


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


def test_job_rejects_bad_config_with_exit_2_before_starting_spark():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "nightly.py"), "--set", "train.loss=hinge"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "invalid configuration" in out.stderr and "train.loss" in out.stderr and "'hinge'" in out.stderr


@pytest.mark.parametrize("override, why", [
    ("storage.root=../../etc", "'..' segments"),
    ("features.image.weights_path=/tmp/w.pth;rm -rf /", "must not contain"),
    ("features.text.path=http://example.invalid/model", "URI scheme"),
    ("storage.work_dir=''", "non-empty"),
])
def test_paths_from_config_are_validated(override, why):
    with pytest.raises(ConfigError, match=why) as e:
        load_config(None, [override])
    assert override.split("=")[0] in str(e.value)
