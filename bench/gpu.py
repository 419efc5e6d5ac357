"""GPU throughput on one GPU: each encoder through Spark vs the same model called directly, the scorer, training.

    python bench/gpu.py                 # needs a GPU; without one it says so and exits 0
    python bench/gpu.py --cpu-smoke     # the same code on CPU with tiny inputs: checks the bench runs (the
                                        # numbers mean nothing)

Inputs are generated: JPEG bytes (`--jpeg-size` px, noisy, so decode is real work), product-like texts of
<= 64 tokens, WAV clips. Measured, all on cuda:0:
  1. direct, swept over batch size and precision: MiniLM-L6 texts/s, ResNet-50 images/s from JPEG bytes to
     embeddings (nvJPEG batch decode, resize, CNN + colour/texture block), the audio encoder clips/s;
  2. what bounds ResNet-50: JPEG decode + resize alone, the model alone on pixels already on the GPU, both;
  3. through Spark vs direct at each encoder's best direct setting: the featurize stage's mapInPandas UDF
     (`stages.featurize.encode_frame`) on a cached DataFrame of the same inputs, local[T] (no GPU resource
     scheduling in local mode: every task resolves cuda:0), timed until every row is produced (noop sink);
     the direct run is one process calling `encode_safe` on the same Arrow-sized chunks;
  4. the scorer (pairs/s) through Spark (`scoring.scorer.score_df`) vs `score_pairs` on ready numpy batches;
  5. training lists/s of one process on the GPU (`ranker.fit.fit`), batch size and precision swept.
Every run is timed after a warm-up; each figure is the best of `--repeats`. Targets (issue 15): ResNet-50
>= 20,000 images/s, MiniLM-L6 >= 30,000 texts/s, Spark >= 0.9x direct.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TARGETS = {"text": 30_000, "image": 20_000}
WORDS = ("red blue green black white leather cotton wool running trail waterproof jacket shoe boot sneaker "
         "dress shirt mug kettle lamp chair oak steel pro max mini slim classic vintage summer winter kids "
         "women men size pack of two acme nordic urban").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 40)))) for _ in range(n)]


def jpegs(n: int, size: int, distinct: int = 256) -> list[bytes]:
    from mmrank.testing.media import image_bytes

    pool = [image_bytes((37 * i % 256, 91 * i % 256, 53 * i % 256), size=size, noise=12.0, seed=i, fmt="JPEG")
            for i in range(min(n, distinct))]
    return [pool[i % len(pool)] for i in range(n)]


def clips(n: int, seconds: float) -> list[bytes]:
    from mmrank.testing.media import wav_bytes

    pool = [wav_bytes(150 + 25 * i, seconds=seconds, seed=i) for i in range(min(n, 64))]
    return [pool[i % len(pool)] for i in range(n)]


def features(modality: str, batch: int, precision: str, device: str, smoke: bool):
    from mmrank.config import FeaturesConf

    sec = {"text": {"max_length": 64}, "image": {"name": "resnet50"}, "audio": {}}[modality]
    sec = {**sec, "batch_size": batch}
    if smoke and modality == "image":
        sec["decoder"] = "torchvision"  # the GPU's batch-decode path, run on CPU
    return FeaturesConf.model_validate({"device": device, "precision": precision, "overlap": "on",
                                        modality: sec})


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (cudnn autotune, allocator, worker start)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def direct_rate(enc, items: list, chunk: int, repeats: int) -> float:
    def run():
        for c in chunks(items, chunk):
            enc.encode_safe(c)
    return len(items) / best_of(run, repeats)


def sweep_encoders(data: dict, args, device) -> tuple[list[str], dict]:
    from mmrank.encoders.registry import get_encoder

    rows, best = [], {}
    for m, items in data.items():
        for prec in args.precisions:
            for bs in args.batch_sizes[m]:
                enc = get_encoder(m, features(m, bs, prec, device.type, args.cpu_smoke), device)
                rate = direct_rate(enc, items, args.arrow_batch, args.repeats)
                rows.append(f"| {m}: {enc.name} | {bs} | {prec} ({enc.precision}) | {num(rate)} |")
                if rate > best.get(m, (0.0,))[0]:
                    best[m] = (rate, bs, prec)
    return rows, best


def image_bounds(items: list, bs: int, prec: str, args, device) -> list[str]:
    """ResNet-50 decode+resize alone, model alone (pixels already on the GPU), and both, in images/s."""
    import torch

    from mmrank.encoders.device import inference
    from mmrank.encoders.image import ImageBatch
    from mmrank.encoders.registry import get_encoder

    enc = get_encoder("image", features("image", bs, prec, device.type, args.cpu_smoke), device).load()
    batches = [enc._collate([enc.decode(b) for b in c]) for c in chunks(items, bs)]
    pixels = enc._pixels(batches[0])
    fake = ImageBatch(len(pixels), list(range(len(pixels))), pixels)

    def decode_only():
        for b in batches:
            enc._pixels(b)

    def model_only():
        with inference(enc.device, enc.dtype):
            for _ in batches:
                enc._forward(fake)

    def both():
        with inference(enc.device, enc.dtype):
            for b in batches:
                enc._forward(b)
    n_items, n_model = sum(b.n for b in batches), len(batches) * fake.n
    with torch.inference_mode():
        rates = {k: n / best_of(f, args.repeats) for k, f, n in
                 (("decode+resize", decode_only, n_items), ("model", model_only, n_model), ("both", both, n_items))}
    return [f"| {k} | {bs} | {prec} | {num(v)} |" for k, v in rates.items()]


def spark_session(tasks: int, arrow_batch: int):
    import os

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    repo = str(Path(__file__).resolve().parents[1])  # Spark's Python workers import this checkout's mmrank
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    return (SparkSession.builder.master(f"local[{tasks}]").appName("mmrank-bench-gpu")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch))
            .config("spark.driver.memory", "16g").config("spark.ui.enabled", "false")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.showConsoleProgress", "false").getOrCreate())


def spark_vs_direct(spark, data: dict, best: dict, args, device) -> list[str]:
    import pandas as pd

    from mmrank.stages.featurize import encode_frame

    rows = []
    schema = "source string, id string, modality string, text string, data binary, content_hash string"
    for m, items in data.items():
        direct, bs, prec = best[m]
        cfg = features(m, bs, prec, device.type, args.cpu_smoke)
        pdf = pd.DataFrame({"source": "products", "id": [str(i) for i in range(len(items))], "modality": m,
                            "text": items if m == "text" else None, "data": None if m == "text" else items,
                            "content_hash": "x"})
        df = spark.createDataFrame(pdf, schema).repartition(args.spark_tasks).cache()
        df.count()
        run = lambda: encode_frame(df, cfg, args.spark_tasks).write.format("noop").mode("overwrite").save()  # noqa
        rate = len(items) / best_of(run, args.repeats)
        df.unpersist()
        target = TARGETS.get(m)
        vs = f"{rate / target:.2f}x of {target:,}" if target else "-"
        rows.append(f"| {m} | {bs} | {prec} | {num(direct)} | {num(rate)} | {rate / direct:.2f}x | {vs} |")
    return rows


def scorer_rows(spark, args, device) -> list[str]:
    import pandas as pd

    from mmrank.config import TrainConf
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.artifact import save_artifact
    from mmrank.ranker.fit import build_model
    from mmrank.scoring.scorer import load_scorer, model_device, score_df, score_pairs

    dims = ModalityDims(text=384, image=2144, audio=232)  # MiniLM, ResNet-50 + colour/texture, audio
    adir = tempfile.mkdtemp(prefix="mmrank-bench-gpu-")
    version = save_artifact(build_model(dims, TrainConf()), {"note": "bench/gpu.py random init"}, adir)
    model, _ = load_scorer(adir, version)
    n, rng = args.pairs, np.random.default_rng(0)
    q = {m: rng.normal(size=(n, getattr(dims, m))).astype(np.float32) for m in ("text", "audio")}
    p = {m: rng.normal(size=(n, getattr(dims, m))).astype(np.float32) for m in ("text", "image", "audio")}
    pdf = pd.DataFrame({"query_id": [f"q{i % 1000:05d}" for i in range(n)], "product_id": [f"p{i}" for i in range(n)],
                        **{f"q_{m}": list(v) for m, v in q.items()}, **{f"p_{m}": list(v) for m, v in p.items()}})
    sdf = spark.createDataFrame(pdf, "query_id string, product_id string, q_text array<float>, q_audio array<float>, "
                                     "p_text array<float>, p_image array<float>, p_audio array<float>").cache()
    sdf.count()
    rows = []
    for bs in args.score_batches:
        def direct():
            for s in range(0, n, bs):
                score_pairs(model, {m: v[s:s + bs] for m, v in q.items()}, {m: v[s:s + bs] for m, v in p.items()})
        d = n / best_of(direct, args.repeats)
        run = lambda: score_df(sdf, adir, version, False, bs, args.spark_tasks).write.format("noop").mode(  # noqa
            "overwrite").save()
        s = n / best_of(run, args.repeats)
        rows.append(f"| {bs} | {model_device(model)} | {num(d)} | {num(s)} | {s / d:.2f}x |")
    sdf.unpersist()
    return rows


def training_rows(args, device) -> list[str]:
    from mmrank.config import TrainConf
    from mmrank.modalities import ModalityDims
    from mmrank.ranker.batch import rows_to_batch
    from mmrank.ranker.fit import batches_fn, build_model, fit
    from mmrank.testing.lists import synthetic_lists

    dims = ModalityDims(text=384, image=2144, audio=232)
    batch = rows_to_batch(synthetic_lists(args.lists, 20, dims), dims, 20)
    rows = []
    for prec in args.precisions:
        for bs in args.train_batches:
            cfg = TrainConf(batch_size=bs, precision=prec, max_epochs=args.epochs, patience=args.epochs,
                            torch_threads=args.threads)
            model = build_model(dims, cfg).to(device)
            res = fit(model, batches_fn(batch, bs, True, 0), batches_fn(batch, 4096, False, 0), cfg)
            rows.append(f"| {bs} | {prec} | {num(res.samples_per_sec)} |")
    return rows


def num(x: float) -> str:
    """A rate for the tables: thousands separated, 3 significant digits below 100."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(title: str, header: str, rows: list[str]) -> str:
    cols = header.count("|") - 1
    return f"\n{title}\n\n{header}\n|{'---|' * cols}\n" + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every part on CPU with tiny inputs")
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--clips", type=int, default=4_000)
    ap.add_argument("--jpeg-size", type=int, default=320)
    ap.add_argument("--clip-seconds", type=float, default=4.0)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--spark-tasks", type=int, default=4)
    ap.add_argument("--arrow-batch", type=int, default=4096, help="Arrow batch = direct chunk size")
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--score-batches", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--lists", type=int, default=4_000)
    ap.add_argument("--train-batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("No GPU present (torch.cuda.is_available() is False): bench/gpu.py measured nothing. "
              "Run it on a machine with a GPU (or --cpu-smoke to check the bench itself on CPU).")
        return 0
    import logging
    import os

    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.batch_sizes = {"text": [256, 1024], "image": [64, 256], "audio": [32, 128]}
    args.threads = 1
    if args.cpu_smoke:
        args.images, args.texts, args.clips, args.jpeg_size, args.clip_seconds = 8, 32, 4, 96, 0.5
        args.precisions = [p for p in args.precisions if p != "fp16"] or ["fp32"]
        args.spark_tasks, args.arrow_batch, args.pairs, args.score_batches = 2, 16, 256, [128]
        args.lists, args.train_batches, args.epochs, args.repeats = 64, [32], 1, 1
        args.batch_sizes = {"text": [16], "image": [4], "audio": [2]}
        device, name = torch.device("cpu"), "CPU smoke run (numbers mean nothing)"
    else:
        device, name = torch.device("cuda", 0), torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True
        args.threads = max(1, (os.cpu_count() or 1) // 2)
    data = {"text": texts(args.texts), "image": jpegs(args.images, args.jpeg_size),
            "audio": clips(args.clips, args.clip_seconds)}
    print(f"# bench/gpu.py on {name}, torch {torch.__version__}; {args.images} JPEGs of {args.jpeg_size}px "
          f"(mean {np.mean([len(b) for b in data['image'][:256]]) / 1024:.0f} KiB), {args.texts} texts, "
          f"{args.clips} clips of {args.clip_seconds:g} s; Spark local[{args.spark_tasks}], Arrow batch "
          f"{args.arrow_batch}; best of {args.repeats}")
    direct, best = sweep_encoders(data, args, device)
    print(table("Direct, one process (items/s):", "| encoder | batch | precision (used) | items/s |", direct))
    r, bs, prec = best["image"]
    print(table("ResNet-50 bounds (images/s):", "| part | batch | precision | images/s |",
                image_bounds(data["image"][: max(bs, min(len(data["image"]), 8 * bs))], bs, prec, args, device)))
    spark = spark_session(args.spark_tasks, args.arrow_batch)
    try:
        print(table("Through Spark (featurize's mapInPandas) vs direct, at the best direct setting:",
                    "| modality | batch | precision | direct items/s | Spark items/s | Spark/direct | vs target |",
                    spark_vs_direct(spark, data, best, args, device)))
        print(table("Scorer (pairs/s), fp32:", "| batch | device | direct | Spark | Spark/direct |",
                    scorer_rows(spark, args, device)))
    finally:
        spark.stop()
    print(table(f"Training, one process ({args.lists} lists of 20, {args.epochs} epochs):",
                "| lists per step | precision | train lists/s |", training_rows(args, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
