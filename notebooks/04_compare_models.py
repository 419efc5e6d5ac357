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

# MAGIC %md
# MAGIC Install mmrank on the cluster for this notebook: the project root (`..`, where the bundle syncs
# MAGIC `pyproject.toml`); a job task gets the wheel from the bundle instead.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

# MAGIC %restart_python

# COMMAND ----------

# Parameters: Databricks widgets; locally (no dbutils) the defaults, or MMRANK_* environment variables.
from mmrank.interactive import NotebookParams

P = NotebookParams(globals())
display, param = P.display, P.text
CONF, OVERRIDES, RUN_DATE = P.common()
VERSIONS = param("versions", "", "model versions (comma list)")
MAX_QUERIES = int(param("max_queries", "50", "queries sampled"))
K = int(param("k", "10", "top-k for overlap"))

# COMMAND ----------

from mmrank.interactive import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Metrics per model version across runs

# COMMAND ----------

from mmrank import interactive
from mmrank.ranker.artifact import list_versions
from mmrank.scoring.scorer import QUANT_SUFFIX

display(interactive.metrics_by_version(lh))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Ranking agreement between versions

# COMMAND ----------

available = list_versions(lh.paths.artifacts)
print("available model versions:", available)
versions = [v.strip() for v in VERSIONS.split(",") if v.strip()] or (
    available[-2:] if len(available) >= 2 else [available[-1], available[-1] + QUANT_SUFFIX])
scores = interactive.score_versions_local(lh, RUN_DATE, versions, max_queries=MAX_QUERIES)
display(interactive.compare_rankings(scores, k=K))
