"""How `training_lists` rows reach each training process, as batches of the tensor contract.

The driver prepares a picklable `LoaderSpec` per split (`prepare_specs`); every rank builds its loader with
`make_loader(spec, rank, world_size)` and calls `epoch_batches(epoch)`. Two interchangeable data paths:

- `petastorm`: the split's DataFrame is materialised once by `petastorm.spark.make_spark_converter` into the
  cache dir `lh.paths.petastorm_cache_url()` (`petastorm.spark.converter.parentCacheDirUrl`: a `file://` URL
  or an object-store URI; on a cluster it must be shared storage every executor reads);
  rank r reads shard r (`cur_shard=r, shard_count=world_size`) with `make_torch_dataloader(num_epochs=1)`.
  The cache is deleted (`converter.delete()`) when `prepare_specs` exits, also on failure.
- `parquet`: no petastorm. The driver resolves the Delta snapshot's current Parquet files
  (`DataFrame.inputFiles()`) and the split's row count per file; rank r reads its contiguous slice of the
  split's rows directly with pyarrow, through the file-system layer (`mmrank.storage`: local or object store). Refuses tables whose files hold rows the snapshot does not
  (deletion vectors), detected by a row-count check.

A rank's shard is read once and kept in memory (rows/world_size lists). Each epoch it is ordered by a stable
key, shuffled (train split) with a generator seeded by (seed, epoch, rank) and cut into exactly
`spec.steps` batches, the same number on every rank, so collective ops (DDP, Horovod) never wait on a rank
that ran out of data. `train.batch_size` is the global batch size: each rank gets ceil(batch_size / world_size).
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
    files: tuple[str, ...] = ()            # parquet: snapshot files, in a fixed order
    file_rows: tuple[int, ...] = ()        # parquet: rows of `split` in each file
    converter: Any = field(default=None, compare=False)  # petastorm: SparkDatasetConverter


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(global_batch_size / world_size))


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, balanced [lo, hi) slice of `num_rows` for `rank` (sizes differ by at most one)."""
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


class _ShardLoader:
    """Shared epoch logic: read the shard once, then order, shuffle and cut into `spec.steps` batches."""

    def __init__(self, spec: LoaderSpec, rank: int, world_size: int):
        if world_size != spec.world_size:
            raise ValueError(f"spec prepared for {spec.world_size} ranks, used with {world_size}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.num_batches = spec.steps
        self._rows: dict[str, np.ndarray] | None = None

    def read_shard(self) -> dict[str, np.ndarray]:
        """This rank's rows as columns (`KEY_COL` + contract arrays), in any order."""
        raise NotImplementedError

    def shard_rows(self) -> dict[str, np.ndarray]:
        """This rank's rows, read once, ordered by `KEY_COL` (deterministic whatever the read order)."""
        if self._rows is None:
            rows = self.read_shard()
            order = np.argsort(rows[KEY_COL], kind="stable")
            self._rows = {k: v[order] for k, v in rows.items()}
            if len(order) == 0:
                raise ValueError(f"rank {self.rank} got no {self.spec.split} rows")
        return self._rows

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        rows, s = self.shard_rows(), self.spec
        n = len(rows[KEY_COL])
        idx = np.arange(n)
        if s.shuffle:
            idx = np.random.default_rng([s.seed, epoch, self.rank]).permutation(n)
        for chunk in np.array_split(idx, s.steps):
            if len(chunk) == 0:  # fewer rows than steps on this rank: repeat one row (keeps ranks in step)
                chunk = idx[:1]
            yield rows_to_batch({c: rows[c][chunk] for c in ARRAY_COLS}, s.dims, s.list_size)


@LOADERS.register("petastorm")
class PetastormLoader(_ShardLoader):
    """Shard `rank` of the petastorm-materialised split (row-group sharding by petastorm)."""

    def read_shard(self) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        with self.spec.converter.make_torch_dataloader(
                batch_size=_READ_CHUNK, num_epochs=1, cur_shard=self.rank, shard_count=self.world_size,
                # synchronous reads: petastorm 0.13.1's thread pool can report "no more results" before
                # its ventilator counted the first row group (seen under load: an empty shard)
                reader_pool_type="dummy") as dl:
            for b in dl:
                for k, v in b.items():
                    parts.setdefault(k, []).append(v.numpy())
        if not parts:
            raise ValueError(f"petastorm shard {self.rank}/{self.world_size} of {self.spec.split} is empty "
                             f"(files: {self.spec.converter.file_urls})")
        return {k: np.concatenate(v) for k, v in parts.items()}


def _read_parquet(uri: str, columns: list[str]):
    """One Parquet file of the Delta snapshot, local or on an object store (`mmrank.storage.filesystem`)."""
    import pyarrow.parquet as pq

    from mmrank.storage import filesystem

    fs, path = filesystem(unquote(uri))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


@LOADERS.register("parquet")
class ParquetLoader(_ShardLoader):
    """Rank `rank`'s contiguous slice of the split's rows, read straight from the Delta snapshot's files."""

    def read_shard(self) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        s = self.spec
        lo, hi = shard_bounds(s.num_rows, self.rank, self.world_size)
        starts = np.concatenate([[0], np.cumsum(s.file_rows)])
        cols: dict[str, list] = {c: [] for c in (KEY_COL, *ARRAY_COLS)}
        for path, start, count in zip(s.files, starts[:-1], s.file_rows):
            a, b = max(lo - start, 0), min(hi - start, count)
            if a >= b:
                continue
            t = _read_parquet(path, ["query_id", "split", *ARRAY_COLS])
            t = t.filter(pc.equal(t["split"], s.split)).slice(a, b - a)
            cols[KEY_COL].extend(t["query_id"].to_pylist())
            for c in ARRAY_COLS:
                cols[c].extend(None if v is None else np.asarray(v, np.float32)
                               for v in t[c].to_numpy(zero_copy_only=False))
        out = {c: _object_array(v) for c, v in cols.items()}
        out[KEY_COL] = np.asarray(cols[KEY_COL], dtype=object)
        return out


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def make_loader(spec: LoaderSpec, rank: int = 0, world_size: int = 1) -> ListLoader:
    """The loader of `spec.kind` for `rank` of `world_size` (call inside the worker process)."""
    return LOADERS.get(spec.kind)(spec, rank, world_size)


# ---- driver side ----------------------------------------------------------------------------------------
def _parquet_layout(lh: Lakehouse, splits: Iterable[str]) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """Current snapshot files of `training_lists` and each split's row count per file (driver)."""
    import pyarrow.compute as pc

    df = lh.read("training_lists")
    files = tuple(sorted(df.inputFiles()))
    per_split: dict[str, list[int]] = {s: [] for s in splits}
    total = 0
    for f in files:
        col = _read_parquet(f, ["split"])["split"]
        total += len(col)
        for s in per_split:
            per_split[s].append(int(pc.sum(pc.equal(col, s)).as_py() or 0))
    if total != df.count():
        raise RuntimeError("training_lists files hold rows its Delta snapshot does not (deletion vectors?); "
                           "use train.data_loader=petastorm")
    return files, {s: tuple(v) for s, v in per_split.items()}


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
            extra: dict[str, Any] = {}
            if layout is not None:
                extra = {"files": layout[0], "file_rows": layout[1][split]}
                n = sum(layout[1][split])
            else:
                conv = _petastorm_converter(lh, split, dims, train.list_size, world_size)
                converters.append(conv)
                extra, n = {"converter": conv}, len(conv)
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
