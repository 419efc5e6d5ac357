# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: explore the tables
# MAGIC The Delta tables of one mmrank deployment, their contracts (schema, keys, partitioning) and row counts,
# MAGIC the Delta history of a table, and the pipeline runs of a date. Everything here calls the library.
# MAGIC
# MAGIC Widgets: `conf` (config file, e.g. `conf/databricks.yaml`), `overrides` (`key=value` separated by `;`),
# MAGIC `run_date`, `table`.

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
TABLE = param("table", "ranking_scores", "table")

# COMMAND ----------

from mmrank.interactive import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Table contracts and sizes

# COMMAND ----------

from mmrank import interactive
from mmrank.tables import contracts_markdown

print(contracts_markdown())
sizes = interactive.table_overview(lh)
display(sizes)

# COMMAND ----------

# MAGIC %md
# MAGIC ## One table: schema, sample rows, Delta history

# COMMAND ----------

df = lh.read(TABLE)
df.printSchema()
display(df.limit(20))
display(interactive.table_history(lh, TABLE, 10))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Pipeline runs of the date

# COMMAND ----------

from mmrank.interactive import stage_table

display(stage_table(lh, RUN_DATE))
