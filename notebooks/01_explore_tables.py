# Databricks notebook source
# MAGIC %md
# MAGIC # mmrank: explore the tables
# MAGIC The Delta tables of one mmrank deployment, their contracts (schema, keys, partitioning) and row counts,
# MAGIC the Delta history of a table, and the pipeline runs of a date. Everything here calls the library.
# MAGIC
# MAGIC Widgets: `conf` (config file, e.g. `conf/databricks.yaml`), `overrides` (`key=value` separated by `;`),
# MAGIC `run_date`, `table`.

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
TABLE = param("table", "ranking_scores", "table")

# COMMAND ----------

from mmrank.nightly import open_lakehouse

lh = open_lakehouse(CONF or None, [o.strip() for o in OVERRIDES.split(";")])
print("tables under", lh.location("runs").rsplit("/", 1)[0] if lh.root else lh.location("runs").rsplit(".", 1)[0])

# COMMAND ----------

# MAGIC %md
# MAGIC ## Table contracts and sizes

# COMMAND ----------

from mmrank import report
from mmrank.tables import contracts_markdown

print(contracts_markdown())
sizes = report.table_overview(lh)
display(sizes)

# COMMAND ----------

# MAGIC %md
# MAGIC ## One table: schema, sample rows, Delta history

# COMMAND ----------

df = lh.read(TABLE)
df.printSchema()
display(df.limit(20))
display(report.table_history(lh, TABLE, 10))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Pipeline runs of the date

# COMMAND ----------

from mmrank.nightly import stage_table

display(stage_table(lh, RUN_DATE))
