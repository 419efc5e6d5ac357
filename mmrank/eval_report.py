"""Evaluation report files: metrics JSON, a Markdown model x metric table and a PNG bar plot."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

PLOT_METRICS = ("ndcg", "map", "mrr")  # bounded in [0, 1]; DCG is in the table only


def metric_label(metric: str, k: int | None) -> str:
    return f"{metric}@{int(k)}" if k is not None and not pd.isna(k) else metric


def wide_table(rows: pd.DataFrame) -> pd.DataFrame:
    """model_name x metric label table of values (rows in input order)."""
    df = rows.assign(label=[metric_label(m, k) for m, k in zip(rows["metric"], rows["k"])])
    order = list(dict.fromkeys(df["model_name"]))
    cols = list(dict.fromkeys(df["label"]))
    return df.pivot(index="model_name", columns="label", values="value").loc[order, cols]


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    head = "| model | " + " | ".join(table.columns) + " |"
    sep = "|---|" + "---:|" * len(table.columns)
    body = ["| " + name + " | " + " | ".join("n/a" if pd.isna(v) else f"{v:.{digits}f}" for v in row) + " |"
            for name, row in table.iterrows()]
    return "\n".join([head, sep, *body])


def bar_plot(tables: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """One grouped bar panel (models x bounded metrics) per evaluation target (split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_models = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6, 1.3 * n_models), 4 * len(tables)), squeeze=False)
    for ax, (split, table) in zip(axes[:, 0], tables.items()):
        cols = [c for c in table.columns if c.split("@")[0] in PLOT_METRICS]
        table[cols].plot.bar(ax=ax, ylim=(0, 1), rot=30)
        ax.set_title(f"{title} ({split})")
        ax.set_ylabel("value")
        ax.set_xlabel("")
        ax.legend(ncol=len(cols), fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, dataset: str, rows: pd.DataFrame, meta: dict) -> dict[str, Path]:
    """Write `metrics_<dataset>.json`, `evaluation_<dataset>.md` and `.png` into `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{'metrics' if ext == 'json' else 'evaluation'}_{dataset}.{ext}"
             for ext in ("json", "md", "png")}
    records = rows.astype(object).where(rows.notna(), None).to_dict("records")
    paths["json"].write_text(json.dumps({"meta": meta, "metrics": records}, indent=1, default=str))
    tables = {split: wide_table(part) for split, part in rows.groupby("split", sort=False)}
    bar_plot(tables, paths["png"], f"{dataset}: metrics per model")
    notes = "\n".join(f"- {n}" for n in meta.get("notes", []))
    sections = "\n\n".join(f"## {split}\n\n{markdown_table(t)}" for split, t in tables.items())
    paths["md"].write_text(
        f"# Evaluation: {dataset} ({meta.get('run_date')})\n\n"
        f"Test split: {meta.get('test_lists')} query lists; seed {meta.get('seed')}; "
        f"lists without a relevant item: `{meta.get('no_relevant')}`. `test` = grades from `labels`; "
        f"`test_judgments` (if present) = the same lists graded by `judgments`.\n\n"
        f"{sections}\n\n![metrics]({paths['png'].name})\n\n{notes}\n")
    return paths
