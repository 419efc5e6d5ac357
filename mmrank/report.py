"""Reports: Markdown files with PNG plots under `storage.reports_dir/<run_date>/`, one table writer and one plot
set-up for all of them.

- `write_evaluation` (the evaluate stage): `metrics_<dataset>.json`, `evaluation_<dataset>.md` and its bar plot
  `evaluation_<dataset>.png` (models x NDCG/MAP/MRR, one panel per evaluation target);
- `write_ablation` (evaluate with `evaluate.ablation`): `ablation_<dataset>.md` (fusion x head, mean ± sd over
  seeds; the compression table) and `.json`;
- `write_nightly` (the report stage): `nightly_report.md` with the date's pipeline runs (`runs`), the promotion
  decision (champion / challenger and why, the registered versions), the metrics per
  model (`metrics`, linking the evaluation plots rather than drawing them again), the metric trend across run
  dates, score distributions of the date's `ranking_scores` and modality contributions (`contrib_*`, split by
  query kind). A section whose input table is empty says so. Every section is built from Spark aggregates
  (bounded by stages, models, dates, ranks and histogram bins), never from a day's rows on the driver.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank.lakehouse import Lakehouse, sql_date
from mmrank.modalities import PRODUCT_MODALITIES

log = logging.getLogger("mmrank.report")

NIGHTLY_FILE = "nightly_report.md"
PLOT_METRICS = ("ndcg", "map", "mrr")  # bounded in [0, 1]; DCG is in the tables only
COLOURS = ("#4477aa", "#ee6677", "#228833")


def plt():
    """matplotlib.pyplot on the headless Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, path: Path, dpi: int = 100) -> None:
    fig.tight_layout()
    buf = io.BytesIO()  # written in one call through the path (a local Path or mmrank.storage.StoragePath)
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    path.write_bytes(buf.getvalue())
    plt().close(fig)


def md_table(df: pd.DataFrame, floatfmt: str = "{:.4f}", na: str = "") -> str:
    """A GitHub Markdown table of `df` (no tabulate dependency); floats through `floatfmt`, NaN as `na`."""
    if df.empty:
        return "_(none)_"
    lines = ["| " + " | ".join(str(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        cells = [(na if np.isnan(v) else floatfmt.format(v)) if isinstance(v, (float, np.floating))
                 else str(v).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- evaluation tables and plot ------------------------------------------------------------------------
def metric_label(metric: str, k: int | None) -> str:
    return f"{metric}@{int(k)}" if k is not None and not pd.isna(k) else metric


def wide_table(rows: pd.DataFrame) -> pd.DataFrame:
    """model x metric-label table of `metrics` rows (columns model, ndcg@5, ...; models in input order)."""
    df = rows.assign(label=[metric_label(m, k) for m, k in zip(rows["metric"], rows["k"])])
    order = list(dict.fromkeys(df["model_name"]))
    cols = list(dict.fromkeys(df["label"]))
    wide = df.pivot(index="model_name", columns="label", values="value").loc[order, cols]
    wide.columns.name = None
    return wide.rename_axis("model").reset_index()


def bar_plot(tables: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """One grouped bar panel (models x bounded metrics) per evaluation target (split)."""
    n_models = max(len(t) for t in tables.values())
    fig, axes = plt().subplots(len(tables), 1, figsize=(max(6, 1.3 * n_models), 4 * len(tables)), squeeze=False)
    for ax, (split, table) in zip(axes[:, 0], tables.items()):
        cols = [c for c in table.columns if c.split("@")[0] in PLOT_METRICS]
        table.set_index("model")[cols].plot.bar(ax=ax, ylim=(0, 1), rot=30)
        ax.set_title(f"{title} ({split})")
        ax.set_ylabel("value")
        ax.set_xlabel("")
        ax.legend(ncol=len(cols), fontsize=8, loc="lower right")
    save(fig, path, dpi=110)


def evaluation_files(out_dir: Path, dataset: str) -> dict[str, Path]:
    return {ext: out_dir / f"{'metrics' if ext == 'json' else 'evaluation'}_{dataset}.{ext}"
            for ext in ("json", "md", "png")}


def write_evaluation(out_dir: Path, dataset: str, rows: pd.DataFrame, meta: dict) -> dict[str, Path]:
    """Write `metrics_<dataset>.json`, `evaluation_<dataset>.md` and `.png` into `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = evaluation_files(out_dir, dataset)
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    paths["json"].write_text(json.dumps({"meta": meta, "metrics": records}, indent=1, default=str))
    tables = {split: wide_table(part) for split, part in rows.groupby("split", sort=False)}
    bar_plot(tables, paths["png"], f"{dataset}: metrics per model")
    notes = "\n".join(f"- {n}" for n in meta.get("notes", []))
    sections = "\n\n".join(f"## {split}\n\n{md_table(t, na='n/a')}" for split, t in tables.items())
    paths["md"].write_text(
        f"# Evaluation: {dataset} ({meta.get('run_date')})\n\n"
        f"Test split: {meta.get('test_lists')} query lists; seed {meta.get('seed')}; "
        f"lists without a relevant item: `{meta.get('no_relevant')}`. `test` = grades from `labels`; "
        f"`test_judgments` (if present) = the same lists graded by `judgments`.\n\n"
        f"{sections}\n\n![metrics]({paths['png'].name})\n\n{notes}\n")
    return paths


# ---- ablation (evaluate.ablation, bench/quality.py --ablation) ----------------------------------------------
def mean_sd(values: pd.Series) -> str:
    """`mean ± sd` over seeds (`mean` alone for one seed)."""
    v = values.astype(float)
    return f"{v.mean():.4f}" if len(v) < 2 else f"{v.mean():.4f} ± {v.std():.4f}"


def ablation_table(grid: pd.DataFrame, split: str, metric: str = "ndcg@10") -> pd.DataFrame:
    """fusion x head table of `metric` on `split`: mean ± sd over seeds (fusions and heads in grid order)."""
    g = grid[(grid["split"] == split) & (grid["metric"] == metric)]
    heads = list(dict.fromkeys(g["head"]))
    rows = [{"fusion": f, **{h: mean_sd(part[part["head"] == h]["value"]) for h in heads}}
            for f, part in g.groupby("fusion", sort=False)]
    return pd.DataFrame(rows, columns=["fusion", *heads])


def ablation_markdown(grid: pd.DataFrame, comp: pd.DataFrame | None, title: str, metric: str = "ndcg@10") -> str:
    """The ablation section: one fusion x head table per evaluation target, then the compression table."""
    seeds = sorted(grid["seed"].unique()) if not grid.empty else []
    parts = [f"## Ablation: {title}", "",
             f"{metric} on the test lists, mean ± sd over model seeds {seeds} (rows: fusion, columns: head); "
             "each model trained on the train split, early-stopped on validation.", ""]
    for split in dict.fromkeys(grid["split"]):
        parts += [f"### {split}", "", md_table(ablation_table(grid, split, metric)), ""]
    if comp is not None and not comp.empty:
        c = comp.assign(sparsity=comp["sparsity"].map(lambda v: f"{v:.0%}"),
                        pairs_per_s=comp["pairs_per_s"].map(lambda v: f"{v:,.0f}"))
        parts += ["### Compression", "", "One trained model (the configured fusion and head), pruned and/or int8: "
                  "NDCG on the test lists, scoring throughput (scores + contributions, one thread) and "
                  "serialized size (`bytes`; `zlib_bytes` compressed).", "", md_table(c, floatfmt="{:.4f}"), ""]
    return "\n".join(parts)


def write_ablation(out_dir: Path, dataset: str, grid: pd.DataFrame, comp: pd.DataFrame | None) -> dict[str, Path]:
    """`ablation_<dataset>.md` and `ablation_<dataset>.json` (the raw rows) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"ablation_md": out_dir / f"ablation_{dataset}.md", "ablation_json": out_dir / f"ablation_{dataset}.json"}
    paths["ablation_md"].write_text(ablation_markdown(grid, comp, dataset) + "\n")
    doc = {"grid": grid.to_dict("records"), "compression": [] if comp is None else comp.to_dict("records")}
    paths["ablation_json"].write_text(json.dumps(doc, indent=1, default=str))
    return paths


# ---- nightly report sections ---------------------------------------------------------------------------
def _on(run_date: dt.date):
    return F.col("run_date") == F.lit(sql_date(run_date)).cast("date")


def runs_section(lh: Lakehouse, run_date: dt.date) -> str:
    runs = lh.read("runs").where(_on(run_date)).toPandas()
    if runs.empty:
        return "_no runs recorded for this date_"
    runs = runs.sort_values("started_at")
    runs["counts"] = runs["counts"].map(lambda c: ", ".join(f"{k}={v}" for k, v in sorted((c or {}).items())))
    runs["duration_s"] = runs["duration_s"].astype(float)
    return md_table(runs[["stage", "status", "duration_s", "model_version", "counts"]].fillna(""), "{:.1f}")


def metrics_section(lh: Lakehouse, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    """Per dataset and split: the model x metric table; the evaluate stage's plot of the dataset is linked."""
    m = lh.read("metrics").where(_on(run_date)).toPandas()
    if m.empty:
        return "_no metrics for this date (evaluate did not run?)_", []
    texts, files = [], []
    for dataset, part in m.groupby("dataset", sort=True):
        part = part.drop_duplicates(["split", "model_name", "metric", "k"])
        for split, g in part.groupby("split", sort=True):
            versions = ", ".join(sorted({str(v) for v in g["model_version"].dropna()}))
            texts.append(f"**{dataset} / {split}** (model versions: {versions or 'n/a'})\n\n"
                         + md_table(wide_table(g), na="n/a"))
        png = evaluation_files(out, str(dataset))["png"]
        if png.exists():
            files.append(png.name)
    note = ("Models: the fusion model and its single-modality variants / baselines as evaluated by the "
            "evaluate stage (one row per model_name).\n\n")
    return note + "\n\n".join(texts), files


def trend_section(lh: Lakehouse, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    ks = lh.cfg.evaluate.ks
    metric, k = "ndcg", max(ks) if ks else 10
    m = (lh.read("metrics").where(F.col("run_date") <= F.lit(sql_date(run_date)).cast("date"))
         .where(F.lower("metric") == metric).where(F.col("k") == k).toPandas())
    if m.empty:
        return f"_no {metric}@{k} history_", []
    split = "test" if (m["split"] == "test").any() else m["split"].iloc[0]
    m = m[m["split"] == split]
    piv = m.pivot_table(index="run_date", columns="model_name", values="value", aggfunc="mean").sort_index()
    fig, ax = plt().subplots(figsize=(7, 4))
    for col in piv.columns:
        ax.plot(piv.index, piv[col], marker="o", label=str(col))
    ax.set_title(f"{metric}@{k} ({split}) across runs")
    ax.set_xlabel("run_date")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    save(fig, out / "metric_trend.png")
    tab = piv.reset_index()
    tab.columns.name = None
    return f"{metric}@{k} on the {split} split, per run date:\n\n" + md_table(tab), ["metric_trend.png"]


def score_stats(day: DataFrame, bins: int = 40) -> dict:
    """Everything the score section shows, as Spark aggregates of one day of `ranking_scores` (no row of it
    reaches the driver): totals, approximate quantiles, a `bins`-bin histogram and mean/min/max per rank."""
    qs = (0.05, 0.5, 0.95)
    t = day.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("query_id").alias("queries"),
                F.countDistinct("product_id").alias("products"), F.mean("score").alias("mean"),
                F.stddev("score").alias("std"), F.min("score").alias("min"), F.max("score").alias("max"),
                F.max("rank").alias("top_n"), F.percentile_approx("score", list(qs), 10_000).alias("q"),
                F.sort_array(F.collect_set("model_version")).alias("versions")).first()
    if not t["n"]:
        return {"n": 0}
    lo, width = float(t["min"]), (float(t["max"]) - float(t["min"])) / bins or 1.0
    b = F.least(F.floor((F.col("score") - F.lit(lo)) / F.lit(width)), F.lit(bins - 1)).cast("int")
    hist = dict(day.groupBy(b.alias("b")).count().collect())
    by_rank = (day.groupBy("rank").agg(F.mean("score").alias("mean"), F.min("score").alias("min"),
                                       F.max("score").alias("max")).orderBy("rank").toPandas().set_index("rank"))
    describe = {"count": t["n"], "mean": t["mean"], "std": t["std"], "min": t["min"],
                **{f"{int(q * 100)}%": v for q, v in zip(qs, t["q"])}, "max": t["max"]}
    return {"n": int(t["n"]), "queries": int(t["queries"]), "products": int(t["products"]),
            "top_n": int(t["top_n"]), "versions": list(t["versions"]), "describe": describe, "by_rank": by_rank,
            "edges": lo + width * np.arange(bins + 1), "counts": np.array([hist.get(i, 0) for i in range(bins)])}


def scores_section(day: DataFrame, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    st = score_stats(day)
    if not st["n"]:
        return "_no ranking scores for this date_", []
    fig, axes = plt().subplots(1, 2, figsize=(11, 4))
    axes[0].stairs(st["counts"], st["edges"], fill=True, color=COLOURS[0])
    axes[0].set_title(f"score distribution ({st['n']} rows)")
    axes[0].set_xlabel("score")
    by_rank = st["by_rank"]
    axes[1].plot(by_rank.index, by_rank["mean"], label="mean")
    axes[1].fill_between(by_rank.index, by_rank["min"], by_rank["max"], alpha=0.25, label="min-max")
    axes[1].set_title("score by rank")
    axes[1].set_xlabel("rank")
    axes[1].legend()
    fig.suptitle(f"ranking_scores {run_date}")
    save(fig, out / "score_distribution.png")
    stats = pd.DataFrame({"statistic": list(st["describe"]),
                          "value": [float(v) if v is not None else np.nan for v in st["describe"].values()]})
    head = (f"{st['n']} rows, {st['queries']} queries, {st['products']} products, "
            f"model {', '.join(st['versions'])}, top-N = {st['top_n']}\n\n")
    return head + md_table(stats) + "\n\n(percentiles approximate: Spark `percentile_approx`)", \
        ["score_distribution.png"]


def contribution_summary(scores: DataFrame, kinds: DataFrame | None = None) -> pd.DataFrame:
    """Per (query kind,) modality: mean |contribution|, mean signed contribution, share of |contribution|,
    and the fraction of scored rows where the modality was present (contribution != 0). Spark aggregates of
    `ranking_scores` rows (and `queries`' query_id, kind), one small row per kind to the driver."""
    if kinds is not None:
        scores = scores.join(kinds.select("query_id", "kind"), "query_id", "left").fillna({"kind": "unknown"})
    else:
        scores = scores.withColumn("kind", F.lit("all"))
    aggs = [F.count(F.lit(1)).alias("rows")]
    for m in PRODUCT_MODALITIES:
        c = F.col(f"contrib_{m}").cast("double")
        aggs += [F.mean(F.abs(c)).alias(f"abs_{m}"), F.mean(c).alias(f"mean_{m}"),
                 F.mean((c != 0).cast("double")).alias(f"present_{m}")]
    rows = []
    for r in scores.groupBy("kind").agg(*aggs).orderBy("kind").collect():
        total = sum(r[f"abs_{m}"] for m in PRODUCT_MODALITIES) or 1.0
        for m in PRODUCT_MODALITIES:
            rows.append({"query_kind": r["kind"], "modality": m, "mean_abs": r[f"abs_{m}"], "mean": r[f"mean_{m}"],
                         "share": r[f"abs_{m}"] / total, "present": r[f"present_{m}"], "rows": r["rows"]})
    return pd.DataFrame(rows)


def contributions_section(lh: Lakehouse, day: DataFrame, run_date: dt.date, out: Path) -> tuple[str, list[str]]:
    summ = contribution_summary(day, lh.read("queries") if lh.exists("queries") else None)
    if summ.empty:
        return "_no ranking scores for this date_", []
    piv = summ.pivot_table(index="query_kind", columns="modality", values="share").reindex(
        columns=list(PRODUCT_MODALITIES))
    fig, ax = plt().subplots(figsize=(6, 4))
    piv.plot.bar(ax=ax, stacked=True, rot=0, color=list(COLOURS))
    ax.set_ylabel("share of mean |contribution|")
    ax.set_title(f"modality contributions {run_date}")
    save(fig, out / "modality_contributions.png")
    note = ("Contribution of modality m = score(all present modalities) - score(m masked) (occlusion); "
            "0 where the product has no m.\n\n")
    return note + md_table(summ), ["modality_contributions.png"]


def promotion_section(lh: Lakehouse, run_date: dt.date) -> str:
    """The promote stage's decision for the date (champion / challenger and why) and the registry's versions."""
    rows = lh.read("runs").where(_on(run_date)).where(F.col("stage") == "promote").collect()
    if not rows:
        return "_the promote stage did not run for this date_"
    r = rows[0]
    text = f"Status `{r['status']}`; scoring uses `{r['model_version'] or 'the latest artifact'}`.\n\n{r['message']}"
    from mmrank import tracking

    tr = tracking.tracker(lh)
    if tr is not None and tracking.store_exists(lh):
        text += "\n\nRegistered versions (MLflow):\n\n" + md_table(tr.versions_frame())
    return text


def write_nightly(lh: Lakehouse, run_date: dt.date) -> Path:
    """Write `<reports_dir>/<run_date>/nightly_report.md` with its PNG plots; returns the Markdown path."""
    out = lh.paths.reports(run_date)
    out.mkdir(parents=True, exist_ok=True)
    day = lh.read("ranking_scores").where(_on(run_date)).persist()
    parts = [f"# mmrank nightly report {run_date}", "",
             f"Scores table: `{lh.location('ranking_scores')}` (run_date = {run_date}); "
             f"metrics: `{lh.location('metrics')}`.", ""]

    def add(title: str, body: str, images: list[str]) -> None:
        parts.extend([f"## {title}", "", body, ""])
        parts.extend(f"![{Path(i).stem}]({i})\n" for i in images)

    add("Pipeline runs", runs_section(lh, run_date), [])
    add("Model promotion", promotion_section(lh, run_date), [])
    add("Metrics per model and modality", *metrics_section(lh, run_date, out))
    add("Metric trend across runs", *trend_section(lh, run_date, out))
    try:
        add("Score distributions", *scores_section(day, run_date, out))
        add("Modality contributions", *contributions_section(lh, day, run_date, out))
    finally:
        day.unpersist()
    path = out / NIGHTLY_FILE
    path.write_text("\n".join(parts))
    log.info("nightly report written to %s", path)
    return path
