"""Stage `score`: candidate pairs -> the trained FusionRanker -> top-N per query in `ranking_scores`.

Reader -> mapper -> writer (as in clip-retrieval): `scoring.candidates` (pairs from the configured sources)
and `scoring.features` (their features; unusable embeddings quarantined, pairs without features counted and
skipped) -> `scoring.scorer` (the model once per Spark worker, in an iterator `mapInArrow`) ->
`scoring.writer` (rank per query, keep `score.top_n`), then one atomic `replace_date` of run_date's rows:
readers see the old or the new complete day, never a mix. Pairs with some modalities missing are scored with
masks, exactly as in training; a model trained with lexical features gets each pair's `p_lex` the same way the
training lists got them. The model is the registered `champion` (`mmrank.tracking`, chosen by the `promote`
stage), or the latest artifact without a registry. `score.quantize` (or `quantize=True`) scores with the int8
copy of the model and suffixes the model version with `+int8`.
"""
from __future__ import annotations

import datetime as dt
import logging
import time

from mmrank.lakehouse import Lakehouse
from mmrank.lexical.features import with_lex
from mmrank.runs import StageRun
from mmrank.scoring.candidates import candidate_pairs
from mmrank.scoring.features import (bad_feature_rows, coverage_counts, product_feature_frame,
                                     query_feature_frame, scorable, with_features)
from mmrank.scoring.scorer import QUANT_SUFFIX, load_scorer, resolve_version, score_df
from mmrank.scoring.writer import ranking_rows, written_counts
from mmrank.stages import stage
from mmrank.tracking import champion_version

log = logging.getLogger("mmrank.score")


@stage("score", inputs=("query_log", "product_features", "query_features", "lexical_tokens"),
       outputs=("ranking_scores",))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun, version: str | None = None, quantize: bool | None = None,
        candidates: list[str] | None = None) -> dict[str, int]:
    """Score run_date's candidates with `version` (default: the registered `champion`, or the latest artifact
    when there is no registry); counts of pairs and rows."""
    sc = lh.cfg.score
    quantize = sc.quantize if quantize is None else quantize
    artifacts_dir = str(lh.paths.artifacts)
    t0 = time.perf_counter()
    version = resolve_version(artifacts_dir, version or champion_version(lh))  # registered champion, else latest
    rec.model_version = model_version = version + (QUANT_SUFFIX if quantize else "")
    dims = load_scorer(artifacts_dir, version)[0].dims.as_dict()
    pf, qf = lh.read("product_features"), lh.read("query_features")
    # NaN/inf or wrong-width embeddings (e.g. from an external writer) are quarantined, never scored
    counts = {"quarantined": lh.quarantine(bad_feature_rows(pf, qf, dims), "score", run_date)}
    cands = candidate_pairs(lh, run_date, candidates, dims).persist()
    joined = with_features(cands, query_feature_frame(qf, dims), product_feature_frame(pf, dims))
    counts.update(coverage_counts(joined))
    pairs = scorable(joined)
    model_cfg = load_scorer(artifacts_dir, version)[0].cfg
    if model_cfg.lexical_features or model_cfg.prior == "bm25":   # the pairs' lexical features, as in training
        pairs = with_lex(lh, pairs, "p_lex")
    scored = score_df(pairs, artifacts_dir, version, quantize, sc.batch_size)
    lh.replace_date("ranking_scores", ranking_rows(scored, sc.top_n, run_date, model_version), run_date)
    cands.unpersist()
    counts.update(written_counts(lh.read("ranking_scores"), run_date))
    log.info("scored %d pairs with %s in %.1fs -> %d rows for %d queries", counts["pairs_scored"], model_version,
             time.perf_counter() - t0, counts["rows_written"], counts["queries_ranked"])
    return counts
