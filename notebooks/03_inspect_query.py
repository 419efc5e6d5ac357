# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: inspect one query's ranking
# MAGIC The top products the nightly run stored in `ranking_scores` for one query, with their images and the
# MAGIC per-modality contributions (occlusion: score with all modalities minus score with that modality masked).
# MAGIC
# MAGIC Widgets: `conf`, `overrides`, `run_date`, `query_id` (empty = the first scored query), `top_n`.

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
QUERY_ID = param("query_id", "", "query id")
TOP_N = int(param("top_n", "10", "products shown"))

# COMMAND ----------

from mmrank.interactive import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

from mmrank import interactive

QUERY_ID = QUERY_ID or interactive.first_scored_query(lh, RUN_DATE)
ranking = interactive.query_ranking(lh, RUN_DATE, QUERY_ID, n=TOP_N)
display(ranking.drop(columns=["image_bytes"]))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Images and modality contributions

# COMMAND ----------

fig = interactive.plot_query_ranking(ranking, title=f"{QUERY_ID}: {interactive.query_text(lh, QUERY_ID)} ({RUN_DATE})")
display(fig)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Contribution summary of the whole run date

# COMMAND ----------

display(interactive.contribution_table(lh, RUN_DATE))
