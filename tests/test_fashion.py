"""The real fashion catalog (skipped when ../shared/data/fashion is absent): products and protocol judgments."""
from __future__ import annotations

import datetime as dt
import io

import pytest
from PIL import Image

from conftest import FASHION_DIR, make_config
from mmrank.stages import ingest
from mmrank.data.fashion import SOURCE
from mmrank.lakehouse import Lakehouse

pytestmark = [pytest.mark.fashion,
              pytest.mark.skipif(not (FASHION_DIR / "styles.csv").exists(),
                                 reason=f"fashion catalog not present at {FASHION_DIR}")]
RUN_DATE = dt.date(2026, 11, 21)
LIMIT = 200


def _norm(p: dict) -> dict:
    return {k: (v or "").strip().lower() for k, v in (p["attributes"] or {}).items()}


def _grade(a: dict, q: tuple[str, str, str, str]) -> int:
    """The documented protocol, re-implemented independently from the attributes."""
    g, u, c, t = q
    if a.get("articleType") != t:
        return 0
    m = (a.get("baseColour") == c) + (a.get("gender") in (g, "unisex")) + (a.get("usage") == u)
    return 1 + (m >= 2) + (m == 3)


def test_fashion_subset_ingest_and_protocol(spark, tmp_path):
    cfg = make_config(tmp_path, f"ingest.fashion_dir={FASHION_DIR}", "ingest.fashion_n_queries=8")
    lh = Lakehouse(spark, cfg)
    c = ingest.run(lh, RUN_DATE, source="fashion", limit=LIMIT)
    assert c["products_read"] == LIMIT == c["products_valid"] + c["products_quarantined"]
    prods = {r["product_id"]: r.asDict() for r in lh.read("products").collect()}
    assert len(prods) == c["products_valid"] and all(p.startswith("fashion-") for p in prods)
    some = next(iter(prods.values()))
    assert Image.open(io.BytesIO(some["image_bytes"])).size[0] > 0 and some["image_uri"].endswith(".jpg")
    queries = lh.read("queries").where(f"source = '{SOURCE}'").toPandas()
    assert 0 < len(queries) <= 8 and (queries["kind"] == "typed").all()
    judg = lh.read("judgments").where(f"source = '{SOURCE}'").toPandas()
    assert set(judg["query_id"]) == set(queries["query_id"])
    assert (judg.groupby("query_id")["grade"].max() == 3).all()  # min_support exact matches exist
    attrs = {pid: _norm(p) for pid, p in prods.items()}
    combos = {" ".join(a.get(k, "") for k in ("gender", "usage", "baseColour", "articleType")):
              tuple(a.get(k, "") for k in ("gender", "usage", "baseColour", "articleType")) for a in attrs.values()}
    for q in queries.itertuples():
        for r in judg[judg["query_id"] == q.query_id].itertuples():
            assert r.grade == _grade(attrs[r.product_id], combos[q.query_text]), (q.query_text, r.product_id)
    again = ingest.run(lh, RUN_DATE, source="fashion", limit=LIMIT)
    assert again["products_changed"] == 0 and again["queries_changed"] == 0
