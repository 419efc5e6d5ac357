"""The training loop shared by every backend (local, Horovod, TorchDistributor).

`fit` knows nothing about Spark or process groups: a backend passes per-rank data callables and two hooks,
`wrap_optimizer` (e.g. `hvd.DistributedOptimizer`) and `allreduce` (e.g. `hvd.allreduce` / a
`torch.distributed.all_reduce` wrapper). Broadcasting the initial weights is the backend's job.

Determinism: at the start of every epoch the global torch RNG is re-seeded from (cfg.seed, epoch, rank), and
`torch.use_deterministic_algorithms(True)` is on while `fit` runs (restored afterwards). So two runs with the
same seed, model init and data give bitwise-identical weights on CPU, and a run resumed from a checkpoint
continues exactly as the uninterrupted one (data callables must themselves depend only on `epoch`).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from mmrank.config import VALIDATION_METRICS, TrainConf
from mmrank.modalities import ModalityDims
from mmrank.ranker.batch import Batch, iterate_batches
from mmrank.ranker.losses import LossFn, get_loss
from mmrank.ranker.metrics import has_relevant, per_list_metrics
from mmrank.ranker.model import FusionRanker

log = logging.getLogger("mmrank.fit")

VAL_KEYS = VALIDATION_METRICS  # computed every epoch; `train.early_stopping_metric` picks the one to follow
VAL_KS = tuple(sorted({int(k.split("@")[1]) for k in VAL_KEYS if "@" in k}))
CHECKPOINT_FILE = "checkpoint.pt"
_SEED_STRIDE_EPOCH, _SEED_STRIDE_RANK = 1_000_003, 7_919

DataFn = Callable[[int], Iterable[Batch]]


@dataclass
class FitResult:
    """Outcome of `fit`. `best_metrics`: validation metrics (VAL_KEYS, rule `skip`) of the kept weights;
    `best_epoch` -1 = no epoch beat the untrained model (`initial_metrics`), which is kept.
    `history`: one dict per epoch with `epoch`, `train_loss`, `val_<metric>`, `train_lists`, `seconds`."""

    best_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_sec: float = 0.0
    stopped_early: bool = False
    initial_metrics: dict[str, float] = field(default_factory=dict)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the global torch RNG for (epoch, rank): dropout and modality dropout depend only on it."""
    return int(seed) + _SEED_STRIDE_EPOCH * epoch + _SEED_STRIDE_RANK * rank


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _reduce(values: list[float], allreduce: Callable[[torch.Tensor], torch.Tensor] | None) -> list[float]:
    """Sum-or-average across ranks; callers only use ratios, so either reduction gives the same result."""
    t = torch.tensor(values, dtype=torch.float64)
    return (allreduce(t) if allreduce is not None else t).tolist()


def _train_epoch(model: nn.Module, data: Iterable[Batch], opt: torch.optim.Optimizer, loss_fn: LossFn,
                 device: torch.device) -> tuple[float, int]:
    """One pass; returns (sum over batches of loss * lists, number of lists)."""
    model.train()
    loss_sum, n = 0.0, 0
    for batch in data:
        batch = _to(batch, device)
        opt.zero_grad()  # set_to_none is the default; Horovod 0.28 accepts no argument
        loss = loss_fn(model(batch), batch["grades"])
        loss.backward()
        opt.step()
        b = int(batch["grades"].shape[0])
        loss_sum += float(loss.detach()) * b
        n += b
    return loss_sum, n


@torch.no_grad()
def validation_sums(model: nn.Module, data: Iterable[Batch]) -> list[float]:
    """[sum, count] per VAL_KEYS (flattened) over lists with a relevant item (rule `skip`), for all-reduce."""
    model.eval()
    device = _device(model)
    sums = np.zeros(2 * len(VAL_KEYS))
    for batch in data:
        batch = _to(batch, device)
        scores, grades = model(batch).cpu().numpy(), batch["grades"].cpu().numpy()
        hr = has_relevant(grades)
        values = per_list_metrics(scores, grades, VAL_KS)
        for i, key in enumerate(VAL_KEYS):
            sums[2 * i] += values[key][hr].sum()
            sums[2 * i + 1] += hr.sum()
    return sums.tolist()


def _metrics_from_sums(sums: list[float]) -> dict[str, float]:
    return {key: (sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] > 0 else float("nan"))
            for i, key in enumerate(VAL_KEYS)}


def _better(value: float, best: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write of a dict of tensors / plain values (loadable with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(checkpoint_dir: str | Path) -> dict | None:
    """The last checkpoint written by `fit` in `checkpoint_dir` (never unpickles code), or None."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None


def fit(model: nn.Module, train_data: DataFn, val_data: DataFn, cfg: TrainConf, *,
        loss: LossFn | str | None = None, rank: int = 0, world_size: int = 1,
        wrap_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
        allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        on_epoch_end: Callable[[int, dict[str, float]], bool | None] | None = None) -> FitResult:
    """Train `model` in place with Adam(lr, weight_decay) and early stopping on `cfg.early_stopping_metric`.

    `train_data(epoch)` / `val_data(epoch)` return this rank's batches for that epoch (shuffling must be
    seeded by epoch). `loss`: a loss function or registered name; default `cfg.loss`. `allreduce(t)` is
    applied to a float64 tensor of sums/counts (train loss and validation metrics); it may sum or average.
    Rank 0 writes `checkpoint_dir/checkpoint.pt` after every epoch (model, optimizer, epoch, best metric and
    weights, history, RNG state); `resume=True` continues after the last checkpointed epoch (every rank reads
    it). `on_epoch_end(epoch, record)` may return True to stop. The untrained model is validated first and is the
    one to beat: an epoch's weights are kept only when they improve on it (a model whose untrained ranking is a
    prior never ends below that prior on validation). At the end the model holds the best weights (best validation
    value of that metric; the first epoch's if validation never had a relevant item), in eval mode.
    `world_size` is informational (data sharding is the data callables' job).
    """
    loss_fn = get_loss(loss or cfg.loss) if loss is None or isinstance(loss, str) else loss
    device = _device(model)
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if wrap_optimizer is not None:
        opt = wrap_optimizer(opt)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None

    watch = cfg.early_stopping_metric
    start, best, best_epoch, bad, history = 0, float("nan"), -1, 0, []
    best_state, best_metrics, stopped = _state_copy(model), {k: float("nan") for k in VAL_KEYS}, False
    initial: dict[str, float] = {}
    ckpt = load_checkpoint(checkpoint_dir) if resume and checkpoint_dir else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, best, best_epoch, bad = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"], ckpt["bad_epochs"]
        history, best_state, best_metrics = ckpt["history"], ckpt["best_model"], ckpt["best_metrics"]
        stopped, initial = ckpt["stopped"], ckpt.get("initial_metrics", {})
        torch.set_rng_state(ckpt["rng"])

    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch.set_num_threads(cfg.torch_threads)  # small MLP: more threads only fight Spark's workers for cores
    train_seconds, train_lists = 0.0, 0
    try:
        if ckpt is None:  # the untrained model is the one to beat
            initial = _metrics_from_sums(_reduce(validation_sums(model, val_data(0)), allreduce))
            best, best_metrics = initial[watch], dict(initial)
        for epoch in range(start, cfg.max_epochs):
            if stopped:
                break
            torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
            t0 = time.perf_counter()
            loss_sum, n = _train_epoch(model, train_data(epoch), opt, loss_fn, device)
            seconds = time.perf_counter() - t0
            train_seconds, train_lists = train_seconds + seconds, train_lists + n
            red = _reduce([loss_sum, n] + validation_sums(model, val_data(epoch)), allreduce)
            metrics = _metrics_from_sums(red[2:])
            record = {"epoch": epoch, "train_loss": red[0] / max(red[1], 1.0), "train_lists": n,
                      "seconds": seconds, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(record)
            if _better(metrics[watch], best) or (best_epoch < 0 and math.isnan(metrics[watch])):
                best, best_epoch, bad, best_metrics = metrics[watch], epoch, 0, metrics
                best_state = _state_copy(model)
            else:
                bad += 1
            hook_stop = bool(on_epoch_end(epoch, record)) if on_epoch_end is not None else False
            stopped = bad >= cfg.patience or hook_stop
            if ckpt_path is not None and rank == 0:
                _save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "best_metric": best, "best_epoch": best_epoch, "bad_epochs": bad, "best_model": best_state,
                    "best_metrics": best_metrics, "history": history, "stopped": stopped,
                    "initial_metrics": initial, "rng": torch.get_rng_state()})
            if rank == 0:
                log.info("epoch %d/%d done: train_loss %.4f val_%s %.4f%s", epoch + 1, cfg.max_epochs,
                         record["train_loss"], watch, metrics[watch],
                         ", checkpoint saved" if ckpt_path is not None else "")
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_metrics=dict(best_metrics), best_epoch=best_epoch, epochs_run=len(history),
                     history=list(history), samples_per_sec=train_lists / train_seconds if train_seconds else 0.0,
                     stopped_early=stopped, initial_metrics=dict(initial))


def batches_fn(batch: Batch, batch_size: int, shuffle: bool, seed: int) -> DataFn:
    """Data callable over an in-memory batch: epoch -> sub-batches, shuffled with seed + epoch."""
    return lambda epoch: iterate_batches(batch, batch_size, shuffle=shuffle, seed=seed + epoch)


def build_model(dims: ModalityDims, cfg: TrainConf, align: dict | None = None) -> FusionRanker:
    """FusionRanker with weights initialised from `cfg.seed` (same seed -> same initial weights) and, with
    `cfg.align.enabled`, the learned cross-modal projections `align` (`mmrank.ranker.align`) when given."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FusionRanker(dims, cfg)
    if align is not None and cfg.align.enabled:
        model.set_alignment({k: torch.as_tensor(v) for k, v in align.items()})
    return model


def train_local(train_batches: Batch, val_batches: Batch, dims: ModalityDims, cfg: TrainConf,
                align: dict | None = None, **fit_kwargs) -> tuple[FusionRanker, FitResult]:
    """Single-process training on in-memory batch dicts; returns (best model in eval mode, FitResult)."""
    model = build_model(dims, cfg, align)
    result = fit(model, batches_fn(train_batches, cfg.batch_size, True, cfg.seed),
                 batches_fn(val_batches, cfg.batch_size, False, cfg.seed), cfg, **fit_kwargs)
    return model, result
