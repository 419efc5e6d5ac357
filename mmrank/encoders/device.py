"""Which device and precision a process uses, decided by small pure functions plus thin readers of the
environment (Spark's TaskContext, Horovod's task info, CUDA_VISIBLE_DEVICES, the GPU's compute capability).

Device (`resolve_device`): `cpu`; or, when a GPU is visible and wanted (`auto` / `cuda`),
  1. inside a Spark task that was given GPUs (`spark.task.resource.gpu.amount`), the first address in
     `TaskContext.get().resources()["gpu"].addresses`; in a Horovod-on-Spark rank, the GPUs of the Spark
     task that hosts it (`horovod.spark.task.get_available_devices()`);
  2. else `local_rank` when given (a torchrun rank: TorchDistributor has already narrowed CUDA_VISIBLE_DEVICES
     to the GPUs Spark gave it);
  3. else cuda:0.
Spark addresses are CUDA ordinals as the executor sees them (the convention of TorchDistributor and the RAPIDS
plugin: the discovery script reports 0..n-1); a non-numeric address (a GPU UUID) is looked up in
CUDA_VISIBLE_DEVICES. An address outside the visible GPUs is an error, never a silent cuda:0.

Precision (`choose_dtype`): `auto` = bf16 where the GPU computes it natively (compute capability >= 8.0:
A100, H100, L4, A10, RTX 30xx+), fp16 on older GPUs (T4, V100: `torch.cuda.is_bf16_supported()` is true there
but bf16 is emulated, so slow), fp32 on CPU. Explicit `fp32` / `bf16` / `fp16` are used as given. Training in
fp16 scales the loss (`torch.amp.GradScaler`); bf16 has fp32's exponent range and needs no scaling.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, Sequence

import torch

log = logging.getLogger("mmrank.device")

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and newer have bf16 tensor cores


# ---- device -------------------------------------------------------------------------------------------------
def cuda_ordinal(address: str, visible: str | None = None) -> int:
    """A Spark GPU address -> the CUDA ordinal of this process (the N of cuda:N).

    Numeric addresses are ordinals; others (GPU UUIDs) are positions in CUDA_VISIBLE_DEVICES (`visible`).
    """
    a = str(address).strip()
    if a.isdigit():
        return int(a)
    listed = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if a in listed:
        return listed.index(a)
    raise ValueError(f"GPU address {a!r} assigned by Spark is neither a CUDA ordinal nor listed in "
                     f"CUDA_VISIBLE_DEVICES={visible!r}")


def choose_device(setting: str, *, cuda_available: bool, device_count: int, addresses: Sequence[str] = (),
                  local_rank: int | None = None, visible: str | None = None) -> torch.device:
    """The device for `setting` (auto | cpu | cuda) given what this process sees (pure; see the module doc)."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {setting!r}")
    if setting == "cuda" and not cuda_available:
        raise RuntimeError("device=cuda (features.device) but no CUDA device is visible to this process")
    if setting == "cpu" or not cuda_available:
        return torch.device("cpu")
    if addresses:
        index, source = cuda_ordinal(addresses[0], visible), f"Spark assigned GPU address {addresses[0]!r}"
    elif local_rank is not None:
        index, source = int(local_rank), f"local rank {local_rank}"
    else:
        index, source = 0, "default"
    if not 0 <= index < device_count:
        raise RuntimeError(f"{source} -> cuda:{index}, but this process sees {device_count} GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={visible!r}); Spark's GPU addresses must be CUDA ordinals "
                           "as the executor sees them (make the discovery script report 0..n-1)")
    return torch.device("cuda", index)


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark gave the current task (or the Spark task hosting this Horovod rank); [] if none."""
    from pyspark import TaskContext

    tc = TaskContext.get()
    if tc is not None:
        gpu = tc.resources().get("gpu")
        return list(gpu.addresses) if gpu is not None else []
    horovod_task = sys.modules.get("horovod.spark.task.task_info")  # set only inside a Horovod-on-Spark rank
    return list(horovod_task.get_available_devices()) if horovod_task is not None else []


def resolve_device(setting: str = "auto", *, local_rank: int | None = None,
                   addresses: Sequence[str] | None = None) -> torch.device:
    """`choose_device` for this process: Spark's assignment (unless `addresses` is given), visible GPUs."""
    available = torch.cuda.is_available()
    if addresses is None and setting != "cpu" and available:
        addresses = task_gpu_addresses()
    return choose_device(setting, cuda_available=available, device_count=torch.cuda.device_count() if available
                         else 0, addresses=addresses or (), local_rank=local_rank,
                         visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


# ---- precision ----------------------------------------------------------------------------------------------
def native_bf16(capability: tuple[int, int]) -> bool:
    """True where bf16 runs on tensor cores (compute capability >= 8.0), not emulated."""
    return tuple(capability) >= NATIVE_BF16_CAPABILITY


def choose_dtype(precision: str, device_type: str, capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """Autocast dtype for `precision` (auto | fp32 | bf16 | fp16) on `device_type`, or None for plain fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp32" or (precision == "auto" and device_type != "cuda"):
        return None
    if precision == "auto":
        if capability is None:
            raise ValueError("precision=auto on cuda needs the GPU's compute capability")
        return torch.bfloat16 if native_bf16(capability) else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def capability_of(device: torch.device) -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`choose_dtype` for a real device (reads the GPU's compute capability only when `auto` needs it)."""
    needs = precision == "auto" and device.type == "cuda"
    return choose_dtype(precision, device.type, capability_of(device) if needs else None)


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 do not."""
    return dtype == torch.float16


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


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in page-locked host memory when it is headed for a GPU, so `.to(device, non_blocking=True)` is a real
    asynchronous copy (from pageable memory it blocks); unchanged for a CPU device. Pinned blocks come from
    torch's caching host allocator, which reuses a block only after the copies reading it have finished."""
    return t.pin_memory() if device.type == "cuda" and not t.is_pinned() else t


# ---- process groups and threads -----------------------------------------------------------------------------
def process_group_backend(device_type: str) -> str:
    """torch.distributed backend spec: CPU tensors (metric sums, pickled objects) go over gloo even when the
    model trains on NCCL, which only carries CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


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
