"""Benchmark: encoder throughput through the Spark job path (mapInPandas) vs the same encoder called directly.

    .venv/bin/python bench/featurize.py [--n N] [--repeats R] [--conf conf/local.yaml] [--set k=v ...]

Fair by construction: the same items, the same Arrow-sized chunks (spark.arrow_batch_size) split into the
same encoder batches (features.<m>.batch_size), the same total threads: Spark local[2] with 2 partitions and
1 torch thread per task vs direct with 2 torch threads in one process. Both are warmed up first (models
loaded, one pass over a small slice). Items come from the lakehouse `products` table when it has rows,
else a synthetic catalog (noisy colour images, tone clips, template titles) is built inline. With a GPU
visible, the direct path is also measured on cuda with `features.precision` (auto = bf16).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mmrank.config import FeaturesConf, load_config  # noqa: E402
from mmrank.encoders.device import set_threads  # noqa: E402
from mmrank.encoders.registry import get_encoder  # noqa: E402
from mmrank.modalities import PRODUCT_MODALITIES as MODALITIES  # noqa: E402
from mmrank.testing.media import image_bytes, wav_bytes  # noqa: E402

THREADS = 2
_WORDS = (["red", "blue", "green", "black", "white", "leather", "cotton", "wireless", "classic", "slim"],
          ["running shoe", "jacket", "mug", "speaker", "backpack", "sneaker", "dress", "headphones", "lamp"])


def synthetic_items(n: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    text = [f"{rng.choice(_WORDS[0])} {rng.choice(_WORDS[1])} | brand{i % 17} | category{i % 9} | "
            f"a {rng.choice(_WORDS[0])} item for everyday use, model {i}" for i in range(n)]
    image = [image_bytes(tuple(int(c) for c in rng.integers(0, 256, 3)), size=96, seed=i) for i in range(n)]
    audio = [wav_bytes(float(rng.uniform(200, 3000)), seconds=1.0, seed=i) for i in range(n)]
    return {"text": text, "image": image, "audio": audio}


def lakehouse_items(lh, n: int) -> dict[str, list] | None:
    from pyspark.sql import functions as F

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


def time_direct(enc, batches: list[list]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        enc.encode_safe(b)
    return time.perf_counter() - t0


def time_spark(df, cfg: FeaturesConf) -> float:
    from mmrank.stages.featurize import encode_frame

    t0 = time.perf_counter()
    encode_frame(df, cfg, THREADS).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="items per modality")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per path (best is reported)")
    ap.add_argument("--conf", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.conf, [f"spark.master=local[{THREADS}]", *args.overrides])
    from mmrank.lakehouse import Lakehouse
    from mmrank.spark import get_spark

    spark = get_spark(cfg)
    lh = Lakehouse(spark, cfg)
    items = lakehouse_items(lh, args.n)
    source = "lakehouse products"
    if items is None:
        items, source = synthetic_items(args.n), "synthetic catalog"
    cpu = cfg.features.model_copy(update={"device": "cpu", "torch_threads": 1})
    arrow = cfg.spark.arrow_batch_size
    rows = [f"Items: {source}, n={args.n} per modality; CPU: Spark local[{THREADS}] x 1 torch thread/task vs "
            f"direct 1 process x {THREADS} torch threads; Arrow batch {arrow}.", "",
            "| encoder | dim | batch | Spark items/s | direct items/s | Spark/direct |", "|---|---|---|---|---|---|"]
    gpu_rows = []
    for m in MODALITIES:
        data = items[m]
        enc = get_encoder(m, cpu)
        pdf = pd.DataFrame({"source": "products", "id": [str(i) for i in range(len(data))], "modality": m,
                            "text": data if m == "text" else None, "data": None if m == "text" else data,
                            "content_hash": "x"})
        schema = "source string, id string, modality string, text string, data binary, content_hash string"
        df = spark.createDataFrame(pdf, schema).repartition(THREADS).cache()
        df.count()
        warm = df.limit(2 * enc.batch_size).repartition(THREADS)
        time_spark(warm, cpu)
        set_threads(THREADS)
        # the same batches Spark sees: per partition, Arrow chunks; here one list split the same way
        batches = chunks(data, min(arrow, -(-len(data) // THREADS)))
        time_direct(enc, chunks(data[: 2 * enc.batch_size], enc.batch_size))
        t_spark = min(time_spark(df, cpu) for _ in range(args.repeats))
        set_threads(THREADS)
        t_direct = min(time_direct(enc, batches) for _ in range(args.repeats))
        n = len(data)
        rows.append(f"| {m}: {enc.name} ({enc.version}) | {enc.dim} | {enc.batch_size} | {n / t_spark:.1f} | "
                    f"{n / t_direct:.1f} | {t_direct / t_spark:.2f}x |")
        df.unpersist()
        if torch.cuda.is_available():
            g = get_encoder(m, cfg.features.model_copy(update={"device": "cuda"}))
            gb = chunks(data, g.batch_size)
            time_direct(g, gb[:2])
            torch.cuda.synchronize()
            t = min(time_direct(g, gb) for _ in range(args.repeats))
            gpu_rows.append(f"| {m}: {g.name} | {g.batch_size} | {g.precision} | {n / t:.1f} |")
    print("\n".join(rows))
    if gpu_rows:
        print(f"\nGPU ({torch.cuda.get_device_name(0)}), direct path:\n\n| encoder | batch | precision | items/s |\n"
              "|---|---|---|---|\n" + "\n".join(gpu_rows))
    else:
        print("\nNo GPU visible: GPU throughput not measured.")


if __name__ == "__main__":
    main()
