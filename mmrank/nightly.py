"""The nightly pipeline: generate -> ingest -> labels -> featurize -> lexical -> training_lists -> train ->
promote -> score -> evaluate -> report, one run_date at a time, resumable. It only orders, skips and resumes the
stages of `mmrank.stages`; each stage records its own `runs` row.

Resume rules (`run_nightly`):
- a stage whose row for this run_date is `succeeded` is skipped, unless forced;
- `--rerun` forces every stage; `--from-stage X` forces X and everything after it (stages before X still run
  if they never succeeded for this date: their outputs are needed);
- once a stage actually runs, every later stage runs too (its inputs changed).
So a second invocation for the same date is a no-op that leaves the tables identical, and a run that failed
at stage k resumes at stage k. A stage may also not apply to a configuration (`generate` outside `env: local`:
the landing zone is fed upstream); it is skipped without a row. `train` decides itself whether it is due
(`mmrank.stages.train.train_due`; `--force-train` forces it); `promote` gates the new model (it becomes the
registered `champion` that `score` uses only if it is not worse on the validation lists; `stages/promote.py`).
"""
from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from mmrank.config import MMRankConfig
from mmrank.lakehouse import Lakehouse
from mmrank.report import NIGHTLY_FILE
from mmrank.runs import date_rows
from mmrank.stages import (evaluate, featurize, generate, ingest, labels, lexical, promote, report, score, train,
                           training_lists)



@dataclass
class NightlyOptions:
    rerun: bool = False
    from_stage: str | None = None
    force_train: bool = False
    baselines: bool | None = None  # None: evaluate retrains the baselines when due (evaluate.baselines_every_days)


@dataclass(frozen=True)
class Step:
    """One pipeline step: `run(lh, run_date, opts) -> counts`; `skip(cfg)` says why it does not apply."""

    name: str
    run: Callable[[Lakehouse, dt.date, NightlyOptions], dict]
    skip: Callable[[MMRankConfig], str | None] = lambda cfg: None


PIPELINE: tuple[Step, ...] = (
    Step(generate.run.stage, lambda lh, d, o: generate.run(lh, d), skip=generate.skip_reason),
    Step(ingest.run.stage, lambda lh, d, o: ingest.run(lh, d)),
    Step(labels.run.stage, lambda lh, d, o: labels.run(lh, d)),
    Step(featurize.run.stage, lambda lh, d, o: featurize.run(lh, d)),
    Step(lexical.run.stage, lambda lh, d, o: lexical.run(lh, d)),
    Step(training_lists.run.stage, lambda lh, d, o: training_lists.run(lh, d)),
    Step(train.run.stage, lambda lh, d, o: train.run(lh, d, force=o.force_train)),
    Step(promote.run.stage, lambda lh, d, o: promote.run(lh, d)),
    Step(score.run.stage, lambda lh, d, o: score.run(lh, d)),
    Step(evaluate.run.stage, lambda lh, d, o: evaluate.run(lh, d, baselines=o.baselines)),
    Step(report.run.stage, lambda lh, d, o: report.run(lh, d)),
)
STAGE_NAMES = tuple(s.name for s in PIPELINE)


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


def select_steps(names: list[str] | str | None) -> list[Step]:
    """The pipeline restricted to `names` (list or comma-separated string; None/'all' = every stage)."""
    if names is None or names == "all" or names == "":
        return list(PIPELINE)
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = sorted(set(wanted) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGE_NAMES)}")
    return [s for s in PIPELINE if s.name in wanted]


def _describe(counts: dict | None) -> str:
    if not counts:
        return "no counts"
    return ", ".join(f"{v} {k}" for k, v in list(counts.items())[:4])


def run_nightly(lh: Lakehouse, run_date: dt.date, opts: NightlyOptions | None = None,
                steps: list[Step] | None = None, echo: Callable[[str], None] = print) -> NightlyResult:
    """Run the pipeline (or `steps`) for run_date; raises `StageFailed` (the stage recorded a `failed` row)."""
    opts = opts or NightlyOptions()
    steps = list(PIPELINE) if steps is None else steps
    names = [s.name for s in steps]
    if opts.from_stage is not None and opts.from_stage not in names:
        raise ValueError(f"--from-stage {opts.from_stage!r}: expected one of {', '.join(names)}")
    total = len(steps)
    res = NightlyResult(run_date, scores_table=lh.location("ranking_scores"))
    forced = opts.rerun
    t_all = time.perf_counter()
    echo(f"nightly run_date={run_date} env={lh.cfg.env} config={lh.cfg.fingerprint()} stages={total}")
    rows = date_rows(lh, run_date)
    for i, st in enumerate(steps, 1):
        forced = forced or st.name == opts.from_stage
        tag = f"[{i}/{total}] {st.name}"
        if not forced and rows.get(st.name, (None, None))[0] == "succeeded":
            echo(f"{tag} ... skipped (already succeeded for {run_date})")
            res.skipped.append(st.name)
            continue
        if (why := st.skip(lh.cfg)) is not None:
            echo(f"{tag} ... skipped ({why})")
            res.skipped.append(st.name)
            continue
        echo(f"{tag} ...")
        t0 = time.perf_counter()
        try:
            counts = st.run(lh, run_date, opts)
        except Exception as e:
            echo(f"{tag} ... FAILED after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}")
            res.failed = st.name
            raise StageFailed(st.name, i, total, e) from e
        res.ran.append(st.name)
        res.counts[st.name] = dict(counts)
        forced = True  # everything after a stage that ran sees new inputs
        echo(f"{tag} ... done in {time.perf_counter() - t0:.1f}s: {_describe(counts)}")
    path = lh.paths.reports(run_date) / NIGHTLY_FILE
    res.report_path = str(path) if path.exists() else None
    echo(f"nightly {run_date} finished in {time.perf_counter() - t_all:.1f}s")
    echo(res.summary())
    return res


def main(lh: Lakehouse, args) -> str | None:
    """`jobs/nightly.py` entry point: prints progress; a failed stage is re-raised (non-zero exit)."""
    opts = NightlyOptions(rerun=args.rerun, from_stage=args.from_stage, force_train=args.force_train,
                          baselines=True if args.baselines else None)

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
    parser.add_argument("--baselines", action="store_true",
                        help="retrain and evaluate the baseline models tonight even if they are not due")
