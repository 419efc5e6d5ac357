"""Training backends behind one call: `train_with_backend(lh, train_cfg, dims, ...) -> TrainOutcome`.

- `local`: one process, the driver (rank 0 of 1).
- `horovod`: `horovod.spark.run` starts `num_proc` Spark tasks, on the cluster's executors when there is one
  (gloo on CPU; NCCL when Horovod was built with it and GPUs are visible); `hvd.DistributedOptimizer` averages
  gradients, `hvd.allreduce` sums metrics. Each rank trains on the GPU Spark gave its task
  (`horovod.spark.task.get_available_devices()`).
- `torch_distributor`: `pyspark.ml.torch.distributor.TorchDistributor` runs `num_proc` torchrun processes:
  on a cluster (`local_mode=False`) as barrier tasks on the executors, under a `local[...]` master on the
  driver (`local_mode=True`); DistributedDataParallel (gloo on CPU; on GPU a `cpu:gloo,cuda:nccl` group, so
  CUDA tensors go over NCCL and CPU ones over gloo), `all_reduce` sums metrics. Rank r uses cuda:LOCAL_RANK
  among the GPUs TorchDistributor made visible (Spark's assignment).
On a cluster the ranks read the training data, and rank 0 writes its checkpoints, through shared storage
(`storage.work_dir`: the petastorm cache, the checkpoints), and import the package the job shipped
(`--py-files`; `mmrank.spark` puts it on the executors' PYTHONPATH for the processes tasks start).

Every backend runs the same `run_worker` on each rank: same initial weights (seeded and broadcast), same
per-rank loaders (`mmrank.distributed.loaders`), same `mmrank.ranker.fit.fit`. What crosses process
boundaries is plain data: a `WorkerJob` (TrainConf dump, dims, loader specs, checkpoint dir) in and, from
rank 0, a `WorkerResult` (state_dict as numpy arrays + FitResult) back. Rank 0 checkpoints every epoch to
`checkpoint_dir`; `resume=True` continues from the last checkpoint there.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mmrank.config import TrainConf
from mmrank.distributed.loaders import LoaderSpec, make_loader, prepare_specs
from mmrank.encoders.device import process_group_backend, resolve_device
from mmrank.lakehouse import Lakehouse
from mmrank.modalities import ModalityDims
from mmrank.ranker.fit import FitResult, build_model, fit
from mmrank.ranker.model import FusionRanker
from mmrank.registry import BACKENDS

log = logging.getLogger("mmrank")


@dataclass(frozen=True)
class WorkerJob:
    """What every rank needs; picklable (no Spark, no lakehouse)."""

    train: dict[str, Any]           # TrainConf.model_dump()
    dims: ModalityDims
    train_spec: LoaderSpec
    val_spec: LoaderSpec
    checkpoint_dir: str | None = None
    resume: bool = False
    init_state: dict[str, np.ndarray] | None = None  # entries copied into the fresh model (fitted PCA buffers)
    align: dict[str, np.ndarray] | None = None   # learned cross-modal projections (mmrank.ranker.align)


@dataclass
class WorkerResult:
    """Rank 0's trained weights (numpy, so no torch pickling across processes) and fit outcome."""

    state: dict[str, np.ndarray]
    fit: FitResult


@dataclass
class TrainOutcome:
    model: FusionRanker
    fit: FitResult
    backend: str
    world_size: int
    data_loader: str


def _sum(t: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _device(local_rank: int) -> torch.device:
    """This rank's device: the GPU Spark assigned to the task hosting it when there is one (Horovod on Spark),
    else `local_rank` among the visible GPUs (torchrun under TorchDistributor, which narrows
    CUDA_VISIBLE_DEVICES to Spark's GPUs first), else CPU. The current CUDA device is set to it."""
    device = resolve_device("auto", local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def run_worker(job: WorkerJob, rank: int = 0, world_size: int = 1, *,
               prepare: Callable[[FusionRanker], torch.nn.Module] | None = None,
               device: torch.device | None = None, **fit_hooks: Any) -> WorkerResult | None:
    """Train on this rank; returns the result on rank 0, None elsewhere.

    `prepare(model)` returns the module to train (e.g. DDP-wrapped, or broadcast in place); `fit_hooks` are
    `wrap_optimizer` / `allreduce` passed to `fit`.
    """
    cfg = TrainConf.model_validate(job.train)
    model = build_model(job.dims, cfg, job.init_state, job.align).to(device or torch.device("cpu"))
    trained = prepare(model) if prepare is not None else model
    train_loader = make_loader(job.train_spec, rank, world_size)
    val_loader = make_loader(job.val_spec, rank, world_size)
    result = fit(trained, train_loader.epoch_batches, val_loader.epoch_batches, cfg, rank=rank,
                 world_size=world_size, checkpoint_dir=job.checkpoint_dir, resume=job.resume, **fit_hooks)
    if rank != 0:
        return None
    return WorkerResult({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}, result)


# ---- per-backend worker entry points (top-level functions: pickled to Spark tasks / torchrun) ----------
def horovod_worker(job: WorkerJob) -> WorkerResult | None:
    """One Horovod rank (runs inside a Spark task)."""
    import horovod.torch as hvd

    hvd.init()
    device = _device(hvd.local_rank())

    held: dict[str, FusionRanker] = {}

    def prepare(model: FusionRanker) -> FusionRanker:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        held["model"] = model
        return model

    def wrap_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # A fresh Adam is identical on every rank and a resumed one is loaded from the same checkpoint by
        # every rank; broadcasting an empty state would take a zero-gradient step (which moves the weights
        # through weight decay), so only non-empty state is broadcast.
        if opt.state_dict()["state"]:
            hvd.broadcast_optimizer_state(opt, root_rank=0)
        return hvd.DistributedOptimizer(opt, named_parameters=held["model"].named_parameters())

    try:
        return run_worker(job, hvd.rank(), hvd.size(), prepare=prepare, device=device,
                          wrap_optimizer=wrap_optimizer, allreduce=lambda t: hvd.allreduce(t, op=hvd.Sum))
    finally:
        hvd.shutdown()


def torch_distributor_worker(job: WorkerJob) -> WorkerResult | None:
    """One torchrun rank started by TorchDistributor (RANK/WORLD_SIZE/MASTER_* come from torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = _device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(process_group_backend(device.type))  # metric sums / objects are CPU tensors: gloo
    try:
        ddp = lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)  # noqa: E731
        out = run_worker(job, dist.get_rank(), dist.get_world_size(), prepare=ddp, device=device,
                         allreduce=_sum)
        # TorchDistributor (local mode) keeps whichever rank's return value is written last: every rank
        # returns rank 0's result.
        box = [out]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    finally:
        dist.destroy_process_group()


# ---- launchers (driver) -----------------------------------------------------------------------------------
@BACKENDS.register("local")
def _launch_local(job: WorkerJob, num_proc: int) -> WorkerResult:
    """In the driver; `fit` sets `train.torch_threads` intra-op threads, as on every distributed rank."""
    return run_worker(job, 0, 1)


def _spark_context():
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context  # noqa: SLF001 - the session the stage runs in
    if sc is None:
        raise RuntimeError("distributed training needs an active SparkSession (mmrank.spark.get_spark)")
    return sc


def on_cluster() -> bool:
    """True when the active session's master is a cluster (standalone, YARN, Kubernetes), not `local[...]`."""
    return not _spark_context().master.startswith("local")


def executors_have_gpus() -> bool:
    """On a cluster: whether tasks are given GPUs (`spark.task.resource.gpu.amount`); the driver's own GPUs
    (a CPU driver with GPU workers has none) say nothing. Locally: whether this machine has one."""
    if not on_cluster():
        return torch.cuda.is_available()
    return float(_spark_context().getConf().get("spark.task.resource.gpu.amount", "0") or 0) > 0


@BACKENDS.register("horovod")
def _launch_horovod(job: WorkerJob, num_proc: int) -> WorkerResult:
    """`num_proc` Horovod ranks as Spark tasks (the executors' own environment and Python)."""
    import horovod.spark

    python = _spark_context().pythonExec or os.environ.get("PYSPARK_PYTHON")
    results = horovod.spark.run(horovod_worker, args=(job,), num_proc=num_proc, use_gloo=True, verbose=0,
                                executable=python)
    return results[0]


@BACKENDS.register("torch_distributor")
def _launch_torch_distributor(job: WorkerJob, num_proc: int) -> WorkerResult:
    """torchrun ranks as barrier tasks on the executors (cluster) or driver processes (`local[...]`)."""
    from pyspark.ml.torch.distributor import TorchDistributor

    local = not on_cluster()
    log.info("TorchDistributor: %d process(es), local_mode=%s", num_proc, local)
    dist = TorchDistributor(num_processes=num_proc, local_mode=local, use_gpu=executors_have_gpus())
    return dist.run(torch_distributor_worker, job)


def world_size_of(backend: str, num_proc: int) -> int:
    return 1 if backend == "local" else num_proc


def train_with_backend(lh: Lakehouse, train_cfg: TrainConf, dims: ModalityDims, *, backend: str | None = None,
                       data_loader: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                       resume: bool = False, init_state: dict[str, np.ndarray] | None = None,
                       align: dict[str, np.ndarray] | None = None) -> TrainOutcome:
    """Train a FusionRanker on `training_lists` (train / validation splits) with `backend` (default
    `train_cfg.backend`) on `train_cfg.num_proc` processes; returns rank 0's best model in eval mode.
    `init_state`: model entries set before training on every rank (the fitted PCA); `align`: cross-modal
    projections every rank's model starts from (`mmrank.ranker.align`)."""
    backend = BACKENDS.check(backend or train_cfg.backend)
    kind = data_loader or train_cfg.data_loader
    world = world_size_of(backend, train_cfg.num_proc)
    with prepare_specs(lh, train_cfg, dims, world, kind=kind) as specs:
        job = WorkerJob(train_cfg.model_dump(mode="json"), dims, specs["train"], specs["validation"],
                        str(checkpoint_dir) if checkpoint_dir else None, resume, init_state, align)
        log.info("training with backend %s on %d process(es), data loader %s", backend, world, kind)
        out = BACKENDS.get(backend)(job, world)
    model = FusionRanker(dims, train_cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in out.state.items()})
    model.eval()
    return TrainOutcome(model, out.fit, backend, world, kind)
