"""Benchmark: encoder throughput through the Spark job path (mapInArrow) vs the same encoder called directly,
and the cost of an incremental featurize night.

    python bench/featurize.py [--n 4096] [--repeats 1] [--incremental 4096] [--modalities text,image,audio]
                              [--conf C] [--set k=v ...]

Throughput: the same items (a synthetic catalog: template titles, 96 px noisy colour images, 1 s tone clips;
or the lakehouse `products` when it has `--n` rows), the same encoder batches (features.<m>.batch_size), the
same cores. Spark: local[T], 1 torch thread per task; the items are written to a `products` Delta table (as
the DataFrame's T partitions write it: T files), and the stage's own path runs from there: `with_bytes` (text
in T partitions; images and clips as (file, split) references, one task per split, each reading its items'
bytes from the table's Parquet files, streamed) cached, then `featurize.encode_frame` to the last embedding
(`noop` sink); beside it, the same path with an encoder that computes nothing (the inputs reaching Python
alone, media bytes read included). Direct, without Spark, the better of: 1 process x T torch threads, and T spawned
processes x 1 thread each encoding its share side by side; once on the items already in memory (the model
alone), once reading them first from the same table's Parquet files with pyarrow (what a direct job over the
table does; the processes split the row groups). Each path is warmed up first (models loaded in every Python
worker and process: a small slice of every partition / share). With `--repeats R`, R rounds each run every
path once, in turn, so that a machine's drift over minutes hits all paths alike; the table gives each path's
best round and, per round, Spark / best direct of that round (the spread says what is noise). With a GPU
visible, the direct path is also measured on cuda.

Incremental (`--incremental N`, 0 = skip): a generated catalog of N products (+ N/10 queries) is ingested
and featurized in full (timed), then 1% of the products get a new title and 1% a new image (MERGEd like an
ingest), and featurize runs again (timed): the ratio is what a night with 1% changes costs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from mmrank.config import FeaturesConf, load_config  # noqa: E402
from mmrank.encoders.device import set_threads  # noqa: E402
from mmrank.encoders.registry import get_encoder  # noqa: E402
from mmrank.modalities import PRODUCT_MODALITIES as MODALITIES  # noqa: E402
from mmrank.testing.media import image_bytes, wav_bytes  # noqa: E402

_WORDS = (["red", "blue", "green", "black", "white", "leather", "cotton", "wireless", "classic", "slim"],
          ["running shoe", "jacket", "mug", "speaker", "backpack", "sneaker", "dress", "headphones", "lamp"])
RUN_DATE = dt.date(2026, 11, 21)


def synthetic_items(n: int, seed: int = 0, modalities: tuple[str, ...] = MODALITIES) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    make = {
        "text": lambda i: f"{rng.choice(_WORDS[0])} {rng.choice(_WORDS[1])} | brand{i % 17} | category{i % 9} | "
                          f"a {rng.choice(_WORDS[0])} item for everyday use, model {i}",
        "image": lambda i: image_bytes(tuple(int(c) for c in rng.integers(0, 256, 3)), size=96, seed=i),
        "audio": lambda i: wav_bytes(float(rng.uniform(200, 3000)), seconds=1.0, seed=i)}
    return {m: [make[m](i) for i in range(n)] for m in modalities}


def lakehouse_items(lh, n: int) -> dict[str, list] | None:
    from mmrank.stages.featurize import product_text

    if not lh.exists("products"):
        return None
    rows = (lh.read("products").select(product_text(lh.cfg.features).alias("text"), "image_bytes", "audio_bytes")
            .limit(n).collect())
    if len(rows) < n:
        return None
    return {"text": [r["text"] for r in rows], "image": [r["image_bytes"] for r in rows if r["image_bytes"]],
            "audio": [r["audio_bytes"] for r in rows if r["audio_bytes"]]}


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def encode_all(enc, items: list) -> None:
    for b in chunks(items, enc.batch_size):
        enc.encode_safe(b)


def shard_work(arg: tuple) -> Callable[[], None]:
    """Process setup for `side_by_side`: one torch thread, the encoder, this process's share of the items."""
    modality, cfg_json, items = arg
    set_threads(1)
    enc = get_encoder(modality, FeaturesConf.model_validate_json(cfg_json))
    return lambda: encode_all(enc, items)


def read_inputs(files: list[str], column: str, share: tuple[int, int] = (0, 1)) -> list:
    """One column of the `products` table's data files read with pyarrow (no Spark; the bench writes the table
    once, so every data file is current): what a direct encoder must do first when its items live in a table.
    `share` (k, of): the row groups k, k + of, ... of all files in order."""
    import pyarrow.dataset as pads

    from mmrank.media_files import arrow_filesystem

    fmt = pads.ParquetFileFormat()
    where = [arrow_filesystem(f) for f in files]
    units = [(i, g) for i, (fs, p) in enumerate(where)
             for g in range(fmt.make_fragment(p, filesystem=fs).metadata.num_row_groups)][share[0]::share[1]]
    out: list = []
    for i, (fs, p) in enumerate(where):
        groups = [g for j, g in units if j == i]
        if groups:
            t = fmt.make_fragment(p, filesystem=fs, row_groups=groups).to_table(columns=[column], use_threads=False)
            out += t.column(column).to_pylist()
    return out


def read_shard_work(arg: tuple) -> Callable[[], None]:
    """Process setup for the direct encoder that reads the table, split over processes: one torch thread, the
    encoder; the work reads this process's share of the row groups and encodes them."""
    modality, cfg_json, files, column, k, of = arg
    set_threads(1)
    enc = get_encoder(modality, FeaturesConf.model_validate_json(cfg_json))
    return lambda: encode_all(enc, read_inputs(files, column, (k, of)))


def time_spark(df, cfg: FeaturesConf) -> float:
    from mmrank.stages.featurize import encode_frame

    return _timed(lambda: encode_frame(df, cfg).write.format("noop").mode("overwrite").save())


def _touch(cfg: FeaturesConf):
    """A mapInArrow function that takes each task's items as the encoder would (`featurize.task_items`: media
    bytes read from their files) and computes nothing."""
    def run(batches):
        import pyarrow as pa

        from mmrank.stages.featurize import task_items

        for _ in task_items(batches, cfg):
            pass
        yield pa.RecordBatch.from_pylist([], schema=pa.schema([("id", pa.string())]))
    return run


def time_transfer(df, cfg: FeaturesConf) -> float:
    """The Spark path without the encoder: the items reaching Python alone (the path's own cost)."""
    return _timed(lambda: df.mapInArrow(_touch(cfg), "id string").write.format("noop").mode("overwrite").save())


def stage_input(lh, modality: str, data: list, threads: int):
    """The items as featurize delivers them to its encoders: written to the `products` table, then the stage's
    `candidates` + `with_bytes` (cached)."""
    from mmrank.encoders.registry import encoder_identity
    from mmrank.stages.featurize import MEDIA_COLUMNS, candidates, with_bytes

    media = MEDIA_COLUMNS.get(("products", modality))
    pdf = pd.DataFrame({"product_id": [f"{i:07d}" for i in range(len(data))],
                        "title": data if modality == "text" else "item"})
    if media is not None:
        pdf[media[0]] = data
        pdf[media[1]] = [hashlib.sha256(b).hexdigest() for b in data]
    df = lh.spark.createDataFrame(pdf).repartition(threads)
    for f in lh.read("products").schema.fields:
        if f.name not in df.columns:
            df = df.withColumn(f.name, F.lit(None).cast(f.dataType))
    lh.overwrite("products", df.withColumn("content_hash", F.col("product_id"))
                 .withColumn("run_date", F.lit(RUN_DATE.isoformat()).cast("date")))
    versions = {m: encoder_identity(m, lh.cfg.features).version for m in MODALITIES}
    todo = candidates(lh, "products", versions).where(F.col("modality") == modality)
    counts = {f"attempted_products_{modality}": len(data), f"unchanged_products_{modality}": 0}
    out = with_bytes(lh, todo, counts, threads).cache()
    out.count()
    return out


def throughput(lh, items: dict[str, list], source: str, cpu: FeaturesConf, threads: int, repeats: int,
               gpu_cfg: FeaturesConf | None, modalities: tuple[str, ...] = MODALITIES) -> list[str]:
    from mmrank.stages.featurize import MEDIA_COLUMNS
    from mmrank.testing.timing import side_by_side

    rows = [f"Items: {source}, n={len(items[modalities[0]])} per modality; Spark local[{threads}] x 1 torch thread per "
            f"task vs direct (best of 1 process x {threads} torch threads and {threads} processes x 1 thread).",
            f"Each of {repeats} round(s) runs every path once, in turn (drift hits all paths alike); best round "
            "per path, and Spark / best direct within each round.",
            "", "| encoder | dim | batch | n | Spark items/s | direct 1 proc x T threads | direct T procs x 1 thread "
            "| Spark / best direct (items in memory) | same, per round | direct 1 proc x T threads incl. reading the "
            "table | direct T procs x 1 thread incl. reading the table | Spark / best direct incl. reading "
            "| Spark inputs alone, items/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gpu_rows = []
    for m in modalities:
        data = items[m]
        enc = get_encoder(m, cpu)
        df = stage_input(lh, m, data, threads)
        # warm-up: a slice of every partition, so every Python worker starts and loads its encoder
        time_spark(df.sample(fraction=min(1.0, 2 * enc.batch_size * threads / len(data)), seed=0), cpu)
        set_threads(threads)
        encode_all(enc, data[: 2 * enc.batch_size])
        cuts = np.linspace(0, len(data), threads + 1).astype(int)
        shards = [(m, cpu.model_dump_json(), data[a:b]) for a, b in zip(cuts, cuts[1:])]
        files, column = sorted(lh.read("products").inputFiles()), MEDIA_COLUMNS.get(("products", m), ("title",))[0]
        shares = [(m, cpu.model_dump_json(), files, column, k, threads) for k in range(threads)]
        paths = {"spark": lambda: time_spark(df, cpu), "transfer": lambda: time_transfer(df, cpu),
                 "threads": lambda: _timed(lambda: encode_all(enc, data)),
                 "procs": lambda: side_by_side(shard_work, shards),
                 "read_threads": lambda: _timed(lambda: encode_all(enc, read_inputs(files, column))),
                 "read_procs": lambda: side_by_side(read_shard_work, shares)}
        rounds = [{k: run() for k, run in paths.items()} for _ in range(repeats)]  # interleaved: drift hits all
        df.unpersist()
        t = {k: min(r[k] for r in rounds) for k in paths}
        per_round = ", ".join(f"{min(r['threads'], r['procs']) / r['spark']:.2f}x" for r in rounds)
        n = len(data)
        rows.append(f"| {m}: {enc.name} ({enc.version}) | {enc.dim} | {enc.batch_size} | {n} | {n / t['spark']:.1f} | "
                    f"{n / t['threads']:.1f} | {n / t['procs']:.1f} | "
                    f"{min(t['threads'], t['procs']) / t['spark']:.2f}x | {per_round} | "
                    f"{n / t['read_threads']:.1f} | {n / t['read_procs']:.1f} | "
                    f"{min(t['read_threads'], t['read_procs']) / t['spark']:.2f}x | {n / t['transfer']:.0f} |")
        print(rows[-1], flush=True)
        if gpu_cfg is not None:
            g = get_encoder(m, gpu_cfg)
            encode_all(g, data[: 2 * g.batch_size])
            torch.cuda.synchronize()
            t = min(_timed(lambda: encode_all(g, data)) for _ in range(repeats))
            gpu_rows.append(f"| {m}: {g.name} | {g.batch_size} | {g.precision} | {n / t:.1f} |")
    if gpu_rows:
        rows += ["", f"GPU ({torch.cuda.get_device_name(0)}), direct path:", "", "| encoder | batch | precision "
                 "| items/s |", "|---|---|---|---|", *gpu_rows]
    else:
        rows += ["", "No GPU visible: GPU throughput not measured."]
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def incremental(spark, n: int, overrides: list[str], conf: str | None) -> list[str]:
    """Full featurize of a generated catalog, then a night with 1% new titles and 1% new images."""
    from pyspark.sql import functions as F

    from mmrank.data.ingest import content_hash
    from mmrank.data.landing import sample_layout, write_sample
    from mmrank.lakehouse import Lakehouse
    from mmrank.stages import featurize, ingest

    root = Path(tempfile.mkdtemp(prefix="mmrank-bench-featurize-"))
    cfg = load_config(conf, [f"storage.root={root}/lh", f"storage.raw_dir={root}/lh/_landing",
                             f"storage.artifacts_dir={root}/lh/_artifacts", f"storage.work_dir={root}/lh/_work",
                             f"storage.reports_dir={root}/lh/_reports", f"generator.n_products={n}",
                             f"generator.n_queries={max(5, n // 10)}", "generator.sessions_per_query=1",
                             "generator.log_days=1", *overrides])
    lh = Lakehouse(spark, cfg)
    write_sample(cfg.generator, RUN_DATE, sample_layout(lh.paths.landing).root)
    ingest.run(lh, RUN_DATE)
    t_full = _timed(lambda: featurize.run(lh, RUN_DATE))
    nxt = RUN_DATE + dt.timedelta(days=1)
    p = lh.read("products")
    every = 100  # 1% of the products
    pick = F.pmod(F.xxhash64("product_id"), F.lit(every))
    other = p.where(pick == 1).where(F.col("image_bytes").isNotNull())
    new_image = F.concat(F.col("image_bytes"), F.lit(b"\x00"))  # trailing byte: still a valid PNG, new hash
    changed = (p.where(pick == 0).withColumn("title", F.concat_ws(" ", "title", F.lit("v2")))
               .unionByName(other.withColumn("image_bytes", new_image)
                            .withColumn("image_hash", F.sha2(new_image, 256))))
    changed = changed.withColumn("content_hash", content_hash(F.col("title"), F.col("image_hash")))
    n_changed = changed.count()
    lh.merge("products", changed.withColumn("run_date", F.lit(nxt.isoformat()).cast("date")))
    counts: dict = {}
    t_incr = _timed(lambda: counts.update(featurize.run(lh, nxt)))
    return [f"Incremental featurize ({n} products, {max(5, n // 10)} queries, default encoders): full night "
            f"{t_full:.1f}s; night with {n_changed} changed products (1% new titles, 1% new images; "
            f"{counts.get('encoded', 0)} items re-encoded) {t_incr:.1f}s = {t_incr / t_full:.1%} of the full night."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="items per modality")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per path (best is reported)")
    ap.add_argument("--threads", type=int, default=2, help="cores used by both paths (Spark local[T])")
    ap.add_argument("--incremental", type=int, default=4096, help="products of the incremental-night check (0 = skip)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--modalities", default=",".join(MODALITIES), help="encoders measured, comma-separated")
    ap.add_argument("--conf", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mmrank-bench-featurize-lh-")
    cfg = load_config(args.conf, [f"spark.master=local[{args.threads}]", f"storage.root={tmp}", *args.overrides])
    from mmrank.lakehouse import Lakehouse
    from mmrank.spark import get_spark

    spark = get_spark(cfg)
    load = os.getloadavg()
    out = [f"load average before: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores", ""]
    if not args.skip_throughput:
        modalities = tuple(m for m in args.modalities.split(",") if m)
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            ap.error(f"--modalities: unknown {sorted(unknown)}; choose from {', '.join(MODALITIES)}")
        items = lakehouse_items(Lakehouse(spark, cfg), args.n)
        source = "lakehouse products"
        if items is None:
            items, source = synthetic_items(args.n, modalities=modalities), "synthetic catalog"
        cpu = cfg.features.model_copy(update={"device": "cpu", "torch_threads": 1})
        gpu = cfg.features.model_copy(update={"device": "cuda"}) if torch.cuda.is_available() else None
        out += throughput(Lakehouse(spark, cfg), items, source, cpu, args.threads, args.repeats, gpu, modalities)
    if args.incremental:
        out += [""] + incremental(spark, args.incremental, [o for o in args.overrides if not o.startswith("storage.")],
                                  args.conf)
    out.append(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
