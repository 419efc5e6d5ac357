"""Issue #8, part 5: no unpickling of untrusted content, clear errors for missing weights, no secrets or raw
user text in logs.

MLflow (issue #16) adds no loading path: runs log the safetensors folder and the registry maps aliases to
artifact versions; the scanner below also rejects every `mlflow.<flavor>.load_model` (those unpickle).

Already covered elsewhere: pickled / torch-pickle model artifacts are refused (tests/test_ranker_model.py
`test_pickled_weights_are_refused`), a missing image weights file (tests/test_encoders.py), config path
validation (tests/test_config.py).
"""
from __future__ import annotations

import ast
import datetime as dt
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from mmrank.config import FeaturesConf

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("mmrank", "jobs", "bench", "scripts")


class _Evil:
    """Unpickling this creates a marker file: proof that a loader executed pickled code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _python_files() -> list[Path]:
    out = []
    for d in SCANNED:
        out += sorted((REPO / d).rglob("*.py")) if (REPO / d).is_dir() else []
    return out


def _unsafe_calls(source: str) -> list[str]:
    """Calls that can execute untrusted content, found in the AST (comments and strings do not count)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        const = lambda k: isinstance(kw.get(k), ast.Constant) and kw[k].value  # noqa: E731
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if name in ("eval", "exec") and isinstance(f, ast.Name):
            bad.append(where)
        elif owner in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") and name in ("load", "loads"):
            bad.append(where)
        elif owner == "torch" and name == "load" and const("weights_only") is not True:
            bad.append(where)
        elif owner == "np" and name == "load" and const("allow_pickle") is True:
            bad.append(where)
        elif name in ("load_model", "load_pyfunc", "load_state_dict") and ast.unparse(f).startswith("mlflow."):
            bad.append(where)  # mlflow flavors unpickle (cloudpickle / torch.load); mmrank loads safetensors only
        elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            loader = kw.get("Loader")
            if not (loader is not None and "Safe" in ast.unparse(loader)):
                bad.append(where)
    return bad


def test_scanner_finds_each_unsafe_pattern():
    """The scanner itself: every pattern is caught, the safe spellings are not."""
    unsafe = ["torch.load(p)", "torch.load(p, weights_only=False)", "pickle.load(f)", "pickle.loads(b)",
              "np.load(p, allow_pickle=True)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)",
              "eval('1')", "exec('x=1')", "mlflow.pytorch.load_model(uri)", "mlflow.pyfunc.load_model(uri)",
              "mlflow.sklearn.load_model(uri)", "mlflow.pytorch.load_state_dict(uri)"]
    safe = ["torch.load(p, weights_only=True)", "np.load(p)", "yaml.safe_load(s)",
            "yaml.load(s, Loader=yaml.SafeLoader)", "model.eval()", "x = 'torch.load(p)'",
            "client.log_artifacts(run_id, folder, 'model')", "load_model(p)"]
    for s in unsafe:
        assert _unsafe_calls(s), s
    for s in safe:
        assert not _unsafe_calls(s), s


def test_source_tree_never_unpickles_or_evaluates():
    files = _python_files()
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): bad for p in files if (bad := _unsafe_calls(p.read_text()))}
    assert not found, f"unsafe loading/evaluation calls: {found}"


def _evil_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"w": _Evil(str(marker))}))
    return path


def test_malicious_checkpoint_is_refused(tmp_path):
    from mmrank.ranker.fit import CHECKPOINT_FILE, load_checkpoint

    marker = tmp_path / "pwned"
    _evil_file(tmp_path / "ckpt" / CHECKPOINT_FILE, marker)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()
    torch.save({"epoch": 0, "w": _Evil(str(marker))}, tmp_path / "ckpt" / CHECKPOINT_FILE)  # torch zip pickle
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("fmt", ["plain_pickle", "torch_pickle", "fake_safetensors"])
def test_malicious_encoder_weights_are_refused(tmp_path, modality, fmt):
    from mmrank.encoders.registry import get_encoder

    marker = tmp_path / "pwned"
    if fmt == "plain_pickle":
        path = _evil_file(tmp_path / "w.pt", marker)
    elif fmt == "torch_pickle":
        path = tmp_path / "w.pt"
        torch.save({"conv.weight": _Evil(str(marker))}, path)
    else:
        path = _evil_file(tmp_path / "w.safetensors", marker)
    cfg = FeaturesConf.model_validate({"device": "cpu", modality: {"weights_path": str(path)}})
    with pytest.raises(Exception) as err:
        get_encoder(modality, cfg).encode([b"x"])
    assert not marker.exists(), "pickled code was executed"
    assert not isinstance(err.value, AssertionError)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_missing_encoder_weights_error_names_the_file(tmp_path, modality):
    from mmrank.encoders.registry import get_encoder

    missing = tmp_path / f"no_{modality}_weights.safetensors"
    cfg = FeaturesConf.model_validate({"device": "cpu", modality: {"weights_path": str(missing)}})
    with pytest.raises(FileNotFoundError) as err:
        get_encoder(modality, cfg)
    assert str(missing) in str(err.value) and f"features.{modality}.weights_path" in str(err.value)


def test_missing_text_model_dir_error_names_it(tmp_path):
    from mmrank.encoders.registry import get_encoder

    missing = tmp_path / "no_minilm_here"
    cfg = FeaturesConf.model_validate({"device": "cpu", "text": {"path": str(missing)}})
    with pytest.raises(Exception) as err:
        get_encoder("text", cfg)
    assert str(missing) in str(err.value)


# ---- logs: no secrets, no raw user text ---------------------------------------------------------------------
MARKER = "zq-private-marker-7731"
SECRET = "tok_SECRETSECRET_3141592653"


def _job_module(name: str):
    """A job script `jobs/<name>.py` loaded as a module (its `main`, and `parser` where it has one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_job_{name}", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_logs_carry_no_user_text_or_secrets(spark, tmp_path, caplog, capsys):
    """Run the real jobs through `mmrank.cli.run_job` (ingest BYO, featurize, then an ingest that fails) with a
    query/title containing a marker and a secret-looking config value given on the command line; nothing of
    either may appear in any log record (tracebacks included), stdout/stderr or any `runs` column."""
    import pandas as pd
    import yaml

    from mmrank.cli import job_parser, run_job
    from tests.conftest import make_config
    from tests.test_encoders import tiny_bert_dir

    bert = tiny_bert_dir(tmp_path / "bert")
    base = make_config(tmp_path / "lake", f"features.text.path={bert}", "features.device=cpu",
                       "features.text.max_chars=100")
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(base.model_dump(mode="json", by_alias=True)))
    pd.DataFrame({"product_id": ["p1", "p2", "p3"],
                  "title": [f"red scarf {MARKER}", f"{MARKER} " * 30, None]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"query": [f"scarf {MARKER}"], "product_id": ["p1"], "grade": [3]}).to_csv(
        tmp_path / "j.csv", index=False)
    day = dt.date(2026, 11, 21)
    # the secret enters only here: a free-text config field (spark.extra) set on the job command line
    common = ["--conf", str(conf), "--run-date", day.isoformat(),
              "--set", f"spark.extra={{spark.hadoop.fs.s3a.secret.key: {SECRET}}}"]
    seen = []

    def spy(fn):
        def wrapped(lh, args):
            seen.append(lh)
            return fn(lh, args)
        return wrapped

    ingest_job, featurize_job = _job_module("ingest"), _job_module("featurize")
    caplog.set_level(logging.DEBUG)
    byo = ["--source", "byo", "--catalog", str(tmp_path / "c.csv"), "--judgments", str(tmp_path / "j.csv")]
    assert run_job(ingest_job.parser(), spy(ingest_job.main), common + byo) == 0
    assert run_job(job_parser("featurize"), spy(featurize_job.main), common) == 0
    # a failing stage: run_job logs the exception (with its traceback) and the stage records its message
    bad = ["--source", "byo", "--catalog", str(tmp_path / "j.csv")]
    assert run_job(ingest_job.parser(), spy(ingest_job.main), common + bad) == 1

    # the secret did reach the code: every job's config held it, and it was fingerprinted into runs
    assert len(seen) == 3 and all(lh.cfg.spark.extra == {"spark.hadoop.fs.s3a.secret.key": SECRET} for lh in seen)
    lh = seen[-1]
    runs = lh.read("runs").toPandas()
    assert set(runs["stage"]) == {"ingest", "featurize"}
    assert (runs["config_hash"] == lh.cfg.fingerprint()).all()
    assert lh.cfg.fingerprint() != base.fingerprint()
    failed = runs.set_index("stage").loc["ingest"]
    assert failed["status"] == "failed" and failed["message"]
    assert lh.read("quarantine").count() >= 1            # the too-long title went to quarantine
    assert any(r.exc_info for r in caplog.records), "the failure's traceback was not logged"

    out = capsys.readouterr()
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text + out.out + out.err
    text += "\n".join(str(v) for row in runs.itertuples(index=False) for v in row)
    assert caplog.records, "nothing was logged: the check would be vacuous"
    assert MARKER not in text, [line for line in text.splitlines() if MARKER in line][:3]
    assert SECRET not in text, [line for line in text.splitlines() if SECRET in line][:3]
    assert SECRET not in os.environ.get("PYSPARK_SUBMIT_ARGS", "")
    assert not re.search(r"secret\.key\s*[:=]\s*\S", text)


def test_config_errors_do_not_echo_secret_values(capsys):
    from mmrank.cli import job_parser, run_job

    argv = ["--set", f"spark.extr={{spark.hadoop.fs.s3a.secret.key: {SECRET}}}"]  # misspelt spark.extra
    assert run_job(job_parser("x"), lambda lh, args: None, argv) == 2   # refused before Spark starts
    err = capsys.readouterr().err
    assert "spark.extr" in err            # the error names the bad key ...
    assert SECRET not in err              # ... but must not print its value
