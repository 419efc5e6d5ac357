"""The Home Depot relevance file (`../shared/data/homedepot/judgments.csv`) as bring-your-own input files.

`judgments.csv` holds `product_uid, product_title, search_term, relevance` (relevance = mean of raters on
1 = irrelevant .. 3 = exactly relevant). `byo_files` writes the two files `jobs/ingest.py --source byo` takes:
a catalog (`product_id, title`: the distinct products) and judgments (`query, product_id, grade`), to be
ingested with the grade scale said: `--grade-scale 1,3` (`HOMEDEPOT_SCALE`), so 1 maps to 0 (irrelevant).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

HOMEDEPOT_SCALE = (1.0, 3.0)
JUDGMENTS_FILE = "judgments.csv"


def available(data_dir: str | Path) -> bool:
    return (Path(data_dir) / JUDGMENTS_FILE).exists()


def byo_files(data_dir: str | Path, out_dir: str | Path, max_queries: int | None = None,
              seed: int = 0) -> tuple[Path, Path]:
    """Write `catalog.csv` and `judgments.csv` for BYO ingestion under `out_dir`; returns their paths.

    `max_queries`: keep only a seeded sample of that many search terms (and the products they judge), for
    tests. Raises FileNotFoundError naming the file when the data set is absent.
    """
    src = Path(data_dir) / JUDGMENTS_FILE
    if not src.exists():
        raise FileNotFoundError(f"no Home Depot judgments at {src}")
    df = pd.read_csv(src, dtype={"product_uid": str}, encoding="utf-8")
    if max_queries is not None:
        terms = pd.Series(df["search_term"].unique())
        keep = set(terms.sample(n=min(max_queries, len(terms)), random_state=seed))
        df = df[df["search_term"].isin(keep)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalog, judgments = out / "catalog.csv", out / "judgments.csv"
    (df[["product_uid", "product_title"]].drop_duplicates("product_uid")
     .rename(columns={"product_uid": "product_id", "product_title": "title"})
     .to_csv(catalog, index=False))
    (df.rename(columns={"search_term": "query", "product_uid": "product_id", "relevance": "grade"})
     [["query", "product_id", "grade"]].to_csv(judgments, index=False))
    return catalog, judgments
