# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: compare model versions
# MAGIC Evaluation metrics per model version across nightly runs (`metrics` table), and how differently two
# MAGIC or more versions (optionally int8-quantized: `<version>+int8`) rank the same candidates: top-k overlap
# MAGIC and Spearman correlation per query, on a sample of queries scored on the driver.
# MAGIC
# MAGIC Widgets: `conf`, `overrides`, `run_date`, `versions` (comma list; empty = the two latest, or the
# MAGIC latest and its int8 version), `max_queries`, `k`.

# COMMAND ----------

# Parameters: Databricks widgets; locally (no dbutils) the defaults below, or MMRANK_* environment variables.
import datetime as dt
import os

try:
    dbutils  # noqa: F821  (a Databricks global)
except NameError:
    dbutils = None

try:
    display  # noqa: F821  (a Databricks global)
except NameError:
    def display(obj):  # local fallback: print a preview
        print(obj.limit(20).toPandas() if hasattr(obj, "toPandas") else obj)


def param(name, default, label=None):
    if dbutils is not None:
        dbutils.widgets.text(name, default, label or name)
        return dbutils.widgets.get(name)
    return os.environ.get(f"MMRANK_{name.upper()}", default)

CONF = param("conf", "", "config file")
OVERRIDES = param("overrides", "", "overrides k=v;k=v")
RUN_DATE = dt.date.fromisoformat(param("run_date", dt.date.today().isoformat(), "run date"))
VERSIONS = param("versions", "", "model versions (comma list)")
MAX_QUERIES = int(param("max_queries", "50", "queries sampled"))
K = int(param("k", "10", "top-k for overlap"))

# COMMAND ----------

from mmrank.nightly import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Metrics per model version across runs

# COMMAND ----------

from mmrank import report, score

display(report.metrics_by_version(lh))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Ranking agreement between versions

# COMMAND ----------

available = score.available_versions(lh)
print("available model versions:", available)
versions = [v.strip() for v in VERSIONS.split(",") if v.strip()] or (
    available[-2:] if len(available) >= 2 else [available[-1], available[-1] + score.QUANT_SUFFIX])
scores = score.score_versions_local(lh, RUN_DATE, versions, max_queries=MAX_QUERIES)
display(report.compare_rankings(scores, k=K))
