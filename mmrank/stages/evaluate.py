"""Stage `evaluate`: NDCG@k, DCG@k, MAP and MRR on the TEST split of `training_lists`, for what the nightly ships.

Models (names in the `metrics` table), every night:
- `fusion`: the model in use, i.e. the version the score stage ranked run_date with (its `runs` row; int8 when
  it scored int8), else the registered `champion` (`mmrank.tracking`; without a registry the latest artifact),
  if it fits the lists' dims;
- `fusion_previous`: the artifact saved before it (when there is one), so a night shows what the new model
  changed;
- `similarity`: unsupervised query-product text cosine (audio cosine for voice queries), the prior;
- `bm25`: unsupervised BM25 of the query over the product's text fields (when the lists have lexical features).
Baselines, on a schedule or on demand: `gated_fusion`, `concat_fusion`, `text_only` / `image_only` /
`audio_only` (the configured fusion restricted to one product modality), trained here by `train_local` with
`train.*` hyperparameters, early-stopped on validation, with the catalog's cross-modal alignment
(`mmrank.ranker.align`), and `lightgbm_lambdamart` on the same features (see `mmrank.ranker.baselines`). They
are trained when `evaluate.baselines` is on and no baseline metrics of the dataset exist in the
`evaluate.baselines_every_days - 1` days before run_date (or `baselines=True`, the job's `--baselines`), on at
most `evaluate.driver_max_lists` train and validation lists (a seeded sample). A single-modality model is
skipped when no training list has that modality (e.g. audio in fashion).

Scoring and metrics run in Spark tasks over the whole test split (`mmrank.ranker.metric_tasks`: each task
rebuilds its lists' batch, scores them with every model and sums per-list metrics); only per (model, target,
metric) sums reach the driver. Targets: `test` (grades from `labels`) and `test_judgments` (the same lists graded
by `judgments`, joined per slot; lists of unjudged queries keep their label grades), when any test query is
judged.

Results replace the `metrics` rows of (run_date, dataset) and are written as JSON + Markdown + PNG under
`storage.reports_dir/<run_date>/`, and logged as an MLflow run (`mmrank.tracking`). With `evaluate.ablation`
the fusion x head grid and the compression table (`mmrank.ranker.ablation`) are written as `ablation_<dataset>.md`
(on the bounded driver sample).
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Callable

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank import report
from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import PRODUCT_MODALITIES, ModalityDims
from mmrank.ranker import baselines
from mmrank.ranker.batch import Batch, iterate_batches
from mmrank.ranker.metric_tasks import SUMS_SCHEMA, mean_of, metric_sums
from mmrank.ranker.metrics import rule_for
from mmrank.runs import StageRun
from mmrank.stages import stage
from mmrank.stages.training_lists import list_dims, load_split

log = logging.getLogger("mmrank")

STAGE = "evaluate"
Scorer = Callable[[Batch], np.ndarray]
BASELINES = ("gated_fusion", "concat_fusion", *[f"{m}_only" for m in PRODUCT_MODALITIES], "lightgbm_lambdamart")
_SCORE_BATCH = 256


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Scores [B, L] of a torch ranker in eval mode, in chunks of lists (the model travels with the function to
    the tasks)."""
    def score(batch: Batch) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(b) for b in iterate_batches(batch, _SCORE_BATCH)]).cpu().numpy()
    return score


def artifact_scorer(artifacts_dir: str, version: str, quantize: bool) -> Scorer:
    """Scores [B, L] of an artifact version, loaded once per worker process (`scoring.scorer.load_scorer`)."""
    def score(batch: Batch) -> np.ndarray:
        from mmrank.scoring.scorer import load_scorer, model_device

        model, _ = load_scorer(artifacts_dir, version, quantize)
        device = model_device(model)
        with torch.no_grad():
            return torch.cat([model({k: v.to(device) for k, v in b.items()}).float().cpu()
                              for b in iterate_batches(batch, _SCORE_BATCH)]).numpy()
    return score


def _modality_present(batch: Batch) -> dict[str, bool]:
    m = batch["p_mask"].sum(dim=(0, 1))
    return {name: bool(m[i] > 0) for i, name in enumerate(PRODUCT_MODALITIES)}


def trained_models(lh: Lakehouse, train: Batch, val: Batch, dims: ModalityDims,
                   notes: list[str]) -> dict[str, tuple[str, Scorer]]:
    """Fusion variants, single-modality models and LightGBM trained on the (sampled) train split."""
    from mmrank.ranker.align import alignment_state
    from mmrank.ranker.fit import train_local

    tc, version = lh.cfg.train, f"eval-{lh.cfg.fingerprint()}-seed{lh.cfg.train.seed}"
    align = (alignment_state(lh, tc.align, dims, tc.seed) or (None, None))[0]
    variants = {f"{f}_fusion": tc.model_copy(update={"fusion": f}) for f in ("gated", "concat")}
    present = _modality_present(train)
    for m in PRODUCT_MODALITIES:
        if present[m]:
            variants[f"{m}_only"] = tc.model_copy(update={"modalities": [m]})
        else:
            notes.append(f"`{m}_only` skipped: no training list has {m} features")
    out: dict[str, tuple[str, Scorer]] = {}
    for name, cfg in variants.items():
        model, res = train_local(train, val, dims, cfg, align)
        log.info("evaluate: trained %s (best epoch %d, val %s)", name, res.best_epoch, res.best_metrics)
        out[name] = (version, model_scorer(model))
    lgbm = baselines.LambdaMART(lh.cfg.evaluate, tc.seed, align).fit(train, val)
    out["lightgbm_lambdamart"] = (version, lgbm.scores)
    return out


def model_in_use(lh: Lakehouse, run_date: dt.date) -> tuple[str, bool] | None:
    """(artifact version, int8?) the score stage ranked run_date with, else (champion or latest artifact, False)."""
    from mmrank.ranker.artifact import ArtifactError
    from mmrank.scoring.scorer import QUANT_SUFFIX, resolve_version
    from mmrank.tracking import champion_version

    if lh.exists("runs"):
        row = (lh.read("runs").where((F.col("stage") == "score") & (F.col("status") == "succeeded")
                                     & (F.col("run_date") == F.lit(sql_date(run_date)).cast("date")))
               .select("model_version").first())
        if row is not None and row[0]:
            v = str(row[0])
            return (v[:-len(QUANT_SUFFIX)], True) if v.endswith(QUANT_SUFFIX) else (v, False)
    try:
        return resolve_version(str(lh.paths.artifacts), champion_version(lh)), False
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


def _valid_name(dataset: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset):
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, _ or -")
    return dataset


def _has_lexical(test: DataFrame) -> bool:
    """Whether any test list carries lexical features (then BM25 alone is evaluated too)."""
    return bool(test.where(F.exists("p_lex", lambda x: x != 0)).limit(1).count())


def evaluate(lh: Lakehouse, dataset: str = "sample", extra: dict[str, Scorer] | None = None,
             run_date: dt.date | None = None, baselines_on: bool | None = None,
             per_query_out: dict | None = None) -> tuple[list[dict], dict]:
    """Metric rows (model_version, model_name, split, metric, k, value) for every model, plus report meta.
    `baselines_on`: True = train the baselines now, False = not, None = when due (`baselines_due`).
    `per_query_out` (benchmarks: grows with the test queries): receives `(target, model) -> {query_id: NDCG@10}`
    (NaN for lists without a relevant item), for paired per-query comparisons (bench/quality.py's bootstrap)."""
    ec, tc = lh.cfg.evaluate, lh.cfg.train
    L, run_date = tc.list_size, run_date or dt.date.today()
    dims = list_dims(lh)
    notes: list[str] = []
    test = test_lists(lh)
    models = shipped_models(lh, run_date, dims, notes)
    models["similarity"] = ("unsupervised", baselines.similarity_scores)
    if _has_lexical(test):
        models["bm25"] = ("unsupervised", baselines.bm25_scores)
    due, why = (baselines_on, "on demand" if baselines_on else "off") if baselines_on is not None \
        else baselines_due(lh, run_date, dataset)
    batches: dict[str, Batch] = {}
    if due or ec.ablation:
        batches = {s: b for s in ("train", "validation") if (b := load_split(lh, s, L))}
        if "train" not in batches:
            raise ValueError("training_lists has no train lists: cannot train the evaluation models")
        if "validation" not in batches:
            notes.append("validation split empty: early stopping used the train split")
    if due:
        models.update(trained_models(lh, batches["train"], batches.get("validation", batches["train"]), dims, notes))
    else:
        notes.append(why)
    models.update({name: ("external", fn) for name, fn in (extra or {}).items()})

    per_list = "ndcg@10" if per_query_out is not None else None
    out = test.mapInArrow(metric_sums({n: fn for n, (_, fn) in models.items()}, dims, L, ec.ks, per_list),
                          SUMS_SCHEMA).cache()
    try:
        sums = (out.where(F.col("query_id").isNull()).groupBy("model_name", "split", "metric")
                .agg(*[F.sum(c).alias(c) for c in ("rel_sum", "n_rel", "n", "judged")]).collect())
        if per_query_out is not None:
            for r in out.where(F.col("query_id").isNotNull()).collect():
                per_query_out.setdefault((r["split"], r["model_name"]), {})[r["query_id"]] = r["rel_sum"]
    finally:
        out.unpersist()
    if not sums:
        raise ValueError("training_lists has no test lists: run the training_lists stage first")
    by_key = {(r["model_name"], r["split"], r["metric"]): r for r in sums}
    targets = ["test"] + (["test_judgments"] if any(r["judged"] for r in sums) else [])
    rows = []
    for name, (version, _) in models.items():
        for split in targets:
            for key in [*(f"{m}@{k}" for k in ec.ks for m in ("ndcg", "dcg")), "map", "mrr"]:
                r = by_key[(name, split, key)]
                metric, _, k = key.partition("@")
                rows.append({"model_version": version, "model_name": name, "split": split, "metric": metric,
                             "k": int(k) if k else None,
                             "value": mean_of(r["rel_sum"], r["n_rel"], r["n"], rule_for(key, ec.no_relevant))})
    meta = {"dataset": dataset, "test_lists": int(by_key[("similarity", "test", "map")]["n"]), "targets": targets,
            "seed": tc.seed, "loss": tc.loss, "list_size": L, "dims": {m: dims.of(m) for m in PRODUCT_MODALITIES},
            "no_relevant": ec.no_relevant, "notes": notes, "baselines": bool(due), "baselines_why": why,
            "artifact_version": models["fusion"][0] if "fusion" in models else None}
    if ec.ablation:
        meta["ablation"] = ablation_tables(lh, batches, dims)
    return rows, meta


def ablation_tables(lh: Lakehouse, batches: dict[str, Batch], dims: ModalityDims) -> dict[str, pd.DataFrame]:
    """`evaluate.ablation`: the fusion x head grid and the compression table (`mmrank.ranker.ablation`), on at
    most `evaluate.driver_max_lists` lists per split (judgment grades where the test queries have them)."""
    from mmrank.ranker import ablation
    from mmrank.ranker.batch import rows_to_batch
    from mmrank.ranker.fit import train_local
    from mmrank.ranker.metric_tasks import targets_of

    ec, tc = lh.cfg.evaluate, lh.cfg.train
    test_rows = test_lists(lh).orderBy("query_id").limit(ec.driver_max_lists).toPandas()
    test = rows_to_batch(test_rows, dims, tc.list_size)
    targets = targets_of(test_rows, test)
    if not test_rows["judged"].notna().any():
        targets.pop("test_judgments")
    cfg = tc.model_copy(update={"max_epochs": ec.ablation_max_epochs or tc.max_epochs})
    train, val = batches["train"], batches.get("validation", batches["train"])
    grid = ablation.grid(train, val, test, targets, dims, cfg, ec.ablation_seeds, ec.ks, ec.no_relevant)
    model, _ = train_local(train, val, dims, cfg.model_copy(update={"seed": ec.ablation_seeds[0]}))
    truth = targets.get("test_judgments", targets["test"])
    return {"grid": grid, "compression": ablation.compression(model, test, truth, rule=ec.no_relevant)}


def log_evaluation(lh: Lakehouse, run_date: dt.date, dataset: str, rows: pd.DataFrame, files: list,
                   artifact_version: str | None) -> None:
    """The evaluation as an MLflow run (metrics table + report files), when tracking is on."""
    from mmrank import tracking

    if (tr := tracking.tracker(lh)) is not None:
        tr.log_evaluation(run_date, dataset, rows, files, artifact_version)


@stage(STAGE, inputs=("training_lists",), outputs=("metrics",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, dataset: str = "sample",
        extra: dict[str, Scorer] | None = None, baselines: bool | None = None,
        per_query_out: dict | None = None) -> dict[str, int]:
    """Evaluate the shipped models (and the baselines when due or `baselines=True`) on the test split; write
    `metrics` (replacing run_date + dataset) and the report.

    `extra`: additional name -> scorer(batch) -> [B, L] scores to evaluate alongside (tests, experiments); they
    run in Spark tasks, so they must be picklable (cloudpickle: closures and lambdas are). `per_query_out`: see
    `evaluate`.
    """
    dataset = _valid_name(dataset)
    rows, meta = evaluate(lh, dataset, extra, run_date, baselines, per_query_out)
    meta["run_date"] = run_date.isoformat()
    tables = meta.pop("ablation", None)
    rec.model_version = meta["artifact_version"]
    rec.message = f"baselines {'trained' if meta['baselines'] else 'not trained'} ({meta['baselines_why']})"
    schema = lh.read("metrics").schema
    recs = [tuple({**r, "run_date": run_date, "dataset": dataset}[c] for c in schema.fieldNames()) for r in rows]
    lh.replace_date("metrics", lh.spark.createDataFrame(recs, schema=schema), run_date,
                    extra=f"dataset = '{dataset}'")
    files = report.write_evaluation(lh.paths.reports(run_date), dataset, pd.DataFrame(rows), meta)
    if tables is not None:
        files |= report.write_ablation(lh.paths.reports(run_date), dataset, tables["grid"], tables["compression"])
    log_evaluation(lh, run_date, dataset, pd.DataFrame(rows), list(files.values()), meta["artifact_version"])
    return {"models": len({r["model_name"] for r in rows}), "metric_rows": len(rows),
            "test_lists": meta["test_lists"], "baselines_trained": int(meta["baselines"])}
