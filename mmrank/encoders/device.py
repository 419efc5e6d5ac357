"""Device and precision: the GPU with bf16/fp16 autocast when one is visible, CPU fp32 otherwise."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from mmrank.config import FeaturesConf


def resolve_device(cfg: FeaturesConf) -> torch.device:
    """`auto` = cuda when visible, else cpu; an explicit `cuda` without a GPU is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("features.device=cuda but no CUDA device is visible")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(cfg: FeaturesConf, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32. `auto` = bf16 (fp16 on GPUs without bf16) on cuda, fp32 on cpu."""
    p = cfg.precision
    if p == "fp32" or (p == "auto" and device.type == "cpu"):
        return None
    if p == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if p == "bf16" else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def inference(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """`torch.inference_mode()` plus autocast to `dtype` when given."""
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def set_threads(n: int) -> None:
    """Limit torch intra-op threads (so Spark's task parallelism and torch's do not oversubscribe cores)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def task_threads(override: int | None = None) -> int:
    """torch threads for the current Spark task: `override` if set, else the task's CPUs (spark.task.cpus),
    else 1 outside Spark, so concurrent tasks do not oversubscribe the cores."""
    if override:
        return override
    from pyspark import TaskContext

    tc = TaskContext.get()
    return max(1, int(tc.cpus())) if tc is not None else 1
