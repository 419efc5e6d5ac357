"""Exact partitioning: one Spark partition per distinct value of a column, nothing else in it."""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def one_partition_per_value(df: DataFrame, col: str) -> DataFrame:
    """`df` with one partition per distinct value of `col` (a scoring cell, a file split), holding exactly
    that value's rows. A range repartition can put two values in one task (which then reads two buckets or
    splits while another task idles) and a hash repartition of few values collides. Instead the present values
    are listed (one pass, as a range repartition's sampling; as many rows reach the driver as values, not rows)
    and each gets a surrogate key that Spark's hash partitioning (pmod(murmur3(key), n)) sends to a partition
    of its own, found with one small job over integers."""
    values = sorted(r[0] for r in df.select(col).distinct().collect() if r[0] is not None)
    if not values:
        return df.repartition(1)
    spark, n, found, lo = df.sparkSession, len(values), {}, 0
    while len(found) < n:
        ids = spark.range(lo, lo + 64 * n).select("id", F.pmod(F.hash("id"), F.lit(n)).alias("p"))
        for p, k in ids.groupBy("p").agg(F.min("id")).collect():
            found.setdefault(int(p), int(k))
        lo += 64 * n
    key = F.create_map(*[F.lit(x) for i, v in enumerate(values) for x in (v, found[i])])[F.col(col)].cast("long")
    return df.withColumn("_part", key).repartition(n, "_part").drop("_part")
