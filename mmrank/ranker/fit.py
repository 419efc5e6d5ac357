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

import io
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
from mmrank.encoders.device import autocast_dtype, needs_grad_scaler
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


def _reduce(values: list[float], allreduce: Callable[[torch.Tensor], torch.Tensor] | None,
            device: torch.device | None = None) -> list[float]:
    """Sum across ranks (the backends' all-reduces sum: `gain_z` needs list counts, not only ratios).

    The tensor lives on `device` (the model's): an NCCL process group only carries CUDA tensors, and a
    `cpu:gloo,cuda:nccl` group (`process_group_backend`) routes each tensor by its device.
    """
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return (allreduce(t) if allreduce is not None else t).cpu().tolist()


@dataclass
class Amp:
    """Mixed precision of one training run: autocast dtype (None = fp32) and the fp16 loss scaler."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @classmethod
    def of(cls, precision: str, device: torch.device) -> "Amp":
        dtype = autocast_dtype(precision, device)
        return cls(dtype, torch.amp.GradScaler(device.type) if needs_grad_scaler(dtype) else None)


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """backward + optimizer step, through the loss scaler when there is one. A Horovod DistributedOptimizer
    all-reduces gradients asynchronously: it is synchronized before the scaler reads (unscales) them."""
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    if hasattr(opt, "synchronize") and hasattr(opt, "skip_synchronize"):  # horovod.torch.DistributedOptimizer
        opt.synchronize()
        with opt.skip_synchronize():
            scaler.step(opt)
    else:
        scaler.step(opt)
    scaler.update()


def _train_epoch(model: nn.Module, data: Iterable[Batch], opt: torch.optim.Optimizer, loss_fn: LossFn,
                 device: torch.device, amp: Amp | None = None) -> tuple[float, int]:
    """One pass; returns (sum over batches of loss * lists, number of lists)."""
    amp = amp or Amp(None, None)
    model.train()
    loss_sum, n = 0.0, 0
    for batch in data:
        batch = _to(batch, device)
        opt.zero_grad()  # set_to_none is the default; Horovod 0.28 accepts no argument
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            scores = model(batch)
        loss = loss_fn(scores.float(), batch["grades"])
        _step(loss, opt, amp.scaler)
        b = int(batch["grades"].shape[0])
        loss_sum += float(loss.detach()) * b
        n += b
    return loss_sum, n


@torch.no_grad()
def validation_sums(model: nn.Module, data: Iterable[Batch], paired: str | None = None) -> list[float]:
    """[sum, count] per VAL_KEYS (flattened) over lists with a relevant item (rule `skip`), for all-reduce.
    With `paired` (a VAL_KEYS metric) and a model with a prior (`prior_scores`), three more entries: the sum and
    sum of squares of the per-list gain of `paired` over the prior's ranking, and their count."""
    model.eval()
    device = _device(model)
    sums = np.zeros(2 * len(VAL_KEYS) + (3 if paired else 0))
    for batch in data:
        batch = _to(batch, device)
        scores, grades = model(batch).cpu().numpy(), batch["grades"].cpu().numpy()
        hr = has_relevant(grades)
        values = per_list_metrics(scores, grades, VAL_KS)
        for i, key in enumerate(VAL_KEYS):
            sums[2 * i] += values[key][hr].sum()
            sums[2 * i + 1] += hr.sum()
        inner = getattr(model, "module", model)                    # a DDP-wrapped model holds it in .module
        prior = inner.prior_scores(batch) if paired and hasattr(inner, "prior_scores") else None
        if prior is not None:
            gain = (values[paired] - per_list_metrics(prior.cpu().numpy(), grades, VAL_KS)[paired])[hr]
            sums[-3:] += (gain.sum(), (gain ** 2).sum(), hr.sum())
    return sums.tolist()


def gain_z(sums: list[float]) -> float:
    """Paired z of the mean per-list gain over the prior from `validation_sums`' last three entries (sum, sum of
    squares, count): mean / (sd / sqrt(n)); +inf for a positive gain without spread, nan without lists."""
    total, squares, n = sums
    if n < 1:
        return float("nan")
    mean = total / n
    var = max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)
    if var <= 1e-12 * (mean * mean + 1e-12):  # no spread (up to rounding)
        return math.inf if mean > 0 else 0.0
    return mean / math.sqrt(var / n)


def _metrics_from_sums(sums: list[float]) -> dict[str, float]:
    return {key: (sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] > 0 else float("nan"))
            for i, key in enumerate(VAL_KEYS)}


def _better(value: float, best: float) -> bool:
    return not math.isnan(value) and (math.isnan(best) or value > best)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """One-object write (`mmrank.storage.write_atomic`, safe on object stores) of a dict of tensors / plain
    values, loadable with weights_only=True; `path` may be a local path or a storage URI."""
    from mmrank.storage import write_atomic

    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def _checkpoint_file(checkpoint_dir: str | os.PathLike) -> str:
    from mmrank.storage import join

    return join(checkpoint_dir, CHECKPOINT_FILE)


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The last checkpoint written by `fit` in `checkpoint_dir` (a local path or storage URI; never
    unpickles code), or None."""
    from mmrank.storage import location

    path = location(checkpoint_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return torch.load(io.BytesIO(path.read_bytes()), weights_only=True, map_location="cpu")


def fit(model: nn.Module, train_data: DataFn, val_data: DataFn, cfg: TrainConf, *,
        loss: LossFn | str | None = None, rank: int = 0, world_size: int = 1,
        wrap_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
        allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        on_epoch_end: Callable[[int, dict[str, float]], bool | None] | None = None) -> FitResult:
    """Train `model` in place with Adam(lr, weight_decay) and early stopping on `cfg.early_stopping_metric`.

    `train_data(epoch)` / `val_data(epoch)` return this rank's batches for that epoch (shuffling must be
    seeded by epoch). `loss`: a loss function or registered name; default `cfg.loss`. `allreduce(t)` is
    applied to a float64 tensor of sums/counts (train loss and validation metrics) and must sum.
    Rank 0 writes `checkpoint_dir/checkpoint.pt` after every epoch (model, optimizer, epoch, best metric and
    weights, history, RNG state); `resume=True` continues after the last checkpointed epoch (every rank reads
    it). `on_epoch_end(epoch, record)` may return True to stop. The untrained model is validated first and is the
    one to beat: an epoch's weights are kept only when they improve on it (a model whose untrained ranking is a
    prior never ends below that prior on validation) and, with a prior, only when the paired per-list gain over
    the prior's ranking is at least `cfg.prior_gate_z` standard errors (`gain_z`; history gets `val_gain_z`).
    At the end the model holds the best weights (best validation value of that metric; the first epoch's if
    validation never had a relevant item), in eval mode.
    `world_size` is informational (data sharding is the data callables' job).
    """
    loss_fn = get_loss(loss or cfg.loss) if loss is None or isinstance(loss, str) else loss
    device = _device(model)
    amp = Amp.of(cfg.precision, device)
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if wrap_optimizer is not None:
        opt = wrap_optimizer(opt)
    ckpt_path = _checkpoint_file(checkpoint_dir) if checkpoint_dir else None

    watch = cfg.early_stopping_metric
    gate = watch if cfg.prior != "none" and cfg.prior_gate_z > 0 else None
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
        if amp.scaler is not None and ckpt.get("scaler"):
            amp.scaler.load_state_dict(ckpt["scaler"])

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
            loss_sum, n = _train_epoch(model, train_data(epoch), opt, loss_fn, device, amp)
            seconds = time.perf_counter() - t0
            train_seconds, train_lists = train_seconds + seconds, train_lists + n
            red = _reduce([loss_sum, n] + validation_sums(model, val_data(epoch), gate), allreduce, device)
            metrics = _metrics_from_sums(red[2:2 + 2 * len(VAL_KEYS)])
            z = gain_z(red[-3:]) if gate else math.inf
            record = {"epoch": epoch, "train_loss": red[0] / max(red[1], 1.0), "train_lists": n,
                      "seconds": seconds, **{f"val_{k}": v for k, v in metrics.items()}}
            if gate:
                record["val_gain_z"] = z
            history.append(record)
            if (_better(metrics[watch], best) and not z < cfg.prior_gate_z) or \
                    (best_epoch < 0 and math.isnan(metrics[watch])):
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
                    "initial_metrics": initial, "rng": torch.get_rng_state(),
                    "scaler": amp.scaler.state_dict() if amp.scaler else {}})
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


def build_model(dims: ModalityDims, cfg: TrainConf, init_state: dict[str, np.ndarray] | None = None,
                align: dict | None = None) -> FusionRanker:
    """FusionRanker with weights initialised from `cfg.seed` (same seed -> same initial weights), then the
    entries of `init_state` (e.g. the fitted `pca.*` buffers) copied in and, with `cfg.align.enabled`, the
    learned cross-modal projections `align` (`mmrank.ranker.align`) when given."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FusionRanker(dims, cfg)
    if init_state:
        state = model.state_dict()
        unknown = sorted(set(init_state) - set(state))
        if unknown:
            raise KeyError(f"init_state has entries the model does not: {unknown}")
        model.load_state_dict({**state, **{k: torch.as_tensor(np.asarray(v)) for k, v in init_state.items()}})
    if align is not None and cfg.align.enabled:
        model.set_alignment({k: torch.as_tensor(v) for k, v in align.items()})
    return model


def train_local(train_batches: Batch, val_batches: Batch, dims: ModalityDims, cfg: TrainConf,
                align: dict | None = None, **fit_kwargs) -> tuple[FusionRanker, FitResult]:
    """Single-process training on in-memory batch dicts; returns (best model in eval mode, FitResult). With
    `cfg.pca_dim` the PCA is fitted on `train_batches`; with `cfg.prune_sparsity` the result is pruned."""
    from mmrank.ranker.compress import prune_model
    from mmrank.ranker.pca import moments_of_batch, pca_init_state

    init = pca_init_state(moments_of_batch(train_batches, dims), dims, cfg.pca_dim) if cfg.pca_dim else None
    model = build_model(dims, cfg, init, align)
    result = fit(model, batches_fn(train_batches, cfg.batch_size, True, cfg.seed),
                 batches_fn(val_batches, cfg.batch_size, False, cfg.seed), cfg, **fit_kwargs)
    return prune_model(model, cfg.prune_sparsity), result
