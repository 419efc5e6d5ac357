"""Stage `evaluate`: NDCG@k, DCG@k, MAP and MRR on the TEST split of `training_lists`, for every model.

Models (names in the `metrics` table):
- `fusion`: the registered `champion` (`mmrank.tracking`; without a registry the latest artifact), if one
  exists and fits the lists' dims;
- `similarity`: unsupervised query-product text cosine (audio cosine for voice queries);
- `bm25`: unsupervised BM25 of the query over the product's text fields (when the lists have lexical features);
- with `evaluate.baselines` (else skipped, for a cheap nightly): `gated_fusion`, `concat_fusion` and
  `text_only` / `image_only` / `audio_only` (the configured fusion restricted to one product modality), all
  trained here by `train_local` on the train split with `train.*` hyperparameters, early-stopped on
  validation, with the catalog's cross-modal alignment (`mmrank.ranker.align`); and `lightgbm_lambdamart` on
  the same features (see `mmrank.ranker.baselines`).
A single-modality model is skipped when no training list has that modality (e.g. audio in fashion).

Results replace the `metrics` rows of (run_date, dataset) and are written as JSON + Markdown + PNG under
`storage.reports_dir/<run_date>/`, and logged as an MLflow run (`mmrank.tracking`). With `evaluate.ablation`
the fusion x head grid and the compression table (`mmrank.ranker.ablation`) are written as `ablation_<dataset>.md`.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mmrank import report
from mmrank.lakehouse import Lakehouse
from mmrank.modalities import PRODUCT_MODALITIES, ModalityDims
from mmrank.ranker import baselines
from mmrank.ranker.batch import Batch, iterate_batches
from mmrank.runs import StageRun
from mmrank.stages import stage
from mmrank.stages.training_lists import list_dims, read_splits

log = logging.getLogger("mmrank")

STAGE = "evaluate"
Scorer = Callable[[Batch], np.ndarray]
_SCORE_BATCH = 256


def model_scorer(model: torch.nn.Module) -> Scorer:
    """Scores [B, L] of a torch ranker in eval mode, in chunks of lists."""
    def score(batch: Batch) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(b) for b in iterate_batches(batch, _SCORE_BATCH)]).cpu().numpy()
    return score


def metric_rows(name: str, version: str, scores: np.ndarray, grades: np.ndarray, ks: list[int],
                rule: str, split: str = "test") -> list[dict]:
    """`metrics` rows (without run_date/dataset) from `evaluate_lists`: key `ndcg@10` -> metric ndcg, k 10."""
    from mmrank.ranker.metrics import evaluate_lists

    out = []
    for key, value in evaluate_lists(scores, grades, ks, rule).items():
        metric, _, k = key.partition("@")
        out.append({"model_version": version, "model_name": name, "split": split, "metric": metric,
                    "k": int(k) if k else None, "value": float(value)})
    return out


def _modality_present(batch: Batch) -> dict[str, bool]:
    m = batch["p_mask"].sum(dim=(0, 1))
    return {name: bool(m[i] > 0) for i, name in enumerate(PRODUCT_MODALITIES)}


def trained_models(lh: Lakehouse, train: Batch, val: Batch, dims: ModalityDims,
                   notes: list[str]) -> dict[str, tuple[str, Scorer]]:
    """Fusion variants, single-modality models and LightGBM trained on the train split."""
    from mmrank.ranker.fit import train_local

    from mmrank.ranker.align import alignment_state

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


def artifact_model(lh: Lakehouse, dims: ModalityDims, notes: list[str]) -> tuple[str, Scorer] | None:
    """(version, scorer) of the latest artifact, or None (with a note) when there is none or it does not fit."""
    from mmrank.ranker.artifact import ArtifactError, load_artifact

    from mmrank.tracking import champion_version

    try:
        model, meta = load_artifact(lh.paths.artifacts, champion_version(lh))
    except (ArtifactError, FileNotFoundError, OSError) as e:
        notes.append(f"`fusion` (trained artifact) not evaluated: {e}")
        return None
    if model.dims != dims:
        notes.append(f"`fusion` artifact {meta.get('version')} has dims {model.dims}, lists have {dims}: skipped")
        return None
    return str(meta.get("version")), model_scorer(model)


def judged_grades(lh: Lakehouse, test: pd.DataFrame, list_size: int) -> np.ndarray | None:
    """[B, L] grades of the test lists from `judgments` (max over sources; unjudged candidate -> 0), for the
    lists whose query has judgments; other lists keep their label grades. None when no test query is judged.

    Labels from logs are noisy, position-debiased estimates; judgments (e.g. the generator's hidden truth)
    are what a ranking should be measured against when they exist."""
    from pyspark.sql import functions as F

    qids = test["query_id"].tolist()
    j = (lh.read("judgments").where(F.col("query_id").isin(qids)).groupBy("query_id", "product_id")
         .agg(F.max("grade").alias("grade")).toPandas())
    if j.empty:
        return None
    truth = {(q, p): g for q, p, g in j[["query_id", "product_id", "grade"]].itertuples(index=False)}
    judged = set(j["query_id"])
    grades = np.stack([np.asarray(g, np.float64) for g in test["grades"]])[:, :list_size].copy()
    for i, (q, pids) in enumerate(zip(qids, test["product_ids"])):
        if q in judged:
            grades[i, :len(pids)] = [truth.get((q, p), 0.0) for p in pids]
    return grades


def _valid_name(dataset: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", dataset):
        raise ValueError(f"dataset name {dataset!r} must be letters, digits, _ or -")
    return dataset


def evaluate(lh: Lakehouse, dataset: str = "sample", extra: dict[str, Scorer] | None = None,
             scores_out: dict | None = None) -> tuple[list[dict], dict]:
    """Metric rows (model_version, model_name, split, metric, k, value) for every model, plus report meta.
    `scores_out` (optional dict) receives `query_ids`, the target grades (`grades:<split>`) and each model's
    test scores [B, L] (`scores:<model>`), for per-query comparisons (bench/quality.py's bootstrap)."""
    ec, tc = lh.cfg.evaluate, lh.cfg.train
    L = tc.list_size
    frames = read_splits(lh)
    if frames["test"].empty:
        raise ValueError("training_lists has no test lists: run the training_lists stage first")
    from mmrank.ranker.batch import rows_to_batch

    dims = list_dims(lh)
    batches = {s: rows_to_batch(f, dims, L) for s, f in frames.items() if not f.empty}
    notes: list[str] = []
    models: dict[str, tuple[str, Scorer]] = {}
    if (art := artifact_model(lh, dims, notes)) is not None:
        models["fusion"] = art
    models["similarity"] = ("unsupervised", baselines.similarity_scores)
    if bool((batches["test"]["p_lex"] != 0).any()):
        models["bm25"] = ("unsupervised", baselines.bm25_scores)
    if ec.baselines:
        if "train" not in batches:
            raise ValueError("training_lists has no train lists: cannot train the evaluation models")
        if "validation" not in batches:
            notes.append("validation split empty: early stopping used the train split")
        models.update(trained_models(lh, batches["train"], batches.get("validation", batches["train"]),
                                     dims, notes))
    models.update({name: ("external", fn) for name, fn in (extra or {}).items()})

    test = batches["test"]
    targets = {"test": test["grades"].numpy().astype(np.float64)}
    if (truth := judged_grades(lh, frames["test"], L)) is not None:
        targets["test_judgments"] = truth
    grades = targets["test"]
    rows = []
    if scores_out is not None:
        scores_out.update({"query_ids": frames["test"]["query_id"].tolist(),
                           **{f"grades:{k}": v for k, v in targets.items()}})
    for name, (version, fn) in models.items():
        scores = np.asarray(fn(test), np.float64)
        if scores_out is not None:
            scores_out[f"scores:{name}"] = scores
        for split, g in targets.items():
            rows += metric_rows(name, version, scores, g, ec.ks, ec.no_relevant, split)
    meta = {"dataset": dataset, "test_lists": int(grades.shape[0]), "targets": list(targets), "seed": tc.seed, "loss": tc.loss,
            "list_size": L, "dims": {m: dims.of(m) for m in PRODUCT_MODALITIES},
            "no_relevant": ec.no_relevant, "notes": notes,
            "artifact_version": models["fusion"][0] if "fusion" in models else None}
    if ec.ablation:
        meta["ablation"] = ablation_tables(lh, batches, targets, dims)
    return rows, meta


def ablation_tables(lh: Lakehouse, batches: dict[str, Batch], targets: dict[str, np.ndarray],
                    dims: ModalityDims) -> dict[str, pd.DataFrame]:
    """`evaluate.ablation`: the fusion x head grid and the compression table (`mmrank.ranker.ablation`)."""
    from mmrank.ranker import ablation
    from mmrank.ranker.fit import train_local

    ec, tc = lh.cfg.evaluate, lh.cfg.train
    cfg = tc.model_copy(update={"max_epochs": ec.ablation_max_epochs or tc.max_epochs})
    train, val = batches["train"], batches.get("validation", batches["train"])
    grid = ablation.grid(train, val, batches["test"], targets, dims, cfg, ec.ablation_seeds, ec.ks, ec.no_relevant)
    model, _ = train_local(train, val, dims, cfg.model_copy(update={"seed": ec.ablation_seeds[0]}))
    truth = targets.get("test_judgments", targets["test"])
    return {"grid": grid, "compression": ablation.compression(model, batches["test"], truth, rule=ec.no_relevant)}


def log_evaluation(lh: Lakehouse, run_date: dt.date, dataset: str, rows: pd.DataFrame, files: list,
                   artifact_version: str | None) -> None:
    """The evaluation as an MLflow run (metrics table + report files), when tracking is on."""
    from mmrank import tracking

    if (tr := tracking.tracker(lh)) is not None:
        tr.log_evaluation(run_date, dataset, rows, files, artifact_version)


@stage(STAGE, inputs=("training_lists",), outputs=("metrics",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, dataset: str = "sample",
        extra: dict[str, Scorer] | None = None, scores_out: dict | None = None) -> dict[str, int]:
    """Evaluate all models on the test split; write `metrics` (replacing run_date + dataset) and the report.

    `extra`: additional name -> scorer(batch) -> [B, L] scores to evaluate alongside (tests, experiments);
    `scores_out`: see `evaluate`.
    """
    dataset = _valid_name(dataset)
    rows, meta = evaluate(lh, dataset, extra, scores_out)
    meta["run_date"] = run_date.isoformat()
    tables = meta.pop("ablation", None)
    rec.model_version = meta["artifact_version"]
    schema = lh.read("metrics").schema
    recs = [tuple({**r, "run_date": run_date, "dataset": dataset}[c] for c in schema.fieldNames()) for r in rows]
    lh.replace_date("metrics", lh.spark.createDataFrame(recs, schema=schema), run_date,
                    extra=f"dataset = '{dataset}'")
    files = report.write_evaluation(lh.paths.reports(run_date), dataset, pd.DataFrame(rows), meta)
    if tables is not None:
        files |= report.write_ablation(lh.paths.reports(run_date), dataset, tables["grid"], tables["compression"])
    log_evaluation(lh, run_date, dataset, pd.DataFrame(rows), list(files.values()), meta["artifact_version"])
    return {"models": len({r["model_name"] for r in rows}), "metric_rows": len(rows),
            "test_lists": meta["test_lists"]}
