"""Ranking quality benchmark: the `evaluate` stage on the generated sample, the fashion images and the Home Depot
relevance judgments (real human grades, text only).

    python bench/quality.py                       # the embedded default sample (generator.*) and fashion, seed 13
    python bench/quality.py --seeds 13 14 15 --n-queries 400
    python bench/quality.py --dataset homedepot --seeds 13 14 15 [--train-queries 200] [--finetune adapter]
    python bench/quality.py --ablation --seeds 13 14 --ablation-epochs 20   # fusion x head grid + compression

Each dataset gets a lakehouse under `--root` (fresh unless `--reuse`); the pipeline is its ingestion -> labels
-> featurize -> lexical -> training_lists, then once per model seed: train (the artifact `fusion`, with its
hyperparameter search) -> evaluate (the query split is fixed by `--split-seed`). `--train-queries N` keeps a
seeded sample of N training queries (and a proportional validation sample; all test queries);
`--finetune MODE` fine-tunes the text tower on the lists first and re-featurizes with it (in a lakehouse of its
own). Prints one Markdown table per dataset (mean and, with several seeds, sd over seeds), the headline
comparisons and paired per-query bootstrap intervals of the key NDCG@10 gaps (per-query values averaged over
seeds). Metrics also land in each lakehouse's `metrics` table and report.
With `--ablation` the evaluate stage runs once per dataset with `evaluate.ablation` (every fusion x every head,
each trained for every seed, plus the compression table: `mmrank.ranker.ablation`) instead of the per-seed
model comparison, and its `ablation_<dataset>.md` is printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from quality_data import HOMEDEPOT_SETS, copy_lakehouse, finetune_and_refeaturize, prepare, sample_train_queries  # noqa: E402,E501

from mmrank.cli import setup_logging  # noqa: E402
from mmrank.config import load_config  # noqa: E402
from mmrank.lakehouse import Lakehouse  # noqa: E402
from mmrank.ranker.compare import paired_bootstrap, verdict  # noqa: E402
from mmrank.report import md_table, metric_label  # noqa: E402

log = logging.getLogger("mmrank")
DATASETS = ("sample", "fashion", "homedepot")
FUSED = ("fusion", "gated_fusion", "concat_fusion")
SINGLE = ("text_only", "image_only", "audio_only")
SPLIT_DOC = {"test": "grades = training labels", "test_judgments": "same test lists graded by judgments"}


def _lakehouse(root: Path, args, extra: list[str]) -> Lakehouse:
    from mmrank.spark import get_spark

    if root.exists() and not args.reuse:
        shutil.rmtree(root)
    sets = [f"storage.root={root}", f"storage.raw_dir={root}/_landing", f"storage.artifacts_dir={root}/_artifacts",
            f"storage.reports_dir={root}/_reports", f"storage.work_dir={root}/_work",
            f"train.seed={args.split_seed}", "train.backend=local", *extra, *args.set]
    cfg = load_config(args.conf, sets)
    return Lakehouse(get_spark(cfg), cfg)


def _evaluate(lh: Lakehouse, name: str, run_date: dt.date, seeds: list[int]) -> tuple[pd.DataFrame, list, dict]:
    """Per seed: train the artifact, evaluate every model. Returns (metric rows, report paths, per-query NDCG@10
    [seeds, queries] per model and target split)."""
    from mmrank.stages import evaluate, train

    frames, notes, per_q = [], [], {}
    for seed in seeds:
        cfg = lh.cfg.model_copy(update={"train": lh.cfg.train.model_copy(update={"seed": seed})})
        # the split is stored in training_lists: changing train.seed here only changes model init/shuffling
        run_lh = Lakehouse(lh.spark, cfg)
        try:
            log.info("bench: train seed %d %s", seed, train.run(run_lh, run_date, backend="local"))
        except Exception as e:  # the artifact model is optional for the benchmark; say why it is missing
            log.warning("bench: train failed (%s: %s); `fusion` artifact not evaluated", type(e).__name__, e)
        out: dict = {}
        evaluate.run(run_lh, run_date, dataset=f"{name}_seed{seed}", per_query_out=out)
        frames.append(run_lh.read("metrics").where(f"dataset = '{name}_seed{seed}'").toPandas().assign(seed=seed))
        notes.append(run_lh.paths.reports(run_date) / f"evaluation_{name}_seed{seed}.md")
        for key, values in out.items():  # (target, model) -> {query_id: NDCG@10}, aligned by sorted query id
            per_q.setdefault(key, []).append(np.array([values[q] for q in sorted(values)], np.float64))
    return pd.concat(frames), notes, {k: np.stack(v) for k, v in per_q.items()}


def summary(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """model x metric table of `mean` (or `mean ± sd` over seeds), models in a fixed order."""
    rows = rows.assign(label=[metric_label(m, k) for m, k in zip(rows["metric"], rows["k"])])
    g = rows.groupby(["model_name", "label"])["value"]
    mean = g.mean().unstack()
    order = [m for m in (*FUSED, *SINGLE, "lightgbm_lambdamart", "bm25", "similarity") if m in mean.index]
    cols = [c for c in ("ndcg@5", "ndcg@10", "dcg@10", "map", "mrr") if c in mean.columns]
    return mean.loc[order, cols], g.std().unstack().loc[order, cols]


def _with_sd(mean: pd.DataFrame, sd: pd.DataFrame, n_seeds: int) -> str:
    if n_seeds == 1:
        return md_table(mean.rename_axis("model").reset_index())
    txt = mean.copy().astype(object)
    for c in mean.columns:
        txt[c] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mean[c], sd[c].fillna(0))]
    head = "| model | " + " | ".join(mean.columns) + " |"
    return "\n".join([head, "|---|" + "---:|" * len(mean.columns),
                      *("| " + n + " | " + " | ".join(r) + " |" for n, r in txt.iterrows())])


def headline(mean: pd.DataFrame) -> list[str]:
    col = "ndcg@10"
    out = []
    fused = [m for m in ("gated_fusion", "concat_fusion", "fusion") if m in mean.index]
    single = [m for m in SINGLE if m in mean.index]
    if fused and single:
        bs = max(single, key=lambda m: mean.loc[m, col])
        for f in fused:
            d = mean.loc[f, col] - mean.loc[bs, col]
            out.append(f"- {f} vs best single modality ({bs}): NDCG@10 {mean.loc[f, col]:.4f} vs "
                       f"{mean.loc[bs, col]:.4f} ({'+' if d >= 0 else ''}{d:.4f}) -> "
                       f"{'fusion better' if d > 0 else 'fusion NOT better'}")
    if "lightgbm_lambdamart" in mean.index and fused:
        bf = max(fused, key=lambda m: mean.loc[m, col])
        d = mean.loc["lightgbm_lambdamart", col] - mean.loc[bf, col]
        out.append(f"- lightgbm_lambdamart vs best fusion ({bf}): NDCG@10 "
                   f"{mean.loc['lightgbm_lambdamart', col]:.4f} vs {mean.loc[bf, col]:.4f} "
                   f"({'+' if d >= 0 else ''}{d:.4f})")
    return out


def _ablation(lh: Lakehouse, dataset: str, run_date: dt.date, args) -> str:
    """The evaluate stage with `evaluate.ablation` on (cheap mode otherwise); returns its ablation Markdown."""
    from mmrank.stages import evaluate

    ev = lh.cfg.evaluate.model_copy(update={"ablation": True, "baselines": False, "ablation_seeds": args.seeds,
                                            "ablation_max_epochs": args.ablation_epochs})
    run_lh = Lakehouse(lh.spark, lh.cfg.model_copy(update={"evaluate": ev}))
    name = f"{dataset}_ablation"
    t0 = time.perf_counter()
    evaluate.run(run_lh, run_date, dataset=name)
    text = (run_lh.paths.reports(run_date) / f"ablation_{name}.md").read_text()
    return text + f"\n(ablation: {time.perf_counter() - t0:.0f}s)\n"


def gaps(per_q: dict, target: str, models: list[str], boot: int) -> list[str]:
    """Paired per-query bootstrap of the key NDCG@10 gaps (per-query values averaged over seeds first)."""
    have = {m: np.nanmean(v, axis=0) for (t, m), v in per_q.items() if t == target}
    single = [m for m in SINGLE if m in have]
    pairs = [("fusion", b) for b in ("similarity", "bm25", "lightgbm_lambdamart", "text_only") if b in have]
    if len(single) > 1:
        best = max(single, key=lambda m: np.nanmean(have[m]))
        pairs += [(f, best) for f in ("fusion", "gated_fusion") if f in have]
    pairs += [("lightgbm_lambdamart", "similarity")] if "lightgbm_lambdamart" in have else []
    pairs = list(dict.fromkeys(pairs))          # fusion - text_only can come twice (text_only the best single)
    out = [f"Paired per-query bootstrap ({boot} resamples, 95%) of NDCG@10 differences on {target}:", "",
           "| comparison | mean diff | 95% interval | queries | verdict |", "|---|---:|---:|---:|---|"]
    for a, b in pairs:
        if a in have and b in have:
            ci = paired_bootstrap(have[a], have[b], n_boot=boot)
            out.append(f"| {a} - {b} | {ci['diff']:+.4f} | [{ci['lo']:+.4f}, {ci['hi']:+.4f}] | {ci['n']} | "
                       f"{verdict(ci)} |")
    return out + [""]


def _same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Same models, metrics and values (to float noise: the two targets are summed in different orders)."""
    return a.index.equals(b.index) and a.columns.equals(b.columns) and np.allclose(a.values, b.values, equal_nan=True)


def bench_dataset(dataset: str, args, extra_sets: list[str]) -> str:
    run_date = args.run_date
    name = dataset + (f"_train{args.train_queries}" if args.train_queries else "") + \
        (f"_ft-{args.finetune}" if args.finetune else "")
    root = Path(args.root) / (dataset + (f"_ft-{args.finetune}" if args.finetune else ""))
    if args.finetune:
        copy_lakehouse(Path(args.root) / dataset, root)
    lh = _lakehouse(root, args, extra_sets)
    t0 = time.perf_counter()
    prepare(lh, dataset, run_date, args)
    if args.ablation:
        n_lists = dict(lh.read("training_lists").groupBy("split").count().collect())
        return (f"## {dataset}: {n_lists.get('test', 0)} test queries (train {n_lists.get('train', 0)}, "
                f"validation {n_lists.get('validation', 0)}); split seed {args.split_seed}; loss "
                f"{lh.cfg.train.loss}; max_epochs {args.ablation_epochs or lh.cfg.train.max_epochs}\n\n"
                + _ablation(lh, dataset, run_date, args))
    if args.train_queries:
        log.info("bench: sampled lists %s", sample_train_queries(lh, args.train_queries, args.split_seed))
    ft_info = None
    if args.finetune:
        lh, ft_info = finetune_and_refeaturize(lh, run_date, args.finetune)
        if args.train_queries:
            sample_train_queries(lh, args.train_queries, args.split_seed)
    rows, reports, per_q = _evaluate(lh, name, run_date, args.seeds)
    n_lists = dict(lh.read("training_lists").groupBy("split").count().collect())
    out = [f"## {name}: {n_lists.get('test', 0)} test queries (train {n_lists.get('train', 0)}, "
           f"validation {n_lists.get('validation', 0)}); split seed {args.split_seed}; model seeds {args.seeds}; "
           f"loss {lh.cfg.train.loss}; list_size {lh.cfg.train.list_size}; {time.perf_counter() - t0:.0f}s", ""]
    if ft_info is not None:
        out += [f"text tower fine-tuned ({args.finetune}): {ft_info}", ""]
    tables = {split: summary(part) for split, part in rows.groupby("split")}  # test, then test_judgments
    if "test_judgments" in tables and _same(tables["test_judgments"][0], tables["test"][0]):
        del tables["test_judgments"]  # labels are the judgments (fashion, BYO): one table says it all
        out += ["(training labels are the judgments here, so `test` and `test_judgments` are the same table)", ""]
    for split, (mean, sd) in tables.items():
        out += [f"### {name} / {split} ({SPLIT_DOC.get(split, split)})", "",
                _with_sd(mean, sd, len(args.seeds)), "", *headline(mean), "",
                *gaps(per_q, split, list(mean.index), args.boot)]
    return "\n".join(out + ["reports: " + ", ".join(str(p) for p in reports), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--root", default="/tmp/mmrank_quality", help="fresh lakehouses are created under here")
    p.add_argument("--n-products", type=int, default=None, help="default: generator.n_products of the config")
    p.add_argument("--n-queries", type=int, default=None, help="default: generator.n_queries of the config")
    p.add_argument("--seeds", type=int, nargs="+", default=[13], help="model seeds (init, shuffling, LightGBM)")
    p.add_argument("--split-seed", type=int, default=13, help="train.seed used for the query split")
    p.add_argument("--run-date", type=dt.date.fromisoformat, default=dt.date(2026, 11, 21))
    p.add_argument("--reuse", action="store_true", help="keep an existing lakehouse under --root: data and features "
                   "already there are not rebuilt (lists, train and evaluation always run)")
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=["sample", "fashion"])
    p.add_argument("--skip-sample", action="store_true")
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--fashion-limit", type=int, default=None, help="use only this many fashion products")
    p.add_argument("--ablation", action="store_true", help="fusion x head grid (mean, sd over --seeds) and the "
                   "compression table instead of the model comparison")
    p.add_argument("--ablation-epochs", type=int, default=None, help="max_epochs per ablation model "
                   "(default: train.max_epochs)")
    p.add_argument("--homedepot-dir", default="../shared/data/homedepot", help="holds judgments.csv")
    p.add_argument("--train-queries", type=int, default=None, help="keep only this many training queries")
    p.add_argument("--finetune", choices=("adapter", "top", "all"), default=None,
                   help="fine-tune the text tower on the lists first (finetune.*), then re-featurize with it")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the paired intervals")
    args = p.parse_args(argv)
    setup_logging(False)
    cfg = load_config(args.conf, args.set)
    args.homedepot_dir = cfg.resolve_path(args.homedepot_dir)
    out = []
    if "sample" in args.dataset and not args.skip_sample:
        sizes = [f"generator.{k}={v}" for k, v in (("n_products", args.n_products), ("n_queries", args.n_queries))
                 if v is not None]
        out.append(bench_dataset("sample", args, sizes))
    if "fashion" in args.dataset and not args.skip_fashion:
        fashion_dir = cfg.resolve_path(cfg.ingest.fashion_dir)
        if not (fashion_dir / "styles.csv").exists():
            out.append(f"### fashion: skipped, no data at {fashion_dir} (styles.csv missing)\n")
        else:
            out.append(bench_dataset("fashion", args, []))
    if "homedepot" in args.dataset:
        from mmrank.data.homedepot import available

        if not available(args.homedepot_dir):
            out.append(f"### homedepot: skipped, no data at {args.homedepot_dir} (judgments.csv missing)\n")
        else:
            out.append(bench_dataset("homedepot", args, HOMEDEPOT_SETS))
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
