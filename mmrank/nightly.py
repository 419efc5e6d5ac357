"""The nightly pipeline: generate -> ingest -> labels -> featurize -> training_lists -> train -> score -> evaluate
-> report, one run_date at a time, resumable.

Every stage is a `(name, callable(lh, run_date, opts) -> counts)`; the stage modules record their own `runs`
row through `track_stage` (inputs' Delta versions, counts, model version, duration). Stages that do not
(the orchestrator's own `report`, a stage that failed before it started tracking, a stage that is skipped
because it is not due) get a row written here, so every stage of a nightly run leaves exactly one `runs` row
per (run_date, stage).

Resume rules (`run_nightly`):
- a stage whose row for this run_date is `succeeded` is skipped, unless forced;
- `--rerun` forces every stage; `--from-stage X` forces X and everything after it (stages before X still run
  if they never succeeded for this date: their outputs are needed);
- once a stage actually runs, every later stage runs too (its inputs changed).
So a second invocation for the same date is a no-op that leaves the tables identical, and a run that failed
at stage k resumes at stage k.

`generate` (embedded default only): on `env: local` it writes the deterministic sample landing zone for the
run_date (seeded by `generator.seed` and the date, so regenerating gives identical data); on a cluster
(`env: databricks`) the landing zone is fed by upstream systems and the stage is skipped.

`train` runs when it is due: no model yet, the latest model trained `train.train_every_days` or more days
before the run_date, or `force_train`. When it is not due a `succeeded` row with message `not due: ...` and
the current model version is recorded, and scoring uses the existing model.
"""
from __future__ import annotations

import datetime as dt
import importlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.runs import track_stage

log = logging.getLogger("mmrank.nightly")

STAGE_NAMES = ("generate", "ingest", "labels", "featurize", "training_lists", "train", "score", "evaluate",
               "report")


@dataclass
class NightlyOptions:
    rerun: bool = False
    from_stage: str | None = None
    force_train: bool = False


@dataclass
class Stage:
    """One pipeline step: `fn(lh, run_date, opts) -> counts` (or None). `tracked`: fn writes its runs row."""

    name: str
    fn: Callable[[Lakehouse, dt.date, NightlyOptions], dict | None]
    tracked: bool = True
    describe: Callable[[dict], str] | None = None


@dataclass
class NightlyResult:
    run_date: dt.date
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    counts: dict[str, dict] = field(default_factory=dict)
    failed: str | None = None
    scores_table: str = ""
    report_path: str | None = None

    def summary(self) -> str:
        lines = [f"nightly {self.run_date}: ran {', '.join(self.ran) or 'nothing'}"
                 + (f"; skipped {', '.join(self.skipped)}" if self.skipped else "")]
        lines.append(f"ranking scores: {self.scores_table} (run_date = {self.run_date})")
        if self.report_path:
            lines.append(f"report: {self.report_path}")
        return "\n".join(lines)


class StageFailed(RuntimeError):
    """A nightly stage raised; the message names the stage, the original exception is the cause."""

    def __init__(self, stage: str, index: int, total: int, err: BaseException):
        super().__init__(f"nightly stage [{index}/{total}] {stage} failed: {type(err).__name__}: {err}")
        self.stage = stage


# ---- the default stages (imported lazily so a missing module only fails its own stage) -----------------
def _module_stage(module: str) -> Callable[[Lakehouse, dt.date, NightlyOptions], dict | None]:
    """A stage that calls `<module>.run(lh, run_date)`, imported lazily so a broken module fails only its stage."""
    def call(lh: Lakehouse, run_date: dt.date, opts: NightlyOptions) -> dict | None:
        return importlib.import_module(module).run(lh, run_date)
    call.__name__ = f"run_{module.rsplit('.', 1)[-1]}"
    return call


def _report(lh, run_date, opts):
    from mmrank import report

    path = report.write_report(lh, run_date)
    return {"report_files": len(list(path.parent.glob("*.png"))) + 1}


def default_stages() -> list[Stage]:
    return [
        Stage("generate", _module_stage("mmrank.data.landing")),
        Stage("ingest", _module_stage("mmrank.data.ingest")),
        Stage("labels", _module_stage("mmrank.labels")),
        Stage("featurize", _module_stage("mmrank.featurize")),
        Stage("training_lists", _module_stage("mmrank.training_lists")),
        Stage("train", _module_stage("mmrank.train")),
        Stage("score", _module_stage("mmrank.score")),
        Stage("evaluate", _module_stage("mmrank.evaluate")),
        Stage("report", _report, tracked=False),
    ]


# ---- model age ------------------------------------------------------------------------------------------
def last_trained(lh: Lakehouse, run_date: dt.date) -> tuple[str | None, dt.date | None]:
    """(latest model version, run_date it was trained for) or (None, None) when there is no model.

    The date comes from the artifact meta (`run_date`) when present, else from the latest `succeeded`
    train row in `runs` that really trained (not a `not due` row), else the artifact's `created_at` day.
    """
    from mmrank.ranker.artifact import ArtifactError, latest_version, load_artifact

    adir = str(lh.cfg.resolve_path(lh.cfg.storage.artifacts_dir))
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


# ---- orchestration --------------------------------------------------------------------------------------
def _date_rows(lh: Lakehouse, run_date: dt.date) -> dict[str, tuple[str, str]]:
    """stage -> (status, run_id) of this run_date's runs rows (one small Spark read)."""
    if not lh.exists("runs"):
        return {}
    rows = (lh.read("runs").where(f"run_date = DATE'{sql_date(run_date)}'")
            .select("stage", "status", "run_id").collect())
    return {r["stage"]: (r["status"], r["run_id"]) for r in rows}


def _describe(counts: dict | None) -> str:
    if not counts:
        return "no counts"
    return ", ".join(f"{v} {k}" for k, v in list(counts.items())[:4])


def _run_tracked_here(lh, stage: Stage, run_date, opts) -> dict:
    with track_stage(lh, stage.name, run_date) as rec:
        counts = stage.fn(lh, run_date, opts) or {}
        rec.counts.update({k: int(v) for k, v in counts.items() if isinstance(v, (int, float))})
        return counts


def _record_failure(lh, stage: str, run_date, err: BaseException) -> None:
    try:
        with track_stage(lh, stage, run_date):
            raise err
    except BaseException:
        pass


def run_nightly(lh: Lakehouse, run_date: dt.date, opts: NightlyOptions | None = None,
                stages: list[Stage] | None = None, echo: Callable[[str], None] = print) -> NightlyResult:
    """Run the pipeline for run_date; raises `StageFailed` (after recording a `failed` runs row)."""
    opts = opts or NightlyOptions()
    stages = stages if stages is not None else default_stages()
    names = [s.name for s in stages]
    if opts.from_stage is not None and opts.from_stage not in names:
        raise ValueError(f"--from-stage {opts.from_stage!r}: expected one of {', '.join(names)}")
    total = len(stages)
    res = NightlyResult(run_date, scores_table=lh.location("ranking_scores"))
    forced = opts.rerun
    t_all = time.perf_counter()
    echo(f"nightly run_date={run_date} env={lh.cfg.env} config={lh.cfg.fingerprint()} stages={total}")
    rows = _date_rows(lh, run_date)
    for i, st in enumerate(stages, 1):
        forced = forced or st.name == opts.from_stage
        tag = f"[{i}/{total}] {st.name}"
        status, before = rows.get(st.name, (None, None))
        if not forced and status == "succeeded":
            echo(f"{tag} ... skipped (already succeeded for {run_date})")
            res.skipped.append(st.name)
            continue
        if st.name == "generate" and lh.cfg.env != "local":
            echo(f"{tag} ... skipped (env={lh.cfg.env}: the landing zone is fed upstream)")
            res.skipped.append(st.name)
            continue
        echo(f"{tag} ...")
        t0 = time.perf_counter()
        try:
            if st.name == "train":
                due, reason, version = train_due(lh, run_date, opts.force_train)
                if not due:
                    with track_stage(lh, "train", run_date) as rec:
                        rec.model_version, rec.message = version, reason
                        rec.counts["trained"] = 0
                    counts = {"trained": 0}
                    echo(f"{tag} ... {reason}: keeping it")
                else:
                    echo(f"{tag} ... training ({reason})")
                    counts = st.fn(lh, run_date, opts) or {}
            elif st.tracked:
                counts = st.fn(lh, run_date, opts) or {}
            else:
                counts = _run_tracked_here(lh, st, run_date, opts)
        except Exception as e:
            if st.tracked:
                status, after = _date_rows(lh, run_date).get(st.name, (None, None))
                if after in (None, before) or status != "failed":
                    _record_failure(lh, st.name, run_date, e)  # it failed before it started tracking
            echo(f"{tag} ... FAILED after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}")
            res.failed = st.name
            raise StageFailed(st.name, i, total, e) from e
        rows = _date_rows(lh, run_date)
        if st.tracked and rows.get(st.name, (None, None))[1] in (None, before):
            # the stage did not record itself: record it here so every stage has its row
            with track_stage(lh, st.name, run_date) as rec:
                rec.counts.update({k: int(v) for k, v in (counts or {}).items() if isinstance(v, (int, float))})
                rec.message = "recorded by nightly"
            rows = _date_rows(lh, run_date)
        res.ran.append(st.name)
        res.counts[st.name] = dict(counts or {})
        forced = True  # everything after a stage that ran sees new inputs
        echo(f"{tag} ... done in {time.perf_counter() - t0:.1f}s: {(st.describe or _describe)(counts or {})}")
    report = lh.cfg.resolve_path(lh.cfg.storage.reports_dir) / run_date.isoformat() / "nightly_report.md"
    res.report_path = str(report) if report.exists() else None
    echo(f"nightly {run_date} finished in {time.perf_counter() - t_all:.1f}s")
    echo(res.summary())
    return res


def main(lh: Lakehouse, args) -> str | None:
    """`jobs/nightly.py` entry point: prints progress; a failed stage is re-raised (non-zero exit)."""
    opts = NightlyOptions(rerun=args.rerun, from_stage=args.from_stage, force_train=args.force_train)

    def echo(msg: str) -> None:
        print(msg, flush=True)

    try:
        run_nightly(lh, args.run_date, opts, echo=echo)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise
    return None


def add_arguments(parser) -> None:
    parser.add_argument("--from-stage", choices=STAGE_NAMES, default=None,
                        help="force this stage and all later ones to run again")
    parser.add_argument("--rerun", action="store_true", help="run every stage even if it already succeeded")
    parser.add_argument("--force-train", action="store_true", help="train even if the model is not due")


# ---- interactive helpers (notebooks) --------------------------------------------------------------------
def open_lakehouse(conf: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Lakehouse:
    """Config (conf/local.yaml unless `conf`) + overrides -> Lakehouse on the active (or a local) session."""
    from mmrank.config import load_config
    from mmrank.spark import get_spark

    cfg = load_config(conf or None, [o for o in overrides if o])
    return Lakehouse(get_spark(cfg), cfg)


def select_stages(names: list[str] | str | None) -> list[Stage]:
    """The default stages restricted to `names` (list or comma-separated string; None/'all' = every stage)."""
    stages = default_stages()
    if names is None or names == "all" or names == "":
        return stages
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = sorted(set(wanted) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    return [s for s in stages if s.name in wanted]


def stage_table(lh: Lakehouse, run_date: dt.date):
    """pandas: every nightly stage with its runs row for run_date (status, duration, counts, model version)."""
    import pandas as pd

    runs = (lh.read("runs").where(f"run_date = DATE'{sql_date(run_date)}'")
            .select("stage", "status", "duration_s", "model_version", "counts", "message", "finished_at")
            .toPandas())
    base = pd.DataFrame({"order": range(1, len(STAGE_NAMES) + 1), "stage": STAGE_NAMES})
    return base.merge(runs, on="stage", how="left")
