"""Stage `evaluate`: NDCG@k, DCG@k, MAP and MRR on the TEST split of `training_lists`, for what the nightly ships.

Models (names in the `metrics` table), every night:
- `fusion`: the model in use, i.e. the version the score stage ranked run_date with (its `runs` row; int8 when
  it scored int8), else the latest artifact, if it fits the lists' dims;
- `fusion_previous`: the artifact saved before it (when there is one), so a night shows what the new model
  changed;
- `similarity`: unsupervised query-product text cosine (audio cosine for voice queries), the prior.
Baselines, on a schedule or on demand: `gated_fusion`, `concat_fusion`, `text_only` / `image_only` /
`audio_only` (the configured fusion restricted to one product modality), trained here by `train_local` with
`train.*` hyperparameters and early-stopped on validation, and `lightgbm_lambdamart` (see
`mmrank.ranker.baselines`). They are trained when `evaluate.baselines` is on and no baseline metrics of the
dataset exist in the `evaluate.baselines_every_days - 1` days before run_date (or `baselines=True`, the job's
`--baselines`), on at most `evaluate.driver_max_lists` train and validation lists (a seeded sample). A
single-modality model is skipped when no training list has that modality (e.g. audio in fashion).

Scoring and metrics run in Spark tasks over the whole test split (`mapInArrow`: each task rebuilds its lists'
batch, scores them with every model and sums per-list metrics); only per (model, target, metric) sums reach the
driver. Targets: `test` (grades from `labels`) and `test_judgments` (the same lists graded by `judgments`, joined
per slot; lists of unjudged queries keep their label grades), when any test query is judged.

Results replace the `metrics` rows of (run_date, dataset) and are written as JSON + Markdown + PNG under
`storage.reports_dir/<run_date>/`.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank import report
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import PRODUCT_MODALITIES, ModalityDims
from mmrank.ranker import baselines
from mmrank.ranker.batch import Batch, rows_to_batch
from mmrank.ranker.metrics import has_relevant, per_list_metrics, rule_for
from mmrank.runs import StageRun
from mmrank.stages import stage
from mmrank.stages.training_lists import list_dims, load_split

log = logging.getLogger("mmrank")

STAGE = "evaluate"
Scorer = Callable[[Batch], np.ndarray]
BASELINES = ("gated_fusion", "concat_fusion", *[f"{m}_only" for m in PRODUCT_MODALITIES], "lightgbm_lambdamart")
SUMS_SCHEMA = "model_name string, split string, metric string, rel_sum double, n_rel long, n long, judged long"


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Scores [B, L] of a torch ranker in eval mode (the model travels with the function to the tasks)."""
    def score(batch: Batch) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return model(batch).cpu().numpy()
    return score


def artifact_scorer(artifacts_dir: str, version: str, quantize: bool) -> Scorer:
    """Scores [B, L] of an artifact version, loaded once per worker process (`scoring.scorer.load_scorer`)."""
    def score(batch: Batch) -> np.ndarray:
        from mmrank.scoring.scorer import load_scorer, model_device

        model, _ = load_scorer(artifacts_dir, version, quantize)
        device = model_device(model)
        with torch.no_grad():
            return model({k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
    return score


def _modality_present(batch: Batch) -> dict[str, bool]:
    m = batch["p_mask"].sum(dim=(0, 1))
    return {name: bool(m[i] > 0) for i, name in enumerate(PRODUCT_MODALITIES)}


def trained_models(lh: Lakehouse, train: Batch, val: Batch, dims: ModalityDims,
                   notes: list[str]) -> dict[str, tuple[str, Scorer]]:
    """Fusion variants, single-modality models and LightGBM trained on the (sampled) train split."""
    from mmrank.ranker.fit import train_local

    tc, version = lh.cfg.train, f"eval-{lh.cfg.fingerprint()}-seed{lh.cfg.train.seed}"
    variants = {f"{f}_fusion": tc.model_copy(update={"fusion": f}) for f in ("gated", "concat")}
    present = _modality_present(train)
    for m in PRODUCT_MODALITIES:
        if present[m]:
            variants[f"{m}_only"] = tc.model_copy(update={"modalities": [m]})
        else:
            notes.append(f"`{m}_only` skipped: no training list has {m} features")
    out: dict[str, tuple[str, Scorer]] = {}
    for name, cfg in variants.items():
        model, res = train_local(train, val, dims, cfg)
        log.info("evaluate: trained %s (best epoch %d, val %s)", name, res.best_epoch, res.best_metrics)
        out[name] = (version, model_scorer(model))
    lgbm = baselines.LambdaMART(lh.cfg.evaluate, tc.seed).fit(train, val)
    out["lightgbm_lambdamart"] = (version, lgbm.scores)
    return out


def model_in_use(lh: Lakehouse, run_date: dt.date) -> tuple[str, bool] | None:
    """(artifact version, int8?) the score stage ranked run_date with, else (latest artifact, False)."""
    from mmrank.ranker.artifact import ArtifactError, latest_version
    from mmrank.scoring.scorer import QUANT_SUFFIX

    if lh.exists("runs"):
        row = (lh.read("runs").where((F.col("stage") == "score") & (F.col("status") == "succeeded")
                                     & (F.col("run_date") == F.lit(sql_date(run_date)).cast("date")))
               .select("model_version").first())
        if row is not None and row[0]:
            v = str(row[0])
            return (v[:-len(QUANT_SUFFIX)], True) if v.endswith(QUANT_SUFFIX) else (v, False)
    try:
        return latest_version(lh.paths.artifacts), False
    except ArtifactError:
        return None


def shipped_models(lh: Lakehouse, run_date: dt.date, dims: ModalityDims,
                   notes: list[str]) -> dict[str, tuple[str, Scorer]]:
    """`fusion` (the model in use) and `fusion_previous` (the artifact saved before it), those that exist and
    fit the lists' dims."""
    from mmrank.ranker.artifact import ArtifactError, list_versions, load_artifact
    from mmrank.scoring.scorer import QUANT_SUFFIX

    adir = str(lh.paths.artifacts)
    used = model_in_use(lh, run_date)
    if used is None:
        notes.append(f"`fusion` (trained artifact) not evaluated: no model artifact in {adir}")
        return {}
    version, quantize = used
    versions = list_versions(adir)
    older = versions[:versions.index(version)] if version in versions else []
    out: dict[str, tuple[str, Scorer]] = {}
    for name, v, q in (("fusion", version, quantize), ("fusion_previous", older[-1] if older else None, False)):
        if v is None:
            continue
        try:
            model, _ = load_artifact(adir, v)
        except (ArtifactError, FileNotFoundError, OSError) as e:
            notes.append(f"`{name}` not evaluated: {e}")
            continue
        if model.dims != dims:
            notes.append(f"`{name}` artifact {v} has dims {model.dims}, lists have {dims}: skipped")
            continue
        out[name] = (v + (QUANT_SUFFIX if q else ""), artifact_scorer(adir, v, q))
    return out


def baselines_due(lh: Lakehouse, run_date: dt.date, dataset: str) -> tuple[bool, str]:
    """(due?, why): baselines are due unless the dataset has baseline metrics in the
    `evaluate.baselines_every_days - 1` days before run_date (run_date itself does not count, so a re-run of a
    date evaluates what its first run did)."""
    ec = lh.cfg.evaluate
    if not ec.baselines:
        return False, "evaluate.baselines is off"
    since = run_date - dt.timedelta(days=ec.baselines_every_days - 1)
    last = (lh.read("metrics").where((F.col("dataset") == dataset) & F.col("model_name").isin(*BASELINES)
                                     & (F.col("run_date") >= F.lit(sql_date(since)).cast("date"))
                                     & (F.col("run_date") < F.lit(sql_date(run_date)).cast("date")))
            .agg(F.max("run_date")).first()[0])
    if last is None:
        return True, f"no baseline metrics since {since}"
    return False, (f"baselines not retrained: last evaluated {last} "
                   f"(evaluate.baselines_every_days = {ec.baselines_every_days})")


def test_lists(lh: Lakehouse) -> DataFrame:
    """The test split's lists, plus `judged`: per slot the list's grades from `judgments` (max over sources,
    unjudged candidate 0) for queries that have judgments, null otherwise. A join, never a list of ids."""
    test = lh.read("training_lists").where(F.col("split") == "test")
    truth = lh.read("judgments").groupBy("query_id", "product_id").agg(F.max("grade").alias("grade"))
    judged = (test.select("query_id", F.posexplode("product_ids").alias("slot", "product_id"))
              .join(truth.select("query_id").distinct(), "query_id")
              .join(truth, ["query_id", "product_id"], "left")
              .groupBy("query_id").agg(F.sort_array(F.collect_list(F.struct(
                  "slot", F.coalesce("grade", F.lit(0.0)).alias("g")))).alias("s"))
              .select("query_id", F.col("s.g").alias("judged")))
    return test.join(judged, "query_id", "left")


def _targets(pdf: pd.DataFrame, batch: Batch) -> dict[str, np.ndarray]:
    """`test` grades [B, L] and `test_judgments`: judged lists regraded slot by slot, the others unchanged."""
    grades = batch["grades"].numpy().astype(np.float64)
    regraded = grades.copy()
    for i, g in enumerate(pdf["judged"]):
        if g is not None:
            regraded[i, :len(g)] = g
    return {"test": grades, "test_judgments": regraded}


def metric_sums(models: dict[str, Scorer], dims: ModalityDims, list_size: int, ks: list[int]):
    """mapInArrow function over `test_lists` rows: per (model, target, metric) the sum of per-list values over
    lists with a relevant item, how many those are, how many lists, and how many were judged."""
    def run(batches: Iterator) -> Iterator:
        import pyarrow as pa

        from mmrank.encoders.device import set_threads, task_threads

        set_threads(task_threads())
        acc: dict[tuple[str, str, str], list[float]] = {}
        for b in batches:
            if not b.num_rows:
                continue
            pdf = b.to_pandas()
            batch = rows_to_batch(pdf, dims, list_size)
            targets = _targets(pdf, batch)
            n_judged = int(pdf["judged"].notna().sum())
            for name, fn in models.items():
                scores = np.asarray(fn(batch), np.float64)
                for split, g in targets.items():
                    hr = has_relevant(g)
                    for key, v in per_list_metrics(scores, g, ks).items():
                        a = acc.setdefault((name, split, key), [0.0, 0, 0, 0])
                        a[0] += float(v[hr].sum())
                        a[1] += int(hr.sum())
                        a[2] += len(v)
                        a[3] += n_judged
        if acc:
            keys, vals = list(acc), list(acc.values())
            yield pa.RecordBatch.from_arrays(
                [pa.array([k[i] for k in keys]) for i in range(3)]
                + [pa.array([v[i] for v in vals], t) for i, t in ((0, pa.float64()), (1, pa.int64()),
                                                                   (2, pa.int64()), (3, pa.int64()))],
                names=["model_name", "split", "metric", "rel_sum", "n_rel", "n", "judged"])
    return run


def mean_of(rel_sum: float, n_rel: int, n: int, rule: str) -> float:
    """`mean_metric` from sums (lists without a relevant item have value 0 for every metric)."""
    if rule == "skip":
        return rel_sum / n_rel if n_rel else float("nan")
    if not n:
        return float("nan")
    return (rel_sum + (n - n_rel if rule == "one" else 0)) / n


def _valid_name(dataset: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset):
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, _ or -")
    return dataset


def evaluate(lh: Lakehouse, dataset: str = "sample", extra: dict[str, Scorer] | None = None,
             run_date: dt.date | None = None, baselines_on: bool | None = None) -> tuple[list[dict], dict]:
    """Metric rows (model_version, model_name, split, metric, k, value) for every model, plus report meta.
    `baselines_on`: True = train the baselines now, False = not, None = when due (`baselines_due`)."""
    ec, tc = lh.cfg.evaluate, lh.cfg.train
    L, run_date = tc.list_size, run_date or dt.date.today()
    dims = list_dims(lh)
    notes: list[str] = []
    models = shipped_models(lh, run_date, dims, notes)
    models["similarity"] = ("unsupervised", baselines.similarity_scores)
    due, why = (baselines_on, "on demand" if baselines_on else "off") if baselines_on is not None \
        else baselines_due(lh, run_date, dataset)
    if due:
        train = load_split(lh, "train", L)
        if not train:
            raise ValueError("training_lists has no train lists: cannot train the evaluation models")
        val = load_split(lh, "validation", L)
        if not val:
            notes.append("validation split empty: early stopping used the train split")
        models.update(trained_models(lh, train, val or train, dims, notes))
    else:
        notes.append(why)
    models.update({name: ("external", fn) for name, fn in (extra or {}).items()})

    sums = (test_lists(lh).mapInArrow(metric_sums({n: fn for n, (_, fn) in models.items()}, dims, L, ec.ks),
                                      SUMS_SCHEMA)
            .groupBy("model_name", "split", "metric")
            .agg(*[F.sum(c).alias(c) for c in ("rel_sum", "n_rel", "n", "judged")]).collect())
    if not sums:
        raise ValueError("training_lists has no test lists: run the training_lists stage first")
    by_key = {(r["model_name"], r["split"], r["metric"]): r for r in sums}
    judged = any(r["judged"] for r in sums)
    targets = ["test"] + (["test_judgments"] if judged else [])
    rows = []
    for name, (version, _) in models.items():
        for split in targets:
            for key in [*(f"{m}@{k}" for k in ec.ks for m in ("ndcg", "dcg")), "map", "mrr"]:
                r = by_key[(name, split, key)]
                metric, _, k = key.partition("@")
                rows.append({"model_version": version, "model_name": name, "split": split, "metric": metric,
                             "k": int(k) if k else None,
                             "value": mean_of(r["rel_sum"], r["n_rel"], r["n"], rule_for(key, ec.no_relevant))})
    n_lists = by_key[("similarity", "test", "map")]["n"]
    meta = {"dataset": dataset, "test_lists": int(n_lists), "targets": targets, "seed": tc.seed, "loss": tc.loss,
            "list_size": L, "dims": {m: dims.of(m) for m in PRODUCT_MODALITIES},
            "no_relevant": ec.no_relevant, "notes": notes, "baselines": bool(due), "baselines_why": why,
            "artifact_version": models["fusion"][0] if "fusion" in models else None}
    return rows, meta


@stage(STAGE, inputs=("training_lists",), outputs=("metrics",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, dataset: str = "sample",
        extra: dict[str, Scorer] | None = None, baselines: bool | None = None) -> dict[str, int]:
    """Evaluate the shipped models (and the baselines when due or `baselines=True`) on the test split; write
    `metrics` (replacing run_date + dataset) and the report.

    `extra`: additional name -> scorer(batch) -> [B, L] scores to evaluate alongside (tests, experiments); they
    run in Spark tasks, so they must be picklable (cloudpickle: closures and lambdas are).
    """
    dataset = _valid_name(dataset)
    rows, meta = evaluate(lh, dataset, extra, run_date, baselines)
    meta["run_date"] = run_date.isoformat()
    rec.model_version = meta["artifact_version"]
    rec.message = f"baselines {'trained' if meta['baselines'] else 'not trained'} ({meta['baselines_why']})"
    schema = lh.read("metrics").schema
    recs = [tuple({**r, "run_date": run_date, "dataset": dataset}[c] for c in schema.fieldNames()) for r in rows]
    lh.replace_date("metrics", lh.spark.createDataFrame(recs, schema=schema), run_date,
                    extra=f"dataset = '{dataset}'")
    report.write_evaluation(lh.paths.reports(run_date), dataset, pd.DataFrame(rows), meta)
    return {"models": len({r["model_name"] for r in rows}), "metric_rows": len(rows),
            "test_lists": meta["test_lists"], "baselines_trained": int(meta["baselines"])}
