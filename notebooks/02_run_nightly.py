# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: run the nightly stages interactively
# MAGIC Runs the nightly pipeline (or a subset of its stages) for one run date, exactly as `jobs/nightly.py`
# MAGIC does: stages that already succeeded for the date are skipped unless `rerun` or `from_stage` says so.
# MAGIC Progress is printed per stage; the runs table records every stage.
# MAGIC
# MAGIC Widgets: `conf`, `overrides`, `run_date`, `stages` (comma list or `all`), `from_stage`, `rerun`,
# MAGIC `force_train` (`true`/`false`).

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
STAGES = param("stages", "all", "stages (comma list or all)")
FROM_STAGE = param("from_stage", "", "force from this stage") or None
RERUN = param("rerun", "false", "rerun all (true/false)").lower() == "true"
FORCE_TRAIN = param("force_train", "false", "force training (true/false)").lower() == "true"

# COMMAND ----------

from mmrank.interactive import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Status before

# COMMAND ----------

from mmrank import nightly
from mmrank.interactive import stage_table

display(stage_table(lh, RUN_DATE))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Run

# COMMAND ----------

opts = nightly.NightlyOptions(rerun=RERUN, from_stage=FROM_STAGE, force_train=FORCE_TRAIN)
result = nightly.run_nightly(lh, RUN_DATE, opts, steps=nightly.select_steps(STAGES))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Status after, and where the outputs are

# COMMAND ----------

display(stage_table(lh, RUN_DATE))
print(result.summary())
