"""Media bytes read where they live: encoder tasks get references to a source table's Parquet files and read
the bytes of the items they encode with pyarrow, instead of receiving them from the JVM.

Why: an image or a clip is 20-50 KB. Joined onto the rows to encode and shipped JVM -> Arrow -> Python, every
byte is read by the JVM scan, shuffled (written and read again) and copied into Python: ~0.1 ms of a core per
32 KB clip, ~15% of the audio encoder's own cost. Instead (`with_refs`):

1. The JVM scan of the source table reads the key and `_metadata` only (Parquet projection skips the bytes):
   each row to encode gets its data file and Spark split (`media_file`, `media_start`, `media_length`: the
   128 MB-sized ranges Spark's own scan tasks read).
2. The rows are partitioned one split per task (`partitions.one_partition_per_value`): the tasks are Spark's
   own scan tasks, balanced as a scan is, and every split is read by one task.
3. The task gathers its rows' references (small: ids and paths) as they arrive, then streams its split's row
   groups (parquet-mr's rule: a row group belongs to the split that holds its midpoint) with pyarrow, the key
   and bytes columns only, a few hundred rows at a time, and hands each batch's wanted items to the encoder
   (`read_items`): the split is never held whole and the bytes are still in cache when decoded. A key not
   found there (a writer that placed row groups differently) is looked up in the rest of the file.

Only for tables whose files can be read as plain Parquet (`Lakehouse.parquet_readable`: no deletion vectors
or column mapping); otherwise the bytes travel through Spark as before.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import unquote

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mmrank import storage

log = logging.getLogger("mmrank.media")

REF_COLUMNS = ("media_file", "media_start", "media_length")
STREAM_BUFFER = 1 << 20  # bytes read from a data file at a time (pyarrow's buffered stream: pages, not chunks)


def with_refs(keys: DataFrame, table: DataFrame, key: str) -> DataFrame:
    """`keys` (with an `id` column) joined with where each id's row lives in `table` (a Delta read):
    `media_file`, `media_start`, `media_length` (its data file and Spark split). Reads no bytes."""
    refs = table.select(F.col(key).alias("id"), F.col("_metadata.file_path").alias("media_file"),
                        F.col("_metadata.file_block_start").alias("media_start"),
                        F.col("_metadata.file_block_length").alias("media_length"))
    return keys.join(refs, "id")


def split_of(ref: DataFrame) -> F.Column:
    """One string per (file, split): the value each task gets exactly one of."""
    return F.concat_ws("|", ref["media_file"], ref["media_start"].cast("string"))


def split_row_groups(meta, start: int, length: int) -> list[int]:
    """The row groups of a Parquet file (pyarrow `FileMetaData`) that Spark's split [start, start + length)
    reads: those whose midpoint (first page offset + compressed size / 2) lies in it (parquet-mr's rule)."""
    out = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        cols = [rg.column(j) for j in range(rg.num_columns)]
        first = cols[0].dictionary_page_offset if cols[0].has_dictionary_page else cols[0].data_page_offset
        if start <= first + sum(c.total_compressed_size for c in cols) // 2 < start + length:
            out.append(i)
    return out


def read_items(refs: pd.DataFrame, key: str, data: str, batch_rows: int) -> Iterator[tuple[pd.DataFrame, list]]:
    """The bytes of `data` for the rows of `refs` (`id` + REF_COLUMNS), streamed: each (file, split) has its row
    groups read `batch_rows` rows at a time, and each batch read yields (the rows of `refs` whose id equals a
    `key` in it, their bytes in the same order). A task never holds a split whole: ~`batch_rows` items plus a
    read buffer (STREAM_BUFFER), and the encoder gets bytes still in cache. An id missing from its split's row
    groups is looked up in the rest of the file (warning); an id not in the file raises FileNotFoundError."""
    import pyarrow.parquet as pq

    for (path, start, length), part in refs.groupby(list(REF_COLUMNS), sort=False):
        wanted: dict = {}
        for pos, i in enumerate(part["id"].tolist()):
            wanted.setdefault(i, []).append(pos)
        fs, p = arrow_filesystem(unquote(path))  # _metadata.file_path is URL-encoded
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f, buffer_size=STREAM_BUFFER)
            groups = split_row_groups(pf.metadata, int(start), int(length))
            yield from _picked(pf, groups, part, wanted, key, data, batch_rows)
            if wanted:
                log.warning("%s: keys not in the row groups of split %d+%d; reading the whole file", path, start,
                            length)
                rest = sorted(set(range(pf.metadata.num_row_groups)) - set(groups))
                yield from _picked(pf, rest, part, wanted, key, data, batch_rows)
        if wanted:
            raise FileNotFoundError(f"{path}: no row for {len(wanted)} key(s) (e.g. {sorted(wanted)[0]!r}); the "
                                    "file changed or was removed while the job ran")


def _picked(pf, groups: list[int], part: pd.DataFrame, wanted: dict, key: str, data: str,
            batch_rows: int) -> Iterator[tuple[pd.DataFrame, list]]:
    """(rows of `part`, their bytes) of each batch of `groups` that holds wanted keys; found keys leave `wanted`
    (no row groups, no batches)."""
    for batch in pf.iter_batches(batch_rows, row_groups=groups, columns=[key, data], use_threads=False):
        hits = [(j, pos) for j, k in enumerate(batch.column(0).to_pylist()) for pos in wanted.pop(k, ())]
        if hits:
            values = batch.column(1)
            yield part.iloc[[pos for _, pos in hits]], [values[j].as_py() for j, _ in hits]


def arrow_filesystem(path: str):
    """(pyarrow file system, path inside it) of a data file: pyarrow's own for local files, the
    configured fsspec one (`storage.filesystem`) wrapped for remote stores."""
    from pyarrow import fs as pafs

    local = storage.local_path(path)
    if local is not None:
        return pafs.LocalFileSystem(), local
    fs, p = storage.filesystem(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p
