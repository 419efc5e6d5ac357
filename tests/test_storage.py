"""Storage URIs stay URIs (issue 13, item 6): every storage key survives config loading unchanged, the folders
derived from them keep the scheme, and artifacts, checkpoints and reports go through one file-system layer
(`mmrank.storage`) whose writes never rely on rename. Remote stores cannot exist here: their URIs are checked
for naming only; I/O runs on `file://` URIs (the cluster tests run the whole nightly on them)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch

from mmrank import storage
from mmrank.config import ConfigError, load_config
from mmrank.modalities import ModalityDims
from mmrank.paths import StoragePaths
from mmrank.ranker.artifact import LATEST_FILE, list_versions, load_artifact, save_artifact
from mmrank.ranker.fit import CHECKPOINT_FILE, build_model, load_checkpoint, train_local
from mmrank.config import TrainConf
from mmrank.ranker.batch import rows_to_batch
from mmrank.testing.lists import synthetic_lists

KEYS = ("root", "raw_dir", "artifacts_dir", "reports_dir", "work_dir")
URIS = ["s3a://bucket/lake/x", "abfss://container@account.dfs.core.windows.net/lake/x", "gs://bucket/lake/x",
        "dbfs:/mnt/lake/x", "file:///tmp/lake/x", "s3://bucket/x"]
D = dt.date(2026, 11, 21)


@pytest.mark.parametrize("uri", URIS)
def test_every_storage_key_keeps_its_uri(uri):
    cfg = load_config(None, [f"storage.{k}={uri}-{k}" for k in KEYS])
    for k in KEYS:
        assert getattr(cfg.storage, k) == f"{uri}-{k}"
        assert str(cfg.resolve_path(getattr(cfg.storage, k))) == f"{uri}-{k}"
    paths = StoragePaths(cfg)
    assert str(paths.artifacts) == f"{uri}-artifacts_dir"
    assert str(paths.reports(D)) == f"{uri}-reports_dir/2026-11-21"
    assert str(paths.landing / "sample") == f"{uri}-raw_dir/sample"
    assert str(paths.warehouse) == f"{uri}-root/_spark_warehouse"
    assert str(paths.artifacts / "models" / LATEST_FILE).startswith(uri)


def test_local_paths_stay_paths_and_volumes_are_local():
    cfg = load_config(None, ["storage.artifacts_dir=/Volumes/main/mmrank/artifacts", "storage.root=lakehouse"])
    assert StoragePaths(cfg).artifacts == Path("/Volumes/main/mmrank/artifacts")
    assert cfg.resolve_path("lakehouse").is_absolute()
    assert storage.local_path("dbfs:/mnt/x") == "/dbfs/mnt/x"
    assert storage.local_path("file:///tmp/x") == storage.local_path("file:/tmp/x") == "/tmp/x"
    assert storage.local_path("s3a://b/x") is None
    assert storage.hadoop_uri("file:///tmp/x") == "file:/tmp/x"
    with pytest.raises(ConfigError, match="URI scheme"):
        load_config(None, ["storage.root=ftp://host/lake"])


def test_storage_path_io_on_file_uris(tmp_path):
    root = storage.location(f"file://{tmp_path}/store")
    assert isinstance(root, storage.StoragePath) and str(root) == f"file://{tmp_path}/store"
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a" / "b.txt").read_text() == "hello" and (tmp_path / "store" / "a" / "b.txt").exists()
    assert [p.name for p in root.iterdir()] == ["a"] and (root / "a").is_dir()
    assert [str(p) for p in root.glob("*/*.txt")] == [f"file://{tmp_path}/store/a/b.txt"]
    assert (root / "a" / "b.txt").parent == root / "a" and (root / "a" / "b.txt").suffix == ".txt"
    storage.remove_tree(root / "a")
    assert not (root / "a").exists()


def test_remote_uris_refuse_local_file_calls():
    with pytest.raises(TypeError, match="remote store"):
        open(storage.StoragePath("s3a://bucket/key"))  # noqa: SIM115


def test_write_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    storage.write_atomic(f"file://{target}", b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_atomic(f"file://{target}", b"new" * 1000)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_artifacts_on_a_uri_commit_model_json_then_latest(tmp_path):
    adir = f"file://{tmp_path}/artifacts"
    cfg = TrainConf(proj_dim=4, hidden_dim=4)
    model = build_model(ModalityDims(4, 4, 4), cfg)
    version = save_artifact(model, {"run_date": D.isoformat()}, adir)
    assert list_versions(adir) == [version]
    loaded, meta = load_artifact(adir)
    assert meta["version"] == version
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # a save interrupted before model.json (its commit) leaves a folder nothing reads
    half = tmp_path / "artifacts" / "models" / "fusion-20260101-deadbeef"
    half.mkdir()
    (half / "weights.safetensors").write_bytes(b"partial")
    assert list_versions(adir) == [version]
    assert not list((tmp_path / "artifacts").rglob(".tmp*"))  # no temporary folders renamed into place


def test_checkpoints_on_a_uri_resume_bitwise(tmp_path):
    dims, cfg = ModalityDims(4, 4, 4), TrainConf(proj_dim=4, hidden_dim=4, max_epochs=3, patience=10, list_size=5)
    train, val = (rows_to_batch(synthetic_lists(n, 5, dims, seed=s), dims, 5) for n, s in ((12, 1), (6, 2)))
    full, _ = train_local(train, val, dims, cfg)
    ckpt = f"file://{tmp_path}/ckpt"
    train_local(train, val, dims, cfg.model_copy(update={"max_epochs": 1}), checkpoint_dir=ckpt)
    assert (tmp_path / "ckpt" / CHECKPOINT_FILE).exists() and load_checkpoint(ckpt)["epoch"] == 0
    resumed, res = train_local(train, val, dims, cfg, checkpoint_dir=ckpt, resume=True)
    assert res.epochs_run == 3
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
