"""Stage `promote`: the promotion gate between `train` and `score`, and manual promote / rollback.

The train stage registers each new model as `challenger` (`mmrank.tracking`). This stage compares the
challenger with the current `champion` on the SAME lists, the validation split of today's `training_lists`:
both models score them (Spark-side, `mapInPandas`, each worker loading the artifacts once) and the gate metric
(`tracking.gate_metric`, NDCG@10 by default, lists without a relevant item skipped, as in training) is averaged.
The challenger becomes champion unless its value is below the champion's by more than
`tracking.gate_tolerance`; otherwise it stays challenger and the champion keeps serving (`score` scores with
the champion). Either way the registered version gets a `mmrank_gate` tag and the `runs` row a message that
says which models were compared, their values and why. With no champion yet the challenger is promoted; a
champion that cannot score today's lists (other embedding widths, artifact missing) is replaced.

Manual commands (`jobs/promote.py`): `version=` makes that registered version (registry number or artifact
version) champion whatever the gate says; `rollback=True` makes the champion's predecessor champion again
(each promotion tags the new champion with `mmrank_previous_champion`). With `tracking.enabled: false` there
is no registry: the stage records that and scoring uses the latest artifact.
"""
from __future__ import annotations

import datetime as dt
import logging
import math

import pandas as pd
from pyspark.sql import functions as F

from mmrank import tracking
from mmrank.lakehouse import Lakehouse
from mmrank.modalities import ModalityDims
from mmrank.ranker.artifact import version_folder
from mmrank.runs import StageRun
from mmrank.stages import stage
from mmrank.stages.training_lists import list_dims
from mmrank.tracking import CHALLENGER, CHAMPION, TAG_GATE, TAG_PREVIOUS, ModelRef, Tracker

log = logging.getLogger("mmrank.promote")

_LIST_COLUMNS = ("grades", "q_text", "q_audio", "q_mask", "p_text", "p_image", "p_audio", "p_mask")


def gate_decision(new: float | None, old: float | None, tolerance: float, metric: str) -> tuple[bool, str]:
    """(promote?, reason) for challenger value `new` against champion value `old` (None = cannot score the
    lists, NaN = no validation list with a relevant item)."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False, f"the challenger has no validation {metric} (no usable validation list)"
    if old is None:
        return True, f"the champion cannot score today's validation lists; challenger {metric} {new:.4f}"
    if math.isnan(old):
        return False, f"the champion has no validation {metric} to compare with"
    if new >= old - tolerance:
        return True, f"challenger {metric} {new:.4f} >= champion {old:.4f} - tolerance {tolerance:.4f}"
    return False, f"challenger {metric} {new:.4f} < champion {old:.4f} - tolerance {tolerance:.4f}"


def _partition_metric(artifacts_dir: str, versions: list[str], dims: ModalityDims, list_size: int, key: str):
    """mapInPandas function: per version, (sum of `key` over lists with a relevant item, their count)."""

    def fn(frames):
        import torch

        from mmrank.ranker.batch import rows_to_batch
        from mmrank.ranker.fit import VAL_KS
        from mmrank.ranker.metrics import has_relevant, per_list_metrics
        from mmrank.scoring.scorer import load_scorer

        sums = {v: [0.0, 0] for v in versions}
        for pdf in frames:
            if pdf.empty:
                continue
            batch = rows_to_batch(pdf, dims, list_size)
            grades = batch["grades"].numpy()
            relevant = has_relevant(grades)
            for v in versions:
                model = load_scorer(artifacts_dir, v)[0]
                device = next(model.parameters()).device
                with torch.no_grad():
                    scores = model({k: t.to(device) for k, t in batch.items()}).cpu().numpy()
                sums[v][0] += float(per_list_metrics(scores, grades, VAL_KS)[key][relevant].sum())
                sums[v][1] += int(relevant.sum())
        yield pd.DataFrame({"version": list(sums), "total": [s[0] for s in sums.values()],
                            "n": [s[1] for s in sums.values()]})

    return fn


def validation_metric(lh: Lakehouse, versions: list[str], key: str) -> tuple[dict[str, float | None], int]:
    """({artifact version: mean `key` on the validation lists, None if it cannot score them}, lists used)."""
    from mmrank.ranker.artifact import ArtifactError, load_artifact

    dims, adir = list_dims(lh), str(lh.paths.artifacts)
    fits: list[str] = []
    for v in dict.fromkeys(versions):
        try:
            if load_artifact(adir, v)[0].dims == dims:
                fits.append(v)
        except (ArtifactError, OSError) as e:
            log.warning("promote: model %s cannot be loaded: %s", v, e)
    out: dict[str, float | None] = {v: None for v in versions}
    if not fits:
        return out, 0
    lists = lh.read("training_lists").where(F.col("split") == "validation").select(*_LIST_COLUMNS)
    fn = _partition_metric(adir, fits, dims, lh.cfg.train.list_size, key)
    agg = (lists.mapInPandas(fn, "version string, total double, n long").groupBy("version")
           .agg(F.sum("total").alias("total"), F.sum("n").alias("n")).collect())
    n_lists = 0
    for r in agg:
        out[r["version"]] = r["total"] / r["n"] if r["n"] else float("nan")
        n_lists = max(n_lists, int(r["n"]))
    for v in fits:
        if out[v] is None:  # no validation list at all
            out[v] = float("nan")
    return out, n_lists


def make_champion(tr: Tracker, ref: ModelRef, record_previous: bool = True) -> ModelRef | None:
    """Point `champion` at `ref` (the old champion is remembered as its predecessor); returns the old one."""
    old = tr.alias(CHAMPION)
    if old is not None and old.version == ref.version:
        return old
    if old is not None and record_previous:
        tr.tag(ref, TAG_PREVIOUS, old.version)
    tr.set_alias(CHAMPION, ref)
    challenger = tr.alias(CHALLENGER)
    if challenger is not None and challenger.version == ref.version:
        tr.delete_alias(CHALLENGER)
    return old


def gate(lh: Lakehouse, tr: Tracker, run_date: dt.date) -> tuple[str, dict[str, int], str | None]:
    """The nightly decision: (message, counts, serving artifact version)."""
    tc = lh.cfg.tracking
    challenger, champion = tr.alias(CHALLENGER), tr.alias(CHAMPION)
    if challenger is None or (champion is not None and challenger.version == champion.version):
        serving = champion.artifact_version if champion else None
        return (f"no challenger: champion {champion} keeps serving" if champion else "no registered model yet",
                {"promoted": 0}, serving)
    if champion is None:
        make_champion(tr, challenger)
        tr.tag(challenger, TAG_GATE, f"promoted {run_date}: first registered model")
        return f"promoted: {challenger} is the first champion", {"promoted": 1}, challenger.artifact_version
    values, n_lists = validation_metric(lh, [challenger.artifact_version, champion.artifact_version], tc.gate_metric)
    ok, why = gate_decision(values[challenger.artifact_version], values[champion.artifact_version],
                            tc.gate_tolerance, tc.gate_metric)
    counts = {"promoted": int(ok), "refused": int(not ok), "validation_lists": n_lists}
    if ok:
        make_champion(tr, challenger)
        tr.tag(challenger, TAG_GATE, f"promoted {run_date}: {why}")
        return f"promoted: {challenger} replaces {champion}: {why}", counts, challenger.artifact_version
    tr.tag(challenger, TAG_GATE, f"refused {run_date}: {why}")
    return (f"refused: {challenger} stays {CHALLENGER}, champion {champion} keeps serving: {why}", counts,
            champion.artifact_version)


def manual(lh: Lakehouse, tr: Tracker, run_date: dt.date, version: str | None, rollback: bool) -> tuple[str, str]:
    """Operator promotion or rollback: (message, serving artifact version)."""
    if rollback:
        current = tr.alias(CHAMPION)
        if current is None:
            raise ValueError("rollback: there is no champion to roll back")
        previous = tr.tags_of(current).get(TAG_PREVIOUS)
        if not previous:
            raise ValueError(f"rollback: champion {current} has no recorded predecessor")
        target = tr.version(previous)
    else:
        target = tr.version(str(version))
    if not (version_folder(lh.paths.artifacts, target.artifact_version) / "model.json").exists():
        raise ValueError(f"{target}: artifact {target.artifact_version} is not in {lh.paths.artifacts}")
    old = make_champion(tr, target, record_previous=not rollback)
    tr.tag(target, TAG_GATE, f"{'rolled back to' if rollback else 'promoted manually'} {run_date}")
    what = "rollback" if rollback else "manual promotion"
    return f"{what}: {target} is champion (was {old})", target.artifact_version


@stage("promote", inputs=("training_lists",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, version: str | None = None,
        rollback: bool = False) -> dict[str, int]:
    """Gate the challenger (nightly), or promote `version` / roll back (operator). `rec.model_version` = the
    artifact version scoring will use; `rec.message` = the decision and why."""
    tr = tracking.tracker(lh)
    if tr is None:
        rec.message = "tracking disabled: no registry, scoring uses the latest artifact"
        return {"promoted": 0}
    if version is not None or rollback:
        rec.message, rec.model_version = manual(lh, tr, run_date, version, rollback)
        counts = {"promoted": 1}
    else:
        rec.message, counts, rec.model_version = gate(lh, tr, run_date)
    log.info("promote %s: %s", run_date, rec.message)
    return counts
