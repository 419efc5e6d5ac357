"""A real Spark standalone cluster on this machine (issue 13): `scripts/cluster.sh` starts a master and two
workers (own JVMs, loopback only) on free ports; jobs go through `scripts/submit.sh` exactly as an operator
submits them.

- `--master` and `--conf` given to spark-submit win over the config; tasks run on both workers' executors and
  import `mmrank` from the shipped zip (`--py-files`), with the environment from a venv-pack archive
  (`--archives`), never from the checkout;
- the nightly submitted to the cluster, with `file://` URIs for every storage key, runs every stage and leaves
  the tables of a `local[2]` run of the same seed and date;
- faults: the driver SIGKILLed mid-featurize leaves every table at a complete version; the re-run, with one
  worker SIGKILLed (by its pid) while featurize runs, finishes on the other worker through Spark's task
  retry, and the tables equal the undisturbed run's;
- the per-stage times of the cluster and local nightly are written to `$MMRANK_TIMINGS` (when set) and
  printed.
Distributed training on the cluster: tests/test_cluster_training.py.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from _procs import run_killable
from mmrank import nightly
from mmrank.config import load_config
from mmrank.lakehouse import Lakehouse
from mmrank.runs import stage_status
from mmrank.tables import TABLES
from tests.test_encoders import tiny_bert_dir
from tests.test_reliability_crash import assert_consistent

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
D = dt.date(2026, 11, 21)
SUBMIT_TIMEOUT_S = 1500
# differ between two lakehouses by design: a run's id, the storage paths (config hash, the report path in the
# report stage's message, the landing zone's file URIs of the products' media); everything else must be equal
EXCLUDE = {"runs": ("run_id", "config_hash", "message"), "products": ("image_uri", "audio_uri")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(state: Path, port: int, ui: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "MMRANK_CLUSTER_DIR": str(state), "MMRANK_CLUSTER_PORT": str(port),
            "MMRANK_CLUSTER_WEBUI_PORT": str(ui), "MMRANK_VENV": sys.prefix, "MMRANK_DIST": str(state / "dist"),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cluster_sh(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(REPO / "scripts" / "cluster.sh"), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def pids(state: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in sorted((state / "pids").glob("*.pid"))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    port, ui = free_port(), free_port()
    env = cluster_env(state, port, ui)
    cluster_sh(env, "start")
    yield {"state": state, "env": env, "master": f"spark://127.0.0.1:{port}"}
    cluster_sh(env, "stop")
    assert cluster_sh(env, "status", check=False).returncode == 3


def submit(cluster: dict, app: str, *args: str, extra_env: dict | None = None,
           kill: tuple[str, float] | None = None, on_line=None) -> tuple[int, str]:
    """scripts/submit.sh --master <cluster> APP ARGS; `kill=(pattern, delay)` SIGKILLs the whole driver (its
    process group: spark-submit's JVM and Python) once a line matches; `on_line(line)` sees every line."""
    cmd = ["bash", str(REPO / "scripts" / "submit.sh"), "--master", cluster["master"],
           "--conf", "spark.executor.memory=1g", str(REPO / app), *args]
    rc, out, killed = run_killable(cmd, env={**cluster["env"], **(extra_env or {})}, cwd=cluster["state"],
                                   timeout_s=SUBMIT_TIMEOUT_S, kill=kill, on_line=on_line)
    if kill is not None:
        assert killed, f"never printed /{kill[0]}/ (rc {rc}):\n{out[-4000:]}"
    return rc, out


def storage_sets(root: Path, uri: bool) -> list[str]:
    r = f"file://{root}" if uri else str(root)
    return [f"storage.root={r}", f"storage.raw_dir={r}/_landing", f"storage.artifacts_dir={r}/_artifacts",
            f"storage.reports_dir={r}/_reports", f"storage.work_dir={r}/_work"]


def small_sets(bert: str) -> list[str]:
    return ["generator.n_products=40", "generator.n_queries=8", "generator.sessions_per_query=4",
            "generator.log_days=1", "generator.image_size=32", "generator.audio_seconds=0.5",
            "features.image.image_size=64", f"features.text.path={bert}", "features.device=cpu",
            "train.max_epochs=3", "train.data_loader=parquet", "train.list_size=10", "train.proj_dim=8",
            "train.hidden_dim=16", "score.top_n=5", "score.similarity_top_k=5", "evaluate.baselines=false",
            "spark.shuffle_partitions=2", "spark.driver_memory=1g",
            # what a local session sets itself (mmrank.spark.wanted_settings): tiny Delta logs, few partitions
            'spark.extra={"spark.databricks.delta.snapshotPartitions": "2"}']


def as_args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def stage_times(lines: list[str] | str) -> dict[str, float]:
    text = lines if isinstance(lines, str) else "\n".join(lines)
    return {m[0]: float(m[1]) for m in re.findall(r"\[\d+/\d+\] (\w+) \.\.\. done in ([\d.]+)s", text)}


def checksums(lh: Lakehouse) -> dict[str, str]:
    return {t: lh.checksum(t, exclude=EXCLUDE.get(t, ())) for t in TABLES if lh.exists(t)}


def messages(lh: Lakehouse) -> dict[str, str]:
    """Each stage's runs message; MLflow run ids (random per run) masked, the report's path left out."""
    return {r["stage"]: re.sub(r"mlflow run [0-9a-f]{32}", "mlflow run <id>", r["message"] or "")
            for r in lh.read("runs").where("stage != 'report'").collect()}


def assert_same_tables(lh: Lakehouse, reference: dict) -> None:
    assert checksums(lh) == reference["sums"]
    assert messages(lh) == messages(reference["lh"])


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory):
    """The local[2] run (the suite's session) of the same seed and date; `base` = its copy after labels."""
    base_dir = tmp_path_factory.mktemp("reference")
    bert = tiny_bert_dir(base_dir / "bert")
    lh = Lakehouse(spark, load_config(None, storage_sets(base_dir / "ref", False) + small_sets(bert)))
    out: list[str] = []
    t0 = time.perf_counter()
    nightly.run_nightly(lh, D, steps=list(nightly.PIPELINE[:3]), echo=out.append)
    shutil.copytree(base_dir / "ref", base_dir / "base")
    nightly.run_nightly(lh, D, echo=out.append)
    total = time.perf_counter() - t0
    return {"lh": lh, "sums": checksums(lh), "bert": bert, "base": base_dir / "base", "times": stage_times(out),
            "total": total}


def test_daemons_are_loopback_only_and_start_is_idempotent(cluster):
    before = pids(cluster["state"])
    assert set(before) == {"master", "worker-1", "worker-2"}
    again = cluster_sh(cluster["env"], "start")
    assert pids(cluster["state"]) == before and "already running" in again.stdout
    status = cluster_sh(cluster["env"], "status")
    assert all(f"{n} running pid {p}" in status.stdout for n, p in before.items())
    for name, pid in before.items():
        proc = psutil.Process(pid)
        assert "org.apache.spark.deploy" in " ".join(proc.cmdline())
        listening = [c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listening), (name, listening)


def test_submit_honours_master_and_conf_and_ships_code_and_environment(cluster, tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("")  # the archive's environment: Python alone (the probe needs nothing else)
    archive = subprocess.run(["bash", str(REPO / "scripts" / "package.sh"), "env", str(reqs),
                              str(tmp_path / "env.tar.gz")], env=cluster["env"], capture_output=True, text=True,
                             timeout=600)
    assert archive.returncode == 0, archive.stderr
    out_file = tmp_path / "probe.json"
    rc, out = submit(cluster, "tests/cluster_app.py", "probe", str(out_file), "--set", "spark.master=local[1]",
                     "--set", "spark.shuffle_partitions=3", "--set", "spark.app_name=from-config",
                     extra_env={"MMRANK_ENV_ARCHIVE": str(tmp_path / "env.tar.gz"),
                                "SPARK_SUBMIT_ARGS": "--conf spark.sql.shuffle.partitions=7"})
    assert rc == 0, out[-4000:]
    probe = json.loads(out_file.read_text())
    assert probe["master"] == cluster["master"]                        # --master beat spark.master=local[1]
    assert probe["conf"]["spark.sql.shuffle.partitions"] == "7"        # --conf beat spark.shuffle_partitions=3
    assert probe["conf"]["spark.default.parallelism"] == "3"           # unset: filled in from the config
    assert len(probe["block_managers"]) == 3                          # the driver + one executor per worker
    work = cluster["state"] / "work"
    used = set()
    for t in probe["tasks"]:
        cwd = Path(t["cwd"])
        assert cwd.is_relative_to(work), t                             # an executor's folder on a worker
        used.add(cwd.relative_to(work).parts[0])
        shipped = (cwd / t["mmrank"]).resolve()
        assert ".zip" in t["mmrank"] and str(shipped).startswith(str(cwd)), t
        assert not str(shipped).startswith(str(REPO))
        # the checkout is not on the executors' path (pyspark's own zips may live in a venv inside it)
        entries = [Path(e) for e in t["pythonpath"].split(os.pathsep) if e]
        assert not [e for e in entries if e.is_absolute() and e.resolve() in (REPO, REPO / "mmrank")], t
        py = Path(os.path.normpath(cwd / t["python"]))                   # the archive's Python (as given or
        assert py == Path(os.path.normpath(cwd / "environment/bin/python")), t  # as the worker made it absolute)
        assert Path(t["prefix"]).resolve().is_relative_to(cwd.resolve()), t
    assert used == {"worker-1", "worker-2"}


def test_nightly_on_cluster_equals_local(cluster, reference, spark, tmp_path):
    root = tmp_path / "lake"
    sets = storage_sets(root, True) + small_sets(reference["bert"])
    t0 = time.perf_counter()
    rc, out = submit(cluster, "jobs/nightly.py", "--run-date", D.isoformat(), *as_args(sets))
    total = time.perf_counter() - t0
    assert rc == 0, out[-5000:]
    times = stage_times(out)
    assert list(times) == list(nightly.STAGE_NAMES), out[-3000:]
    lh = Lakehouse(spark, load_config(None, sets))
    assert lh.location("products").startswith("file:/") and (root / "_artifacts" / "models" / "LATEST").exists()
    assert_same_tables(lh, reference)
    # the work ran in executors on both workers
    app = max((cluster["state"] / "work").glob("worker-*/app-*"), key=lambda p: p.stat().st_mtime).name
    for w in ("worker-1", "worker-2"):
        logs = "".join(p.read_text(errors="replace") for p in (cluster["state"] / "work" / w / app).glob("*/stderr"))
        assert "Finished task" in logs, w
    report = {"cluster": times, "cluster_total_s": total, "local": reference["times"],
              "local_total_s": reference["total"]}
    print(json.dumps(report, indent=1))
    if os.environ.get("MMRANK_TIMINGS"):
        Path(os.environ["MMRANK_TIMINGS"]).write_text(json.dumps(report, indent=1))


def _executor_log(state: Path, worker: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (state / "work" / worker).glob("app-*/*/stderr"))


def test_driver_and_worker_killed_mid_stage(cluster, reference, spark, tmp_path):
    root = tmp_path / "lake"
    shutil.copytree(reference["base"], root)              # ingested and labelled: featurize is next
    sets = storage_sets(root, True) + small_sets(reference["bert"])
    lh = Lakehouse(spark, load_config(None, sets))
    before = assert_consistent(lh)

    # 1. SIGKILL the driver (spark-submit's JVM and its Python) while featurize encodes
    submit(cluster, "jobs/nightly.py", "--run-date", D.isoformat(), *as_args(sets),
           kill=(r"featurize \S+: encoding \d+ new", 2.0))
    after = assert_consistent(lh)                        # every table at a complete version
    assert stage_status(lh, D, "featurize") != "succeeded"
    assert {t: after[t] for t in before if before[t] is not None} == {t: v for t, v in before.items() if v is not None}
    assert lh.read("query_features").count() == 0        # nothing half-written became visible

    # 2. the re-run, with worker-1 SIGKILLed while featurize runs its tasks
    state = cluster["state"]
    worker = pids(state)["worker-1"]
    seen = {"n": _executor_log(state, "worker-1").count("Running task"), "killed": False}

    def kill_worker(line: str) -> None:
        if seen["killed"] or not re.search(r"featurize \S+: encoding \d+ new", line):
            return
        deadline = time.monotonic() + 60   # wait for worker-1's executor to start a featurize task
        while time.monotonic() < deadline and _executor_log(state, "worker-1").count("Running task") <= seen["n"]:
            time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        seen["killed"] = True

    try:
        rc, out = submit(cluster, "jobs/nightly.py", "--run-date", D.isoformat(), *as_args(sets), on_line=kill_worker)
    finally:
        cluster_sh(cluster["env"], "start")             # brings worker-1 back for the tests that follow
    assert seen["killed"] and not psutil.pid_exists(worker)
    assert rc == 0, out[-5000:]
    assert re.search(r"Lost executor|ExecutorLostFailure|worker lost|Worker .* removed", out, re.I), out[-3000:]
    assert f"[4/{len(nightly.STAGE_NAMES)}] featurize ... done" in out
    assert_consistent(lh)
    assert_same_tables(lh, reference)


NDCG_TOL = 0.05  # as tests/test_distributed.py: distributed vs local validation NDCG@10


def test_distributed_training_on_cluster_matches_local(cluster, tmp_path):
    """tests/test_distributed.py's checks with the ranks on the cluster's executors: Horovod (petastorm cache)
    and TorchDistributor with local_mode=False (parquet, resumed from a checkpoint), both reading and writing
    through shared storage (`file://` work_dir)."""
    out_file = tmp_path / "train.json"
    sets = storage_sets(tmp_path / "lake", True) + [
        "train.list_size=8", "train.batch_size=16", "train.max_epochs=3", "train.patience=10", "train.num_proc=2",
        "train.lr=0.01", "spark.shuffle_partitions=2", "spark.driver_memory=1g"]
    rc, out = submit(cluster, "tests/cluster_app.py", "train", str(out_file), *as_args(sets))
    assert rc == 0, out[-5000:]
    r = json.loads(out_file.read_text())
    assert r["master"] == cluster["master"]
    local = r["local"]["ndcg"]
    hv, td = r["horovod"], r["torch_distributor"]
    assert (hv["world"], hv["epochs"]) == (2, 3) and abs(hv["ndcg"] - local) <= NDCG_TOL
    assert hv["model_ndcg"] == pytest.approx(hv["ndcg"], abs=1e-6)   # rank 0's best weights came back
    assert "TorchDistributor: 2 process(es), local_mode=False" in out
    assert "Started distributed training with 2 executor processes" in out
    assert r["tasks"] == {"horovod": 2}                                   # Horovod's ranks = 2 Spark tasks
    assert td["checkpoint"].startswith("file://") and td["checkpoint_written"] and td["checkpoint_cleaned"]
    assert (td["world"], td["epochs"]) == (2, 3) and td["first_epoch_equal"]
    assert td["resumed_history"] == pytest.approx(td["full_history"], abs=1e-6) and td["max_weight_diff"] < 1e-5
    assert abs(td["ndcg"] - local) <= NDCG_TOL and td["artifact_ndcg"] == pytest.approx(td["model_ndcg"], abs=1e-9)
    assert td["meta"] == ["torch_distributor", 2, "parquet"]
