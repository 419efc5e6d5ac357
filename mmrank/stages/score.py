"""Stage `score`: candidate pairs -> the trained FusionRanker -> top-N per query in `ranking_scores`.

Reader -> mapper -> writer (as in clip-retrieval): `scoring.candidates` (pairs from the configured sources, keys
only) and `scoring.features` (which pairs have usable features; unusable embeddings quarantined, pairs without
features counted and skipped) -> `scoring.lookup` (the feature tables are stored in id buckets: each task reads
its query and product buckets' files in place, keeps the usable rows, encodes each item once with the model
(loaded once per worker) and scores its pairs from those codes) -> `scoring.writer` (rank per query, keep `score.top_n`), then one atomic
`replace_date` of run_date's rows: readers see the old or the new complete day, never a mix. Pairs with some
modalities missing are scored with masks, exactly as in training; a model trained with lexical features gets
each pair's `p_lex` the same way the training lists got them (joined in Spark, travelling with the keys). The
model is the registered `champion` (`mmrank.tracking`, chosen by the `promote` stage), or the latest artifact
without a registry. `score.quantize` (or `quantize=True`) scores with the int8 copy of the model and suffixes
the model version with `+int8`.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import uuid

from mmrank.lakehouse import Lakehouse
from mmrank.lexical.features import with_lex
from mmrank.modalities import PRODUCT_MODALITIES, QUERY_MODALITIES
from mmrank.runs import StageRun
from mmrank.scoring.candidates import candidate_pairs
from mmrank.scoring.features import bad_feature_rows, coverage_counts, scorable, usable_rows, with_presence
from mmrank.scoring.lookup import score_by_key
from mmrank.scoring.snapshot import snapshot_tables, task_slots
from mmrank.scoring.scorer import QUANT_SUFFIX, load_scorer, resolve_version
from mmrank.scoring.writer import ranking_rows, written_counts
from mmrank.stages import stage
from mmrank.storage import remove_tree
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
    model = load_scorer(artifacts_dir, version)[0]
    dims = model.dims.as_dict()
    pf, qf = lh.read("product_features"), lh.read("query_features")
    # NaN/inf or wrong-width embeddings (e.g. from an external writer) are quarantined, never scored
    counts = {"quarantined": lh.quarantine(bad_feature_rows(pf, qf, dims), "score", run_date)}
    q_rows = usable_rows(qf, "query_id", QUERY_MODALITIES, dims)
    p_rows = usable_rows(pf, "product_id", PRODUCT_MODALITIES, dims)
    work = lh.paths.work("score", f"{run_date.isoformat()}-{uuid.uuid4().hex[:8]}")
    joined = None
    try:
        snap = snapshot_tables(lh, str(work), dims, sc.bucket_mb, task_slots(lh.spark))
        cands = candidate_pairs(lh, run_date, candidates, dims, snapshot=snap)
        joined = with_presence(cands, q_rows, p_rows).persist()
        counts.update(coverage_counts(joined))
        pairs = scorable(joined)
        lex = model.cfg.lexical_features or model.cfg.prior == "bm25"   # the pairs' lexical features, as in training
        if lex:
            pairs = with_lex(lh, pairs, "p_lex")
        scored = score_by_key(pairs, snap, artifacts_dir, version, quantize, sc.batch_size,
                              lex_col="p_lex" if lex else None)
        lh.replace_date("ranking_scores", ranking_rows(scored, sc.top_n, run_date, model_version), run_date)
    finally:
        if joined is not None:
            joined.unpersist()
        remove_tree(work)
    counts.update(written_counts(lh.read("ranking_scores"), run_date))
    log.info("scored %d pairs with %s in %.1fs -> %d rows for %d queries", counts["pairs_scored"], model_version,
             time.perf_counter() - t0, counts["rows_written"], counts["queries_ranked"])
    return counts
