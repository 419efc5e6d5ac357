"""Id buckets: `crc32(UTF-8 id) mod n`, the same number in Spark (`bucket_of`) and in Python (`bucket_ids`).

The feature tables are stored partitioned by `bucket = crc32(id) mod FEATURE_BUCKETS` (`mmrank.tables`), so a
task that needs the features of some ids reads only their buckets' files. FEATURE_BUCKETS is a power of two:
for any power of two g <= FEATURE_BUCKETS, `crc32 mod g` = `(crc32 mod FEATURE_BUCKETS) mod g`, so readers can
take the stored buckets in groups of FEATURE_BUCKETS / g without re-bucketing anything.
"""
from __future__ import annotations

import zlib

import numpy as np
from pyspark.sql import Column
from pyspark.sql import functions as F

FEATURE_BUCKETS = 64  # part of the feature tables' layout: changing it means rewriting both tables
BUCKET_COLUMN = "bucket"


def bucket_of(col: str | Column, n: int) -> Column:
    """The bucket (0..n-1) of an id column: crc32 of its UTF-8 bytes mod n (= `bucket_ids` in Python)."""
    c = F.col(col) if isinstance(col, str) else col
    return F.pmod(F.crc32(c.cast("binary")), F.lit(int(n))).cast("int")


def bucket_ids(ids, n: int) -> np.ndarray:
    """`bucket_of` in Python: crc32(utf-8 id) mod n for each id."""
    return np.fromiter((zlib.crc32(str(i).encode("utf-8")) % n for i in ids), np.int64, count=len(ids))
