# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: compare model versions
# MAGIC The MLflow side first: training runs (per-epoch validation metrics, data versions) and the registered
# MAGIC model's versions with their aliases (`champion` serves, `challenger` waits) and gate decisions. Then the
# MAGIC evaluation metrics per model version across nightly runs (`metrics` table), and how differently two or
# MAGIC more versions (optionally int8-quantized: `<version>+int8`) rank the same candidates: top-k overlap and
# MAGIC Spearman correlation per query, on a sample of queries scored on the driver.
# MAGIC
# MAGIC Widgets: `conf`, `overrides`, `run_date`, `versions` (comma list of artifact versions; empty = champion
# MAGIC and challenger, else the two latest, or the latest and its int8 version), `max_queries`, `k`.

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
# MAGIC ## MLflow: training runs and registered versions

# COMMAND ----------

from mmrank import tracking

tr = tracking.tracker(lh)
registered = tr.versions_frame() if tr is not None else None
if tr is None:
    print("tracking.enabled is false: no MLflow runs or registry")
else:
    print("tracking:", tr.tracking_uri, "| registry:", tr.registry_uri, "| model:", tr.model_name)
    display(tr.runs_frame("train"))
    display(registered)

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
aliased = [r.artifact_version for r in (tr.alias(tracking.CHAMPION), tr.alias(tracking.CHALLENGER))
           if r is not None] if tr is not None else []
versions = [v.strip() for v in VERSIONS.split(",") if v.strip()] or (
    aliased if len(aliased) == 2 else available[-2:] if len(available) >= 2
    else [available[-1], available[-1] + QUANT_SUFFIX])
print("comparing", versions)
scores = interactive.score_versions_local(lh, RUN_DATE, versions, max_queries=MAX_QUERIES)
display(interactive.compare_rankings(scores, k=K))
