"""Stage `lexical`: tokenize changed product fields and queries, MERGE into `lexical_tokens`, and recompute the
BM25 corpus statistics `lexical_stats` when the tokens changed (`mmrank/lexical/`).

Incremental like `featurize`: a row's `content_hash` = sha256(tokenizer version | settings | text), so only new
or changed text is tokenized (in an iterator `mapInPandas`); rows of products/queries/fields that disappeared
are deleted by the same MERGE. The statistics are one Spark aggregation over the stored product tokens,
replaced in one commit. Per-pair features are computed from both tables where pairs are used
(`mmrank.lexical.features.with_lex`: training lists and scoring).
"""
from __future__ import annotations

import datetime as dt
import logging

from pyspark import StorageLevel
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.lexical.features import corpus_stats, field_texts, tokenize_frame
from mmrank.runs import StageRun
from mmrank.stages import stage

log = logging.getLogger("mmrank.lexical")

STAGE = "lexical"
_KEYS = ["kind", "id", "field"]


@stage(STAGE, inputs=("products", "queries"), outputs=("lexical_tokens", "lexical_stats"))
def run(lh: Lakehouse, run_date: dt.date, rec: StageRun) -> dict[str, int]:
    """Tokenize what changed; counts of tokenized / unchanged / deleted rows and statistics terms."""
    stem = lh.cfg.lexical.stem
    day = F.lit(sql_date(run_date)).cast("date")
    cands = field_texts(lh.read("products"), lh.read("queries"), stem)
    have = lh.read("lexical_tokens")
    todo = cands.join(have.select(*_KEYS, "content_hash"), [*_KEYS, "content_hash"], "left_anti")
    new = tokenize_frame(todo, stem).withColumn("run_date", day).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {f"tokenized_{k}": 0 for k in ("product", "query")}
        counts.update({f"tokenized_{r['kind']}": int(r["count"]) for r in new.groupBy("kind").count().collect()})
        kept = have.join(cands.select(*_KEYS, "content_hash"), [*_KEYS, "content_hash"], "left_semi")
        counts["unchanged"] = kept.count()
        counts["deleted"] = have.join(cands.select(*_KEYS), _KEYS, "left_anti").count()   # gone, not replaced
        changed = counts["tokenized_product"] + counts["tokenized_query"] + counts["deleted"] > 0
        if changed:
            lh.merge("lexical_tokens", new.unionByName(kept.select(*new.columns)), delete_missing=F.lit(True))
    finally:
        new.unpersist()
    if changed or lh.read("lexical_stats").limit(1).count() == 0:
        stats = corpus_stats(lh.read("lexical_tokens")).withColumn("run_date", day)
        lh.overwrite("lexical_stats", stats)
    counts["stats_terms"] = lh.read("lexical_stats").count()
    log.info("lexical %s: %s", run_date, counts)
    return counts
