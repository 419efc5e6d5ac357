"""How `training_lists` rows reach each training process, as batches of the tensor contract.

The driver prepares a picklable `LoaderSpec` per split (`prepare_specs`); every rank builds its loader with
`make_loader(spec, rank, world_size)` and calls `epoch_batches(epoch)`. Two interchangeable data paths:

- `petastorm`: the split's DataFrame is materialised once by `petastorm.spark.make_spark_converter` into the
  cache dir `lh.paths.petastorm_cache_url()` (`petastorm.spark.converter.parentCacheDirUrl`: a `file://` URL
  or an object-store URI; on a cluster it must be shared storage every executor reads);
  rank r reads shard r (`cur_shard=r, shard_count=world_size`) with `make_torch_dataloader(num_epochs=1)`.
  The cache is deleted (`converter.delete()`) when `prepare_specs` exits, also on failure.
- `parquet`: no petastorm. The driver resolves the Delta snapshot's current Parquet files
  (`DataFrame.inputFiles()`) and the split's row count per row group; rank r reads its contiguous slice of
  the split's rows directly with pyarrow, through the file-system layer (`mmrank.storage`: local or object
  store). Refuses tables whose files hold rows the snapshot does not
  (deletion vectors), detected by a row-count check.

Memory stays bounded by `train.shuffle_buffer` (lists), whatever the split's size. A rank whose shard holds
at most that many lists reads it once and keeps it: each epoch it is ordered by a stable key, shuffled (train
split) with a generator seeded by (seed, epoch, rank) and cut into `spec.steps` batches. A larger shard is
streamed every epoch: its pieces (Parquet row groups; petastorm's row groups) in an order seeded by (seed,
epoch, rank), through a shuffle buffer of `shuffle_buffer` lists from which each batch is drawn at random.
Either way every rank yields exactly `spec.steps` batches, so collective ops (DDP, Horovod) never wait on a
rank that ran out of data. `train.batch_size` is the global batch size: each rank gets
ceil(batch_size / world_size).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol
from urllib.parse import unquote

import numpy as np

from mmrank.config import TrainConf
from mmrank.lakehouse import Lakehouse
from mmrank.lexical import N_LEX
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import BATCH_KEYS, Batch, rows_to_batch
from mmrank.registry import LOADERS

log = logging.getLogger("mmrank")

# Stable per-row key: query_id (parquet) or xxhash64(query_id) (petastorm cannot carry strings to torch).
KEY_COL = "row_key"
ARRAY_COLS = BATCH_KEYS  # grades, q_*, p_*: the flattened contract arrays, same names as the table columns
_READ_CHUNK = 256        # rows per petastorm read batch (only affects read granularity)


class ListLoader(Protocol):
    """One rank's view of one split."""

    num_batches: int

    def epoch_batches(self, epoch: int) -> Iterable[Batch]: ...


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a rank needs to load one split; picklable (shipped to Spark tasks / torchrun workers)."""

    kind: str                   # petastorm | parquet
    split: str
    dims: ModalityDims
    list_size: int
    batch_size: int             # per rank
    steps: int                  # batches per epoch, identical on every rank
    num_rows: int               # rows of the split, all ranks together
    world_size: int
    seed: int
    shuffle: bool
    buffer_rows: int = 2048                # lists a rank holds in memory (train.shuffle_buffer)
    pieces: tuple[tuple[str, int, int], ...] = ()  # parquet: (snapshot file, row group, rows of `split`), fixed order
    converter: Any = field(default=None, compare=False)  # petastorm: SparkDatasetConverter


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(global_batch_size / world_size))


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced [lo, hi) slice of `num_rows` for `rank` (sizes differ by at most one)."""
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


class _ShardLoader:
    """Shared epoch logic: hold a small shard, stream a large one; `spec.steps` batches per epoch either way."""

    def __init__(self, spec: LoaderSpec, rank: int, world_size: int):
        if world_size != spec.world_size:
            raise ValueError(f"spec prepared for {spec.world_size} ranks, used with {world_size}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.num_batches = spec.steps
        self._rows: dict[str, np.ndarray] | None = None
        self.peak_buffered = 0  # most lists this loader held at once (streaming), for tests and logs

    def shard_size(self) -> int:
        """Lists in this rank's shard."""
        raise NotImplementedError

    def read_blocks(self, order_seed: int | None) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows as column blocks (`KEY_COL` + contract arrays); pieces in a fixed order, or in an
        order drawn from `order_seed`."""
        raise NotImplementedError

    def shard_rows(self) -> dict[str, np.ndarray]:
        """This rank's whole shard ordered by `KEY_COL` (deterministic whatever the read order). Kept when it
        fits `spec.buffer_rows`; a larger shard is read anew on each call (tests, small splits)."""
        if self._rows is not None:
            return self._rows
        rows = _concat(list(self.read_blocks(None)))
        if rows is None:
            raise ValueError(f"rank {self.rank} got no {self.spec.split} rows")
        order = np.argsort(rows[KEY_COL], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        if len(order) <= self.spec.buffer_rows:
            self._rows = rows
        return rows

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        s = self.spec
        rng = np.random.default_rng([s.seed, epoch, self.rank]) if s.shuffle else None
        if self._rows is None and self.shard_size() > s.buffer_rows:
            yield from self._streamed(rng)
            return
        rows = self.shard_rows()
        n = len(rows[KEY_COL])
        idx = np.arange(n) if rng is None else rng.permutation(n)
        for chunk in np.array_split(idx, s.steps):
            if len(chunk) == 0:  # fewer rows than steps on this rank: repeat one row (keeps ranks in step)
                chunk = idx[:1]
            yield self._batch({c: rows[c][chunk] for c in ARRAY_COLS})

    def _batch(self, cols: dict[str, np.ndarray]) -> Batch:
        return rows_to_batch({c: cols[c] for c in ARRAY_COLS}, self.spec.dims, self.spec.list_size)

    def _streamed(self, rng: np.random.Generator | None) -> Iterator[Batch]:
        """One epoch of a shard larger than the buffer: batch sizes as `np.array_split(shard, steps)` gives,
        each batch drawn at random (in order without shuffling) from at most `buffer_rows` buffered lists."""
        s, n = self.spec, self.shard_size()
        q, r = divmod(n, s.steps)
        blocks = iter(self.read_blocks(None if rng is None else int(rng.integers(2 ** 31))))
        pool, have, first = None, 0, None
        for size in [q + 1] * r + [q] * (s.steps - r):
            if size == 0:  # fewer rows than steps on this rank: repeat one row (keeps ranks in step)
                yield self._batch(first)
                continue
            while have < max(s.buffer_rows, size) and (block := next(blocks, None)) is not None:
                pool = _concat([pool, block])
                have = len(pool[KEY_COL])
                self.peak_buffered = max(self.peak_buffered, have)
            if have < size:
                raise RuntimeError(f"rank {self.rank} read fewer {s.split} rows than its shard's {n}")
            take = np.arange(size) if rng is None else rng.choice(have, size, replace=False)
            keep = np.ones(have, bool)
            keep[take] = False
            batch = {c: v[take] for c, v in pool.items()}
            pool, have = {c: v[keep] for c, v in pool.items()}, have - size
            first = first or {c: v[:1] for c, v in batch.items()}
            yield self._batch(batch)
        if have or next(blocks, None) is not None:
            raise RuntimeError(f"rank {self.rank} read more {s.split} rows than its shard's {n}")


def _concat(blocks: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    blocks = [b for b in blocks if b is not None and len(b[KEY_COL])]
    if len(blocks) <= 1:
        return blocks[0] if blocks else None
    return {c: np.concatenate([b[c] for b in blocks]) for c in blocks[0]}


@LOADERS.register("petastorm")
class PetastormLoader(_ShardLoader):
    """Shard `rank` of the petastorm-materialised split (row-group sharding by petastorm)."""

    _size: int | None = None

    def _dataloader(self, **kwargs):
        return self.spec.converter.make_torch_dataloader(
            num_epochs=1, cur_shard=self.rank, shard_count=self.world_size,
            # synchronous reads: petastorm 0.13.1's thread pool can report "no more results" before
            # its ventilator counted the first row group (seen under load: an empty shard)
            reader_pool_type="dummy", **kwargs)

    def shard_size(self) -> int:
        if self._size is None:  # one pass over the key column only
            with self._dataloader(batch_size=4096, schema_fields=[KEY_COL]) as dl:
                self._size = sum(len(b[KEY_COL]) for b in dl)
            if not self._size:
                raise ValueError(f"petastorm shard {self.rank}/{self.world_size} of {self.spec.split} is empty "
                                 f"(files: {self.spec.converter.file_urls})")
        return self._size

    def read_blocks(self, order_seed: int | None) -> Iterator[dict[str, np.ndarray]]:
        with self._dataloader(batch_size=_READ_CHUNK, shuffle_row_groups=order_seed is not None,
                              seed=order_seed) as dl:
            for b in dl:
                yield {k: v.numpy() for k, v in b.items()}


@contextmanager
def _open(uri: str):
    """A Parquet file of the Delta snapshot, local or on an object store (`mmrank.storage.filesystem`)."""
    import pyarrow.parquet as pq

    from mmrank.storage import filesystem

    fs, path = filesystem(unquote(uri))
    with fs.open(path, "rb") as f:
        yield pq.ParquetFile(f)


@LOADERS.register("parquet")
class ParquetLoader(_ShardLoader):
    """Rank `rank`'s contiguous slice of the split's rows, read straight from the Delta snapshot's files."""

    def shard_size(self) -> int:
        lo, hi = shard_bounds(self.spec.num_rows, self.rank, self.world_size)
        return hi - lo

    def _my_pieces(self) -> list[tuple[str, int, int, int]]:
        """(file, row group, first, end) of this rank's slice, counted in each row group's `split` rows."""
        lo, hi = shard_bounds(self.spec.num_rows, self.rank, self.world_size)
        out, start = [], 0
        for path, group, count in self.spec.pieces:
            a, b = max(lo - start, 0), min(hi - start, count)
            if a < b:
                out.append((path, group, a, b))
            start += count
        return out

    def read_blocks(self, order_seed: int | None) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        pieces = self._my_pieces()
        order = range(len(pieces)) if order_seed is None else np.random.default_rng(order_seed).permutation(
            len(pieces))
        for i in order:
            path, group, a, b = pieces[i]
            seen = 0
            with _open(path) as pf:
                for rb in pf.iter_batches(_READ_CHUNK, row_groups=[group],
                                          columns=["query_id", "split", *ARRAY_COLS]):
                    t = pa.Table.from_batches([rb])
                    t = t.filter(pc.equal(t["split"], self.spec.split))
                    lo, hi = max(a - seen, 0), min(b - seen, t.num_rows)
                    seen += t.num_rows
                    if lo < hi:
                        yield _columns(t.slice(lo, hi - lo))
                    if seen >= b:
                        break


def _columns(t) -> dict[str, np.ndarray]:
    """`KEY_COL` + the contract arrays of a pyarrow table, one float32 array (or None) per row. Each row is
    copied out of the Arrow buffers (a view would keep its whole record batch alive while the row waits in the
    shuffle buffer)."""
    out = {c: _object_array([None if v is None else np.array(v, np.float32)
                             for v in t[c].to_numpy(zero_copy_only=False)]) for c in ARRAY_COLS}
    out[KEY_COL] = np.asarray(t["query_id"].to_pylist(), dtype=object)
    return out


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def make_loader(spec: LoaderSpec, rank: int = 0, world_size: int = 1) -> ListLoader:
    """The loader of `spec.kind` for `rank` of `world_size` (call inside the worker process)."""
    return LOADERS.get(spec.kind)(spec, rank, world_size)


# ---- driver side ----------------------------------------------------------------------------------------
def _parquet_layout(lh: Lakehouse, splits: Iterable[str]) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Per split: (file, row group, rows of the split) over the current snapshot of `training_lists` (driver:
    reads the `split` column one row group at a time)."""
    import pyarrow.compute as pc

    df = lh.read("training_lists")
    per_split: dict[str, list[tuple[str, int, int]]] = {s: [] for s in splits}
    total = 0
    for f in sorted(df.inputFiles()):
        with _open(f) as pf:
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g, columns=["split"])["split"]
                total += len(col)
                for s in per_split:
                    per_split[s].append((f, g, int(pc.sum(pc.equal(col, s)).as_py() or 0)))
    if total != df.count():
        raise RuntimeError("training_lists files hold rows its Delta snapshot does not (deletion vectors?); "
                           "use train.data_loader=petastorm")
    return {s: tuple(v) for s, v in per_split.items()}


def _petastorm_converter(lh: Lakehouse, split: str, dims: ModalityDims, list_size: int, world_size: int):
    """Materialise one split for petastorm; null arrays become zero arrays of the contract size."""
    from petastorm.spark import SparkDatasetConverter, make_spark_converter
    from pyspark.sql import functions as F

    lh.spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, lh.paths.petastorm_cache_url())
    sizes = {"grades": list_size, "q_text": dims.text, "q_audio": dims.audio, "q_mask": 2,
             "p_text": list_size * dims.text, "p_image": list_size * dims.image,
             "p_audio": list_size * dims.audio, "p_mask": list_size * 3, "p_lex": list_size * N_LEX}
    fill = {"grades": -1.0}
    df = (lh.read("training_lists").where(F.col("split") == split)
          .select(F.xxhash64("query_id").alias(KEY_COL),
                  *[F.coalesce(F.col(c), F.array_repeat(F.lit(fill.get(c, 0.0)).cast("float"), n)).alias(c)
                    for c, n in sizes.items()])
          .repartition(world_size))
    return make_spark_converter(df)


@contextmanager
def prepare_specs(lh: Lakehouse, train: TrainConf, dims: ModalityDims, world_size: int,
                  splits: tuple[str, ...] = ("train", "validation"),
                  kind: str | None = None) -> Iterator[dict[str, LoaderSpec]]:
    """Driver: one `LoaderSpec` per split for `world_size` ranks; petastorm caches are deleted on exit."""
    kind = LOADERS.check(kind or train.data_loader)
    bs = per_rank_batch_size(train.batch_size, world_size)
    converters = []
    try:
        specs: dict[str, LoaderSpec] = {}
        layout = _parquet_layout(lh, splits) if kind == "parquet" else None
        for split in splits:
            extra: dict[str, Any] = {"buffer_rows": train.shuffle_buffer}
            if layout is not None:
                extra["pieces"] = layout[split]
                n = sum(c for _, _, c in layout[split])
            else:
                conv = _petastorm_converter(lh, split, dims, train.list_size, world_size)
                converters.append(conv)
                extra["converter"], n = conv, len(conv)
            if n < world_size:
                raise ValueError(f"split {split!r} has {n} lists, fewer than {world_size} ranks")
            steps = math.ceil(math.ceil(n / world_size) / bs)
            specs[split] = LoaderSpec(kind, split, dims, train.list_size, bs, steps, n, world_size,
                                      train.seed, shuffle=(split == "train"), **extra)
            log.info("loader %s/%s: %d lists, %d ranks x %d steps of <= %d", kind, split, n, world_size,
                     steps, bs)
        yield specs
    finally:
        for conv in converters:
            conv.delete()
