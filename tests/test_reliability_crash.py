"""Issue #8, part 2: SIGKILL the real job processes (`python jobs/X.py`) mid-run; afterwards every table is
readable at a consistent Delta version, and a re-run gives exactly the tables of an uninterrupted run.

Every test kills jobs on a lakehouse of its own, copied from state the module fixtures prepare in-process, so
each test also runs alone (`pytest tests/test_reliability_crash.py::<test>`):
- `lakes`: PREP (generate, ingest, labels) and REF, a copy of PREP featurized uninterrupted (the reference
  for featurize); test 1 kills featurize on its own copy of PREP.
- `trained`: TRAIN, a copy of REF with its training lists; REF2, a copy of TRAIN trained and scored
  uninterrupted (the reference for train and score); SCORE, a copy of REF2 taken after training and before
  scoring. Test 2 kills train on TRAIN, test 3 kills score on SCORE.
The jobs run as subprocesses and are killed (whole process group: driver, JVM, Python workers -- nothing gets
to clean up) when a chosen progress line appears on their stdout:

1. featurize, at "encoding ... items"            -> before any commit
2. featurize, at "committed product_features"    -> between its two table commits
3. train,     at "epoch 1/N done ... checkpoint saved" (mid-training; resume from the checkpoint)
4. score,     at "stage score ... started" + a short delay (before its single commit)
After each kill the re-run (in-process, same functions the job calls) must produce the reference's tables.
Four JVM starts in total.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from delta.tables import DeltaTable

from _procs import run_killable
from mmrank.config import load_config
from mmrank.lakehouse import Lakehouse
from mmrank.ranker.artifact import LATEST_FILE
from mmrank.runs import stage_status
from mmrank.stages import featurize, generate, ingest, labels, score, train, training_lists
from tests.test_encoders import tiny_bert_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
D = dt.date(2026, 11, 21)
ALL = ("products", "queries", "query_log", "judgments", "labels", "product_features", "query_features",
       "training_lists", "ranking_scores", "quarantine", "runs")
JOB_TIMEOUT_S = 420
EPOCHS = 40          # tiny epochs take milliseconds: enough of them that a kill at epoch 1 lands mid-training


def overrides(root: Path, bert: str) -> list[str]:
    return [f"storage.root={root}", f"storage.raw_dir={root}/_landing", f"storage.artifacts_dir={root}/_artifacts",
            f"storage.reports_dir={root}/_reports", f"storage.work_dir={root}/_work",
            "generator.n_products=40", "generator.n_queries=8", "generator.sessions_per_query=4",
            "generator.log_days=1", "generator.image_size=32", "generator.audio_seconds=0.5",
            "features.image.image_size=64", f"features.text.path={bert}", "features.device=cpu",
            f"train.max_epochs={EPOCHS}", f"train.patience={EPOCHS}", "train.data_loader=parquet", "train.list_size=10",
            "train.proj_dim=8", "train.hidden_dim=16", "score.top_n=5", "score.similarity_top_k=5",
            "spark.shuffle_partitions=2", "spark.driver_memory=1g"]


def run_and_kill(job: str, sets: list[str], pattern: str, delay: float = 0.0) -> tuple[str, int | None]:
    """Start `python jobs/<job>.py`, SIGKILL its process group once a stdout line matches `pattern`
    (after `delay` s). Returns (output, exit code); fails if the job ended before the pattern appeared."""
    cmd = [sys.executable, "-u", str(REPO / "jobs" / f"{job}.py"), "--run-date", D.isoformat()]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    rc, out, killed = run_killable(cmd, env=env, cwd=REPO, timeout_s=JOB_TIMEOUT_S, kill=(pattern, delay))
    assert killed, f"{job}: never printed /{pattern}/ (rc {rc}):\n{out[-3000:]}"
    assert rc == -signal.SIGKILL
    return out, rc


def assert_consistent(lh: Lakehouse) -> dict[str, int | None]:
    """Every existing table reads at its latest version, its Delta log lists a commit for every version, and
    reading the latest version by number gives the same row count."""
    versions = {}
    for t in ALL:
        if not lh.exists(t):
            versions[t] = None
            continue
        n = lh.read(t).count()
        hist = DeltaTable.forPath(lh.spark, lh.location(t)).history().select("version").collect()
        v = max(r[0] for r in hist)
        assert sorted(r[0] for r in hist) == list(range(v + 1)), f"{t}: Delta log has gaps"
        assert lh.read(t, version=v).count() == n
        versions[t] = v
    return versions


def _lake(spark, root: Path, bert: str) -> Lakehouse:
    return Lakehouse(spark, load_config(None, overrides(root, bert)))


def _copy(spark, src: Lakehouse, root: Path, bert: str) -> Lakehouse:
    """A lakehouse at `root` holding a copy of `src`'s tables, artifacts and work files."""
    shutil.copytree(src.root, root)
    return _lake(spark, root, bert)


@pytest.fixture(scope="module")
def lakes(spark, tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    bert = tiny_bert_dir(base / "bert")
    prep = _lake(spark, base / "prep", bert)
    generate.run(prep, D)
    ingest.run(prep, D)
    labels.run(prep, D)
    ref = _copy(spark, prep, base / "ref", bert)
    featurize.run(ref, D)
    return dict(prep=prep, ref=ref, bert=bert, base=base, spark=spark)


@pytest.fixture(scope="module")
def trained(lakes):
    spark, base, bert = lakes["spark"], lakes["base"], lakes["bert"]
    lh = _copy(spark, lakes["ref"], base / "train", bert)
    training_lists.run(lh, D)
    ref2 = _copy(spark, lh, base / "ref2", bert)
    version = train.train_and_save(ref2, D)[1]
    score_lh = _copy(spark, ref2, base / "score", bert)       # trained, not scored yet
    score.run(ref2, D)
    return dict(lh=lh, ref2=ref2, ref_version=version, ref_scores=ref2.checksum("ranking_scores"),
                score_lh=score_lh)


def same_features(lh: Lakehouse, ref: Lakehouse, table: str, key: str) -> None:
    """Equal tables except embedding float rounding: a re-run after a crash encodes a different subset of
    items, so model batches are composed differently, and batched float math is not bitwise identical
    across batch shapes. Every other column must be exactly equal; embeddings within 1e-5."""
    assert lh.checksum(table, exclude=("embedding",)) == ref.checksum(table, exclude=("embedding",))
    a = lh.read(table).toPandas().sort_values([key, "modality"]).reset_index(drop=True)
    b = ref.read(table).toPandas().sort_values([key, "modality"]).reset_index(drop=True)
    assert len(a) == len(b) > 0
    for x, y in zip(a["embedding"], b["embedding"]):
        assert len(x) == len(y) and max(abs(u - v) for u, v in zip(x, y)) < 1e-5


def test_kill_featurize_before_any_commit_then_between_commits(lakes):
    lh = _copy(lakes["spark"], lakes["prep"], lakes["base"] / "featurize", lakes["bert"])
    sets = overrides(lh.root, lakes["bert"])
    before = assert_consistent(lh)
    run_and_kill("featurize", sets, r"featurize \S+: encoding \d+ new")
    after = assert_consistent(lh)
    assert after["product_features"] in (None, 0) and after["query_features"] in (None, 0)
    assert lh.read("product_features").count() == 0 and stage_status(lh, D, "featurize") is None
    assert {t: after[t] for t in before if before[t] is not None} == {t: v for t, v in before.items() if v is not None}

    run_and_kill("featurize", sets, r"featurize \S+: committed product_features")
    mid = assert_consistent(lh)
    # product_features is complete at its new version; query_features never saw a partial write
    assert lh.read("product_features").count() == lakes["ref"].read("product_features").count()
    assert lh.read("query_features").count() == 0
    assert stage_status(lh, D, "featurize") is None            # no runs row: nightly will run it again
    assert mid["product_features"] is not None

    counts = featurize.run(lh, D)                               # the re-run finishes the job
    assert counts["encoded_products_text"] == 0                  # committed embeddings are not recomputed
    assert lh.checksum("product_features") == lakes["ref"].checksum("product_features")  # committed by the job
    same_features(lh, lakes["ref"], "query_features", "query_id")
    assert stage_status(lh, D, "featurize") == "succeeded"


def test_kill_train_mid_training_then_resume(lakes, trained):
    lh, ref2 = trained["lh"], trained["ref2"]
    sets = overrides(lh.root, lakes["bert"])
    run_and_kill("train", sets, rf"epoch 1/{EPOCHS} done.*checkpoint saved")
    assert_consistent(lh)
    adir = lh.paths.artifacts
    assert not (adir / "models" / LATEST_FILE).exists()          # no half-written model became visible
    assert not list(adir.glob("models/fusion-*"))                  # nor a model folder
    ckpts = list(lh.paths.work().glob("checkpoints/*/checkpoint.pt"))
    assert len(ckpts) == 1
    out, version = train.train_and_save(lh, D)                   # re-run resumes from epoch 2
    assert out.fit.epochs_run == EPOCHS and version == trained["ref_version"]
    ref_dir = ref2.paths.artifacts
    assert ((adir / "models" / version / "weights.safetensors").read_bytes()
            == (ref_dir / "models" / version / "weights.safetensors").read_bytes())
    meta = json.loads((adir / "models" / version / "model.json").read_text())
    assert meta["epochs_run"] == EPOCHS
    assert not ckpts[0].exists()                                  # checkpoints cleaned once the artifact exists


def test_kill_score_before_commit_then_rerun(lakes, trained):
    lh = trained["score_lh"]
    sets = overrides(lh.root, lakes["bert"])
    adir = lh.paths.artifacts
    assert (adir / "models" / LATEST_FILE).read_text().strip() == trained["ref_version"]
    assert stage_status(lh, D, "score") is None
    run_and_kill("score", sets, r"stage score \(run_date \S+\) started", delay=1.0)
    v = assert_consistent(lh)
    assert lh.read("ranking_scores").count() == 0 and v["ranking_scores"] in (None, 0)
    score.run(lh, D)
    assert lh.checksum("ranking_scores") == trained["ref_scores"]
    assert_consistent(lh)
