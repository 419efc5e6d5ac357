"""The Databricks notebooks (issue #7) run, cell by cell, against a local lakehouse.

`dbutils`, `display` and `spark` are globals that only a Databricks notebook provides; the shims below stand
in for them (widgets with preset values, a `display` that records what it was given, the suite's local
SparkSession). Everything else the notebooks do goes through the mmrank library.
"""
from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pyspark.sql import Row

from mmrank.scoring.scorer import QUANT_SUFFIX
from mmrank.stages import score
from mmrank.lakehouse import Lakehouse
from tests.conftest import make_config
from tests.test_score import D1, build_inputs

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SEP = "# COMMAND ----------"


def code_cells(path: Path) -> list[str]:
    text = path.read_text()
    assert text.startswith("# Databricks notebook source\n"), f"{path.name}: not in Databricks source format"
    cells = [c.strip("\n") for c in text[len("# Databricks notebook source\n"):].split(SEP)]
    return [c for c in cells if c.strip() and not all(ln.startswith("# MAGIC") for ln in c.splitlines() if ln)]


class Widgets:
    """dbutils.widgets stand-in: `text` registers a default unless a value was preset; `get` returns it."""

    def __init__(self, preset: dict[str, str]):
        self.values = dict(preset)

    def text(self, name, default, label=None):
        self.values.setdefault(name, default)

    dropdown = combobox = lambda self, name, default, choices=None, label=None: self.text(name, default)

    def get(self, name):
        return self.values[name]


def run_notebook(name: str, spark, widgets: dict[str, str]) -> dict:
    shown: list = []
    ns = {"__name__": "__notebook__", "spark": spark, "display": shown.append,
          "dbutils": SimpleNamespace(widgets=Widgets(widgets))}
    for i, cell in enumerate(code_cells(NOTEBOOKS / name)):
        exec(compile(cell, f"{name}[cell {i}]", "exec"), ns)
    ns["_shown"] = shown
    return ns


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def nb_lh(spark, tmp_path):
    cfg = make_config(tmp_path, "score.top_n=5", "score.similarity_top_k=5", "score.candidates=impressions")
    lh = Lakehouse(spark, cfg)
    build_inputs(lh, n_products=20, n_queries=4)
    score.run(lh, D1)
    prows = [Row(product_id=f"p{i:03d}", title=f"product {i}", description="", brand="b", category="c",
                 attributes={}, image_uri=None, image_bytes=_png((10 * i, 80, 200)), image_hash=None,
                 audio_uri=None, audio_bytes=None, audio_hash=None, source="test", content_hash=str(i), run_date=D1,
                 ingested_at=dt.datetime(2026, 11, 20)) for i in range(20)]
    lh.overwrite("products", spark.createDataFrame(prows, lh.read("products").schema))
    overrides = ";".join(f"storage.{k}={getattr(cfg.storage, k)}"
                         for k in ("root", "raw_dir", "artifacts_dir", "reports_dir", "work_dir"))
    return lh, {"conf": "", "overrides": overrides, "run_date": D1.isoformat()}


def test_notebooks_are_in_source_format():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert names == ["01_explore_tables.py", "02_run_nightly.py", "03_inspect_query.py", "04_compare_models.py"]
    for n in names:
        assert len(code_cells(NOTEBOOKS / n)) >= 3
        assert "# MAGIC %md" in (NOTEBOOKS / n).read_text()


def test_notebooks_run_against_local_lakehouse(spark, nb_lh):
    lh, w = nb_lh
    ns = run_notebook("01_explore_tables.py", spark, {**w, "table": "ranking_scores"})
    sizes = ns["sizes"].set_index("table")
    assert sizes.loc["ranking_scores", "rows"] > 0 and ns["_shown"]

    ns = run_notebook("02_run_nightly.py", spark, {**w, "stages": "report"})
    assert ns["result"].ran == ["report"]
    assert Path(ns["result"].report_path).exists()

    ns = run_notebook("03_inspect_query.py", spark, {**w, "query_id": "", "top_n": "5"})
    assert len(ns["ranking"]) == 5 and list(ns["ranking"]["rank"]) == [1, 2, 3, 4, 5]
    assert ns["ranking"]["image_bytes"].notna().all()
    assert any(hasattr(x, "savefig") for x in ns["_shown"])  # the image + contribution figure

    ns = run_notebook("04_compare_models.py", spark, {**w, "versions": "", "max_queries": "3", "k": "3"})
    assert list(ns["registered"].columns) == ["version", "artifact_version", "aliases", "run_id", "gate"]
    cmp = ns["_shown"][-1]
    assert cmp["version_b"].iloc[0].endswith(QUANT_SUFFIX) and cmp["spearman"].iloc[0] > 0.9
