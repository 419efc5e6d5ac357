"""The nightly evaluation report: one Markdown file with PNG plots under `storage.reports_dir/<run_date>/`.

Sections (each skipped with a note when its input table is empty):
- pipeline runs of the date (`runs`): stage, status, duration, model version, counts;
- metrics per model / modality variant for the date (`metrics`), as a table and a grouped bar plot;
- the metric trend across run dates (`metrics`), one line per model;
- score distributions of the date's `ranking_scores` (histogram, score by rank);
- modality contributions (`ranking_scores.contrib_*`): mean |contribution| and presence per modality,
  split by query kind (typed / voice) when `queries` is available.

It only aggregates tables; the evaluate stage's own per-evaluation plot lives in `mmrank/eval_report.py`.
`write_report(lh, run_date) -> Path` is called by the nightly pipeline after `evaluate`.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date

log = logging.getLogger("mmrank.report")

REPORT_FILE = "nightly_report.md"
MODALITIES = ("text", "image", "audio")


def report_dir(lh: Lakehouse, run_date: dt.date) -> Path:
    return lh.cfg.resolve_path(lh.cfg.storage.reports_dir) / run_date.isoformat()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    if df.empty:
        return "_(none)_"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append("" if np.isnan(v) else floatfmt.format(v))
            else:
                cells.append(str(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _date_filter(run_date: dt.date):
    return F.col("run_date") == F.lit(sql_date(run_date)).cast("date")


# ---- sections -------------------------------------------------------------------------------------------
def runs_section(lh: Lakehouse, run_date: dt.date) -> str:
    runs = lh.read("runs").where(_date_filter(run_date)).toPandas()
    if runs.empty:
        return "_no runs recorded for this date_"
    runs = runs.sort_values("started_at")
    runs["counts"] = runs["counts"].map(lambda c: ", ".join(f"{k}={v}" for k, v in sorted((c or {}).items())))
    runs["duration_s"] = runs["duration_s"].astype(float)
    return _md_table(runs[["stage", "status", "duration_s", "model_version", "counts"]].fillna(""), "{:.1f}")


def metrics_section(lh: Lakehouse, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    """Per dataset: model x metric tables per split and the bar plot, with the evaluate stage's helpers."""
    from mmrank import eval_report

    m = lh.read("metrics").where(_date_filter(run_date)).toPandas()
    if m.empty:
        return "_no metrics for this date (evaluate did not run?)_", []
    texts, files = [], []
    for dataset, part in m.groupby("dataset", sort=True):
        part = part.drop_duplicates(["split", "model_name", "metric", "k"])
        tables = {split: eval_report.wide_table(g) for split, g in part.groupby("split", sort=True)}
        name = f"metrics_{dataset}.png".replace("/", "_").replace(":", "_")
        eval_report.bar_plot(tables, out / name, f"{dataset}: metrics per model, {run_date}")
        for split, table in tables.items():
            versions = ", ".join(sorted({str(v) for v in part.loc[part["split"] == split, "model_version"]
                                         .dropna()}))
            texts.append(f"**{dataset} / {split}** (model versions: {versions or 'n/a'})\n\n"
                         + eval_report.markdown_table(table))
        files.append(name)
    note = ("Models: the fusion model and its single-modality variants / baselines as evaluated by the "
            "evaluate stage (one row per model_name).\n\n")
    return note + "\n\n".join(texts), files


def primary_metric(lh: Lakehouse) -> tuple[str, int]:
    ks = lh.cfg.evaluate.ks
    return "ndcg", max(ks) if ks else 10


def trend_section(lh: Lakehouse, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    plt = _plt()
    metric, k = primary_metric(lh)
    m = (lh.read("metrics").where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
         .where(F.lower("metric") == metric).where(F.col("k") == k).toPandas())
    if m.empty:
        return f"_no {metric}@{k} history_", []
    split = "test" if (m["split"] == "test").any() else m["split"].iloc[0]
    m = m[m["split"] == split]
    piv = m.pivot_table(index="run_date", columns="model_name", values="value", aggfunc="mean").sort_index()
    fig, ax = plt.subplots(figsize=(7, 4))
    for col in piv.columns:
        ax.plot(piv.index, piv[col], marker="o", label=str(col))
    ax.set_title(f"{metric}@{k} ({split}) across runs")
    ax.set_xlabel("run_date")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out / "metric_trend.png", dpi=100)
    plt.close(fig)
    tab = piv.reset_index()
    tab.columns.name = None
    return f"{metric}@{k} on the {split} split, per run date:\n\n" + _md_table(tab), ["metric_trend.png"]


def scores_frame(lh: Lakehouse, run_date: dt.date) -> pd.DataFrame:
    return lh.read("ranking_scores").where(_date_filter(run_date)).toPandas()


def scores_section(sc: pd.DataFrame, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    plt = _plt()
    if sc.empty:
        return "_no ranking scores for this date_", []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(sc["score"].astype(float), bins=40, color="#4477aa")
    axes[0].set_title(f"score distribution ({len(sc)} rows)")
    axes[0].set_xlabel("score")
    by_rank = sc.groupby("rank")["score"].agg(["mean", "min", "max"]).sort_index()
    axes[1].plot(by_rank.index, by_rank["mean"], label="mean")
    axes[1].fill_between(by_rank.index, by_rank["min"], by_rank["max"], alpha=0.25, label="min-max")
    axes[1].set_title("score by rank")
    axes[1].set_xlabel("rank")
    axes[1].legend()
    fig.suptitle(f"ranking_scores {run_date}")
    fig.tight_layout()
    fig.savefig(out / "score_distribution.png", dpi=100)
    plt.close(fig)
    desc = sc["score"].astype(float).describe(percentiles=[0.05, 0.5, 0.95])
    stats = pd.DataFrame({"statistic": desc.index, "value": desc.to_numpy()})
    versions = ", ".join(sorted(sc["model_version"].unique()))
    head = (f"{len(sc)} rows, {sc['query_id'].nunique()} queries, {sc['product_id'].nunique()} products, "
            f"model {versions}, top-N = {int(sc['rank'].max())}\n\n")
    return head + _md_table(stats), ["score_distribution.png"]


def contribution_summary(sc: pd.DataFrame, kinds: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (query kind,) modality: mean |contribution|, mean signed contribution, share of |contribution|,
    and the fraction of scored rows where the modality was present (contribution != 0)."""
    if kinds is not None and not kinds.empty:
        sc = sc.merge(kinds, on="query_id", how="left").fillna({"kind": "unknown"})
    else:
        sc = sc.assign(kind="all")
    rows = []
    for kind, g in sc.groupby("kind"):
        absmeans = {m: float(g[f"contrib_{m}"].abs().mean()) for m in MODALITIES}
        total = sum(absmeans.values()) or 1.0
        for m in MODALITIES:
            c = g[f"contrib_{m}"].astype(float)
            rows.append({"query_kind": kind, "modality": m, "mean_abs": absmeans[m], "mean": float(c.mean()),
                         "share": absmeans[m] / total, "present": float((c != 0).mean()), "rows": len(g)})
    return pd.DataFrame(rows)


def contributions_section(lh: Lakehouse, sc: pd.DataFrame, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    plt = _plt()
    if sc.empty:
        return "_no ranking scores for this date_", []
    kinds = lh.read("queries").select("query_id", "kind").toPandas() if lh.exists("queries") else None
    summ = contribution_summary(sc, kinds)
    piv = summ.pivot_table(index="query_kind", columns="modality", values="share").reindex(columns=MODALITIES)
    fig, ax = plt.subplots(figsize=(6, 4))
    piv.plot.bar(ax=ax, stacked=True, rot=0, color=["#4477aa", "#ee6677", "#228833"])
    ax.set_ylabel("share of mean |contribution|")
    ax.set_title(f"modality contributions {run_date}")
    fig.tight_layout()
    fig.savefig(out / "modality_contributions.png", dpi=100)
    plt.close(fig)
    note = ("Contribution of modality m = score(all present modalities) - score(m masked) (occlusion); "
            "0 where the product has no m.\n\n")
    return note + _md_table(summ), ["modality_contributions.png"]


def write_report(lh: Lakehouse, run_date: dt.date) -> Path:
    """Write `<reports_dir>/<run_date>/nightly_report.md` with its PNG plots; returns the Markdown path."""
    out = report_dir(lh, run_date)
    out.mkdir(parents=True, exist_ok=True)
    sc = scores_frame(lh, run_date)
    parts = [f"# mmrank nightly report {run_date}", "",
             f"Scores table: `{lh.location('ranking_scores')}` (run_date = {run_date}); "
             f"metrics: `{lh.location('metrics')}`.", ""]

    def add(title: str, body: str, images: list[str]) -> None:
        parts.extend([f"## {title}", "", body, ""])
        parts.extend(f"![{Path(i).stem}]({i})\n" for i in images)

    add("Pipeline runs", runs_section(lh, run_date), [])
    add("Metrics per model and modality", *metrics_section(lh, run_date, out))
    add("Metric trend across runs", *trend_section(lh, run_date, out))
    add("Score distributions", *scores_section(sc, run_date, out))
    add("Modality contributions", *contributions_section(lh, sc, run_date, out))
    path = out / REPORT_FILE
    path.write_text("\n".join(parts))
    log.info("nightly report written to %s", path)
    return path


# ---- interactive helpers (notebooks) --------------------------------------------------------------------
def query_ranking(lh: Lakehouse, run_date: dt.date, query_id: str, n: int = 10) -> pd.DataFrame:
    """One query's top-n for run_date with product title/brand/category and image bytes (when ingested)."""
    sc = (lh.read("ranking_scores").where(_date_filter(run_date)).where(F.col("query_id") == query_id)
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

    plt = _plt()
    from PIL import Image

    n = max(1, len(ranking))
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    colors = ["#4477aa", "#ee6677", "#228833"]
    lim = max(1e-6, float(ranking[[f"contrib_{m}" for m in MODALITIES]].abs().to_numpy().max())) if len(
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
        vals = [float(r[f"contrib_{m}"]) for m in MODALITIES]
        ax_bar.bar(range(3), vals, color=colors)
        ax_bar.set_xticks(range(3), ["txt", "img", "aud"], fontsize=7)
        ax_bar.set_ylim(-lim * 1.1, lim * 1.1)
        ax_bar.axhline(0, color="black", lw=0.5)
        ax_bar.tick_params(axis="y", labelsize=6)
    fig.suptitle(title or "ranking", fontsize=9)
    fig.tight_layout()
    return fig


def compare_rankings(scores: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per version pair: mean top-k overlap and mean Spearman rank correlation of scores per query.

    `scores`: output of `mmrank.score.score_versions_local` (query_id, product_id, score@<version>...)."""
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
    from mmrank import eval_report

    m = lh.read("metrics").toPandas()
    if m.empty:
        return m
    m["label"] = [eval_report.metric_label(a, b) for a, b in zip(m["metric"], m["k"])]
    wide = m.pivot_table(index=["run_date", "model_version", "model_name", "dataset", "split"],
                         columns="label", values="value", aggfunc="mean").reset_index()
    wide.columns.name = None
    return wide.sort_values(["run_date", "model_name"]).reset_index(drop=True)


def first_scored_query(lh: Lakehouse, run_date: dt.date) -> str:
    """The smallest query_id with scores on run_date (a default for the inspection notebook)."""
    r = (lh.read("ranking_scores").where(_date_filter(run_date)).select("query_id").orderBy("query_id")
         .first())
    if r is None:
        raise LookupError(f"no ranking scores for {run_date}: run the score stage first")
    return r[0]


def table_overview(lh: Lakehouse) -> pd.DataFrame:
    """Every contract table: exists, Delta version, row count."""
    from mmrank.tables import TABLES

    return pd.DataFrame([{"table": n, "exists": lh.exists(n), "delta_version": lh.version(n),
                          "rows": lh.read(n).count() if lh.exists(n) else 0} for n in TABLES])


def table_history(lh: Lakehouse, name: str, n: int = 10):
    """The last `n` Delta commits of a table (version, timestamp, operation, parameters)."""
    from delta.tables import DeltaTable

    lh.ensure(name)
    dt_ = (DeltaTable.forPath(lh.spark, lh.location(name)) if lh.root is not None
           else DeltaTable.forName(lh.spark, lh.location(name)))
    return dt_.history(n).select("version", "timestamp", "operation", "operationParameters")
