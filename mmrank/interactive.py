"""What notebooks and interactive sessions use: parameters (Databricks widgets with a local fallback), opening
a lakehouse, and small driver-side views of the tables (a query's ranking with images and contributions,
model versions side by side, table versions). Nothing here runs in the nightly pipeline.

In a notebook, `globals()` holds Databricks' `dbutils` and `display`; run locally (or in the test suite) they
are absent and parameters come from `MMRANK_<NAME>` environment variables or the defaults.
"""
from __future__ import annotations

import datetime as dt
import os
from typing import Any, Callable

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import PRODUCT_MODALITIES
from mmrank.nightly import STAGE_NAMES
from mmrank.report import COLOURS, contribution_summary, metric_label, plt
from mmrank.tables import TABLES


def _print_preview(obj: Any) -> None:
    print(obj.limit(20).toPandas() if hasattr(obj, "toPandas") else obj)


class NotebookParams:
    """Notebook parameters: `dbutils.widgets` on Databricks, environment variables / defaults elsewhere."""

    def __init__(self, ns: dict[str, Any]):
        self._widgets = getattr(ns.get("dbutils"), "widgets", None)
        self.display: Callable[[Any], Any] = ns.get("display") or _print_preview

    def text(self, name: str, default: str, label: str | None = None) -> str:
        if self._widgets is not None:
            self._widgets.text(name, default, label or name)
            return self._widgets.get(name)
        return os.environ.get(f"MMRANK_{name.upper()}", default)

    def common(self) -> tuple[str, str, dt.date]:
        """(config path, `k=v;k=v` overrides, run date): the parameters every notebook takes."""
        return (self.text("conf", "", "config file"), self.text("overrides", "", "overrides k=v;k=v"),
                dt.date.fromisoformat(self.text("run_date", dt.date.today().isoformat(), "run date")))


def open_lakehouse(conf: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Lakehouse:
    """Config (conf/local.yaml unless `conf`) + overrides -> Lakehouse on the active (or a local) session."""
    from mmrank.config import load_config
    from mmrank.spark import get_spark

    cfg = load_config(conf or None, [o for o in overrides if o])
    return Lakehouse(get_spark(cfg), cfg)


def _on(run_date: dt.date):
    return F.col("run_date") == F.lit(sql_date(run_date)).cast("date")


def stage_table(lh: Lakehouse, run_date: dt.date) -> pd.DataFrame:
    """Every nightly stage with its runs row for run_date (status, duration, counts, model version)."""
    runs = (lh.read("runs").where(_on(run_date))
            .select("stage", "status", "duration_s", "model_version", "counts", "message", "finished_at")
            .toPandas())
    base = pd.DataFrame({"order": range(1, len(STAGE_NAMES) + 1), "stage": STAGE_NAMES})
    return base.merge(runs, on="stage", how="left")


def score_versions_local(lh: Lakehouse, run_date: dt.date, versions: list[str], max_queries: int = 50,
                         sources: list[str] | None = None) -> pd.DataFrame:
    """Score the candidates (`sources`, default impressions) of up to `max_queries` queries with each model
    version on the driver. Returns query_id, product_id and one `score@<version>` column per version (int8
    versions as `<version>+int8`). For notebooks and comparisons; the nightly path is the score stage."""
    from mmrank.scoring.candidates import candidate_pairs
    from mmrank.scoring.features import product_feature_frame, query_feature_frame
    from mmrank.scoring.scorer import QUANT_SUFFIX, load_scorer, resolve_version, score_frame

    adir = str(lh.paths.artifacts)
    cands = candidate_pairs(lh, run_date, sources or ["impressions"])
    qids = [r[0] for r in cands.select("query_id").distinct().orderBy("query_id").limit(max_queries).collect()]
    pairs = (cands.where(F.col("query_id").isin(qids))
             .join(query_feature_frame(lh.read("query_features")), "query_id")
             .join(product_feature_frame(lh.read("product_features")), "product_id").toPandas()
             .sort_values(["query_id", "product_id"]).reset_index(drop=True))
    out = pairs[["query_id", "product_id"]].copy()
    for v in versions:
        base, quant = (v[: -len(QUANT_SUFFIX)], True) if v.endswith(QUANT_SUFFIX) else (v, False)
        model, _ = load_scorer(adir, resolve_version(adir, base), quant)
        out[f"score@{v}"] = score_frame(model, pairs, model.dims.as_dict())["score"].to_numpy()
    return out


def query_ranking(lh: Lakehouse, run_date: dt.date, query_id: str, n: int = 10) -> pd.DataFrame:
    """One query's top-n for run_date with product title/brand/category and image bytes (when ingested)."""
    sc = (lh.read("ranking_scores").where(_on(run_date)).where(F.col("query_id") == query_id)
          .where(F.col("rank") <= n))
    if lh.exists("products"):
        sc = sc.join(lh.read("products").select("product_id", "title", "brand", "category", "image_bytes"),
                     "product_id", "left")
    pdf = sc.toPandas().sort_values("rank").reset_index(drop=True)
    for c in ("title", "brand", "category", "image_bytes"):
        if c not in pdf.columns:
            pdf[c] = None
    return pdf


def query_text(lh: Lakehouse, query_id: str) -> str:
    """The query's text (or `[voice query]`), for titles."""
    if not lh.exists("queries"):
        return query_id
    r = lh.read("queries").where(F.col("query_id") == query_id).select("query_text", "kind").first()
    if r is None:
        return query_id
    return r["query_text"] if r["query_text"] else f"[{r['kind']} query]"


def plot_query_ranking(ranking: pd.DataFrame, title: str = ""):
    """Figure: one column per ranked product: its image, rank/score/title, and a bar of its text/image/audio
    contributions. Products without an image show a blank tile."""
    import io

    from PIL import Image

    n = max(1, len(ranking))
    fig, axes = plt().subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    lim = max(1e-6, float(ranking[[f"contrib_{m}" for m in PRODUCT_MODALITIES]].abs().to_numpy().max())) if len(
        ranking) else 1.0
    for j in range(n):
        ax_img, ax_bar = axes[0][j], axes[1][j]
        ax_img.axis("off")
        if j >= len(ranking):
            ax_bar.axis("off")
            continue
        r = ranking.iloc[j]
        if r.get("image_bytes") is not None and len(r["image_bytes"]):
            ax_img.imshow(Image.open(io.BytesIO(bytes(r["image_bytes"]))).convert("RGB"))
        label = str(r.get("title") or r["product_id"])[:28]
        ax_img.set_title(f"#{int(r['rank'])} {r['score']:.3f}\n{label}", fontsize=7)
        vals = [float(r[f"contrib_{m}"]) for m in PRODUCT_MODALITIES]
        ax_bar.bar(range(3), vals, color=list(COLOURS))
        ax_bar.set_xticks(range(3), ["txt", "img", "aud"], fontsize=7)
        ax_bar.set_ylim(-lim * 1.1, lim * 1.1)
        ax_bar.axhline(0, color="black", lw=0.5)
        ax_bar.tick_params(axis="y", labelsize=6)
    fig.suptitle(title or "ranking", fontsize=9)
    fig.tight_layout()
    return fig


def contribution_table(lh: Lakehouse, run_date: dt.date) -> pd.DataFrame:
    """Per query kind and modality, how much each modality moved the day's scores (`contribution_summary`)."""
    day = lh.read("ranking_scores").where(_on(run_date))
    return contribution_summary(day, lh.read("queries") if lh.exists("queries") else None)


def compare_rankings(scores: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per version pair: mean top-k overlap and mean Spearman rank correlation of scores per query.

    `scores`: output of `score_versions_local` (query_id, product_id, score@<version>...)."""
    from scipy.stats import spearmanr

    cols = [c for c in scores.columns if c.startswith("score@")]
    rows = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            overlaps, rhos = [], []
            for _, g in scores.groupby("query_id"):
                top_a = set(g.sort_values([a, "product_id"], ascending=[False, True])["product_id"][:k])
                top_b = set(g.sort_values([b, "product_id"], ascending=[False, True])["product_id"][:k])
                overlaps.append(len(top_a & top_b) / max(1, min(k, len(g))))
                if len(g) > 2:
                    rhos.append(spearmanr(g[a], g[b]).statistic)
            rows.append({"version_a": a[6:], "version_b": b[6:], f"overlap@{k}": float(np.mean(overlaps)),
                         "spearman": float(np.nanmean(rhos)) if rhos else float("nan"),
                         "queries": scores["query_id"].nunique()})
    return pd.DataFrame(rows)


def metrics_by_version(lh: Lakehouse) -> pd.DataFrame:
    """All evaluation metrics, one row per (run_date, model_version, model_name, dataset, split), metric@k
    columns: how model versions compare across nightly runs."""
    m = lh.read("metrics").toPandas()
    if m.empty:
        return m
    m["label"] = [metric_label(a, b) for a, b in zip(m["metric"], m["k"])]
    wide = m.pivot_table(index=["run_date", "model_version", "model_name", "dataset", "split"],
                         columns="label", values="value", aggfunc="mean").reset_index()
    wide.columns.name = None
    return wide.sort_values(["run_date", "model_name"]).reset_index(drop=True)


def first_scored_query(lh: Lakehouse, run_date: dt.date) -> str:
    """The smallest query_id with scores on run_date (a default for the inspection notebook)."""
    r = (lh.read("ranking_scores").where(_on(run_date)).select("query_id").orderBy("query_id")
         .first())
    if r is None:
        raise LookupError(f"no ranking scores for {run_date}: run the score stage first")
    return r[0]


def table_overview(lh: Lakehouse) -> pd.DataFrame:
    """Every contract table: exists, Delta version, row count."""
    return pd.DataFrame([{"table": n, "exists": lh.exists(n), "delta_version": lh.version(n),
                          "rows": lh.read(n).count() if lh.exists(n) else 0} for n in TABLES])


def table_history(lh: Lakehouse, name: str, n: int = 10):
    """The last `n` Delta commits of a table (version, timestamp, operation, parameters)."""
    from delta.tables import DeltaTable

    lh.ensure(name)
    dt_ = (DeltaTable.forPath(lh.spark, lh.location(name)) if lh.root is not None
           else DeltaTable.forName(lh.spark, lh.location(name)))
    return dt_.history(n).select("version", "timestamp", "operation", "operationParameters")
