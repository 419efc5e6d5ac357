"""Scale: the nightly stages on generated data at three sizes, each 10x the last, under a small driver.

    python bench/scale.py                          # 1k, 10k, 100k products (queries = products / 10)
    python bench/scale.py --sizes 500,5000 --keep /tmp/scale   # any sizes; keep the lakehouses

Each size runs in its own process (a fresh JVM) with `spark.driver.memory=1g` and
`spark.driver.maxResultSize=64m`, so any collect that grows with the data fails loudly. The sample generator
writes the landing zone first (untimed: on a cluster it is fed upstream), then every nightly stage runs in
order (`mmrank.nightly.PIPELINE` without `generate`; train forced). Per stage and size it reports:
- wall time;
- CPU seconds of the whole process tree (driver Python + the JVM, which in local mode also runs the
  executors, + the Python workers): in local mode that is the executors' CPU plus the driver's;
- driver peak RSS: the driver Python process (VmHWM, reset before each stage) and the JVM (whose heap the
  1g limit caps; in local mode it also holds the executors' memory);
- rows in (the stage's input tables) and out (its output tables);
- the growth exponent between consecutive sizes: log(time ratio) / log(size ratio) (1 = linear).

Data per size N: N products (images 32x32, 0.25 s audio at 8 kHz), N/10 queries (20% voice), 20 candidates per
query, 5 sessions per query, one log day: 10 N log events. Encoders are configured small (the encoders' own
speed is bench/featurize.py's job): text = a random-init 2-layer BERT (hidden 32) with the MiniLM tokenizer,
image = ResNet-18 at 32 px + hand-crafted colour/texture features, audio = log-mel CNN (16 mels, 8 MFCC,
16 channels, 0.5 s). Training runs 2 epochs, LightGBM 50 trees. The three bounded driver samples are lowered to
fit the 64m maxResultSize (they do not grow with the data, but their defaults are sized for a larger driver):
the alignment's `train.align.max_pairs` 50,000 -> 10,000 products (50,000 x ~5 KB of embeddings is ~140 MB
here), the tuning trials' `train.tune.max_lists` 20,000 -> 500 lists per split (collecting the 100k size's
whole train split for them ran the 1g JVM out of heap) and the baselines'
`evaluate.driver_max_lists` 2,000 -> 500 lists. Everything else is the default.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUN_DATE = dt.date(2026, 11, 21)
SMALL_DRIVER = {"spark.driver.maxResultSize": "64m"}


def overrides(root: Path, n_products: int, bert: str) -> list[str]:
    extra = json.dumps(SMALL_DRIVER)
    return [f"storage.root={root}/lh", f"storage.raw_dir={root}/lh/_landing",
            f"storage.artifacts_dir={root}/lh/_artifacts", f"storage.reports_dir={root}/lh/_reports",
            f"storage.work_dir={root}/lh/_work", "spark.driver_memory=1g", f"spark.extra={extra}",
            f"generator.n_products={n_products}", f"generator.n_queries={max(5, n_products // 10)}",
            "generator.candidates_per_query=20", "generator.sessions_per_query=5", "generator.log_days=1",
            "generator.image_size=32", "generator.audio_seconds=0.25", "generator.audio_sample_rate=8000",
            f"features.text.path={bert}", "features.text.max_length=32", "features.image.image_size=32",
            "features.audio.sample_rate=8000", "features.audio.n_mels=16", "features.audio.n_mfcc=8",
            "features.audio.conv_channels=16", "features.audio.max_seconds=0.5", "features.device=cpu",
            "train.max_epochs=2", "train.patience=2", "train.data_loader=parquet", "train.align.max_pairs=10000",
            "train.tune.max_lists=500", "evaluate.driver_max_lists=500",
            "evaluate.lgbm_params={n_estimators: 50}", "score.similarity_top_k=20", "score.top_n=20"]


# ---- measuring (child process) ----------------------------------------------------------------------------
def _tree(pid: int):
    import psutil

    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


class CpuMeter:
    """CPU seconds (user + system) of a process tree, sampled every `every` seconds in a thread: each pid's last
    reading is kept after it exits (Spark's Python workers come and go), so a total never goes backwards; a
    process that lives less than `every` is missed, one that exits loses at most its last interval."""

    def __init__(self, pid: int, every: float = 0.25):
        import threading

        self.pid, self.every, self.seen = pid, every, {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for p in _tree(self.pid):
            try:
                t = p.cpu_times()
                with self._lock:
                    self.seen[(p.pid, p.create_time())] = t.user + t.system
            except Exception:  # exited between listing and reading
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def total(self) -> float:
        self._sample()
        with self._lock:
            return sum(self.seen.values())

    def stop(self) -> None:
        self._stop.set()


def reset_peak(pid: int) -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of a process (Linux: write 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rows_of(lh, tables) -> int:
    return sum(lh.read(t).count() for t in tables if lh.exists(t))


def run_size(n_products: int, root: Path, out: Path) -> None:
    """Child process: generate, then run and measure every nightly stage; results as JSON in `out`."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from mmrank.config import load_config
    from mmrank.data.landing import sample_layout, write_sample
    from mmrank.lakehouse import Lakehouse
    from mmrank.nightly import PIPELINE, NightlyOptions
    from mmrank.spark import get_spark
    from mmrank.testing.models import tiny_bert_dir

    root.mkdir(parents=True, exist_ok=True)
    bert = tiny_bert_dir(root / "bert")
    cfg = load_config(None, overrides(root, n_products, bert))
    t0 = time.perf_counter()
    counts = write_sample(cfg.generator, RUN_DATE, sample_layout(cfg.resolve_path(cfg.storage.raw_dir)).root)
    gen_s = time.perf_counter() - t0
    spark = get_spark(cfg)
    lh = Lakehouse(spark, cfg)
    jvm = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()  # noqa: SLF001
    me = os.getpid()
    opts = NightlyOptions(force_train=True)
    meter = CpuMeter(me)
    stages = []
    for step in PIPELINE:
        if step.name == "generate":
            continue
        fn = step.run
        inputs = getattr(_stage_fn(step.name), "inputs", ())
        outputs = getattr(_stage_fn(step.name), "outputs", ())
        rows_in = rows_of(lh, inputs)
        for pid in (me, jvm):
            reset_peak(pid)
        c0, w0 = meter.total(), time.perf_counter()
        fn(lh, RUN_DATE, opts)
        wall, cpu = time.perf_counter() - w0, meter.total() - c0
        stages.append({"stage": step.name, "wall_s": wall, "cpu_s": cpu, "driver_py_mb": peak_mb(me),
                       "driver_jvm_mb": peak_mb(jvm), "rows_in": rows_in, "rows_out": rows_of(lh, outputs)})
        print(f"[{n_products}] {step.name}: {wall:.1f}s wall, {cpu:.1f}s cpu", flush=True)
    meter.stop()
    out.write_text(json.dumps({"n_products": n_products, "generated": counts, "generate_s": gen_s,
                               "stages": stages, "load": os.getloadavg()}))


def _stage_fn(name: str):
    import importlib

    return importlib.import_module(f"mmrank.stages.{name}").run


# ---- orchestration and the table (parent process) ---------------------------------------------------------
def exponent(a: float, b: float, size_ratio: float) -> float:
    return math.log(b / a) / math.log(size_ratio) if a > 0 and b > 0 else float("nan")


def table(results: list[dict]) -> str:
    sizes = [r["n_products"] for r in results]
    head = ["stage"] + [f"{s:,} products: wall s / cpu s / driver py MB / jvm MB / rows in -> out" for s in sizes]
    head += [f"exponent {a:,}->{b:,} (wall / cpu)" for a, b in zip(sizes, sizes[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [s["stage"] for s in results[0]["stages"]]
    totals = [{"wall_s": 0.0, "cpu_s": 0.0} for _ in results]
    for i, name in enumerate(names):
        cells = [name]
        for r, tot in zip(results, totals):
            s = r["stages"][i]
            tot["wall_s"] += s["wall_s"]
            tot["cpu_s"] += s["cpu_s"]
            cells.append(f"{s['wall_s']:.1f} / {s['cpu_s']:.1f} / {s['driver_py_mb']:.0f} / "
                         f"{s['driver_jvm_mb']:.0f} / {s['rows_in']:,} -> {s['rows_out']:,}")
        for a, b in zip(results, results[1:]):
            ratio = b["n_products"] / a["n_products"]
            sa, sb = a["stages"][i], b["stages"][i]
            cells.append(f"{exponent(sa['wall_s'], sb['wall_s'], ratio):.2f} / "
                         f"{exponent(sa['cpu_s'], sb['cpu_s'], ratio):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**nightly (all stages)**"] + [f"{t['wall_s']:.1f} / {t['cpu_s']:.1f}" for t in totals]
    for (a, ta), (b, tb) in zip(zip(results, totals), zip(results[1:], totals[1:])):
        ratio = b["n_products"] / a["n_products"]
        cells.append(f"{exponent(ta['wall_s'], tb['wall_s'], ratio):.2f} / "
                     f"{exponent(ta['cpu_s'], tb['cpu_s'], ratio):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="products per size, comma-separated")
    ap.add_argument("--keep", default=None, help="folder to keep the lakehouses in (default: a temp folder, deleted)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        run_size(args.child, Path(args.root), Path(args.out))
        return 0
    base = Path(args.keep or tempfile.mkdtemp(prefix="mmrank-scale-"))
    results = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            out = base / f"result_{n}.json"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--root", str(base / f"n{n}"),
                                   "--out", str(out)], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            if proc.returncode != 0:
                print(f"size {n}: the nightly FAILED (exit {proc.returncode}); see the output above")
                return 1
            results.append(json.loads(out.read_text()))
            print(f"size {n}: done in {time.perf_counter() - t0:.0f}s (generation {results[-1]['generate_s']:.0f}s, "
                  f"untimed)", flush=True)
            if not args.keep:
                shutil.rmtree(base / f"n{n}", ignore_errors=True)
        g = results[-1]["generated"]
        print(f"\nnightly stages under spark.driver.memory=1g, spark.driver.maxResultSize=64m (largest size: "
              f"{g['products']:,} products, {g['queries']:,} queries, {g['log_events']:,} log events); "
              f"load average at the end of each size: "
              + ", ".join(f"{r['n_products']:,}: {r['load'][0]:.1f}" for r in results) + "\n")
        print(table(results))
        py = [max(s["driver_py_mb"] for s in r["stages"]) for r in results]
        print(f"\ndriver (Python) peak RSS, largest / smallest size: {py[-1]:.0f} / {py[0]:.0f} MB = "
              f"{py[-1] / py[0]:.2f}x")
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
