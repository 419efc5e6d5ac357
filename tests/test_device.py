"""The device, precision and process-group decisions (`mmrank.encoders.device`), the metric reduction on a real
2-process gloo group, and fp16 training with a loss scaler. No GPU exists here: the decision functions take
what a process would see (CUDA available, GPU count, compute capability) as arguments; nothing else is faked.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmrank.config import TrainConf
from mmrank.encoders.device import (choose_device, choose_dtype, cuda_ordinal, native_bf16, needs_grad_scaler,
                                    process_group_backend, resolve_device, task_gpu_addresses)
from mmrank.ranker.fit import Amp, _reduce, load_checkpoint, train_local
from tests.test_fit import DIMS, TRAIN, VAL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GPU = dict(cuda_available=True, device_count=8)
T4, V100, A100, L4, H100 = (7, 5), (7, 0), (8, 0), (8, 9), (9, 0)


# ---- device ----------------------------------------------------------------------------------------------
def test_spark_task_address_wins_over_local_rank_and_default():
    assert choose_device("auto", **GPU, addresses=["5"]) == torch.device("cuda", 5)
    assert choose_device("cuda", **GPU, addresses=["3", "4"], local_rank=0) == torch.device("cuda", 3)
    assert choose_device("auto", **GPU, local_rank=2) == torch.device("cuda", 2)  # torchrun rank
    assert choose_device("auto", **GPU) == torch.device("cuda", 0)                # outside Spark


def test_cpu_setting_and_missing_gpu():
    assert choose_device("cpu", **GPU, addresses=["1"]) == torch.device("cpu")
    assert choose_device("auto", cuda_available=False, device_count=0, addresses=["1"]) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        choose_device("cuda", cuda_available=False, device_count=0)
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        choose_device("gpu", **GPU)


def test_address_outside_the_visible_gpus_is_an_error_not_cuda0():
    with pytest.raises(RuntimeError, match=r"address '6' -> cuda:6, but this process sees 2 GPU\(s\)"):
        choose_device("auto", cuda_available=True, device_count=2, addresses=["6"], visible="6,7")


def test_cuda_visible_devices_remaps_uuid_addresses():
    visible = "GPU-aa11,GPU-bb22,GPU-cc33"
    assert cuda_ordinal("GPU-cc33", visible) == 2 and cuda_ordinal("1", visible) == 1
    assert choose_device("auto", **GPU, addresses=["GPU-bb22"], visible=visible) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="neither a CUDA ordinal nor listed"):
        cuda_ordinal("GPU-zz99", visible)


def test_outside_spark_this_cpu_process_resolves_cpu():
    assert task_gpu_addresses() == []  # the pytest driver is not a Spark task
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        resolve_device("cuda")


def test_horovod_rank_reads_the_gpus_of_its_spark_task():
    """Inside a Horovod-on-Spark rank there is no TaskContext; Horovod's task info holds the Spark task's GPUs."""
    from horovod.spark.task import task_info
    from pyspark.resource import ResourceInformation

    task_info.set_resources({"gpu": ResourceInformation("gpu", ["6", "7"])})
    try:
        assert task_gpu_addresses() == ["6", "7"]
    finally:
        task_info.set_resources({})
    assert task_gpu_addresses() == []


# ---- precision -------------------------------------------------------------------------------------------
def test_bf16_only_where_native():
    assert [native_bf16(c) for c in (T4, V100, A100, L4, H100)] == [False, False, True, True, True]
    assert choose_dtype("auto", "cuda", T4) == torch.float16 and choose_dtype("auto", "cuda", V100) == torch.float16
    assert choose_dtype("auto", "cuda", A100) == torch.bfloat16 and choose_dtype("auto", "cuda", H100) == torch.bfloat16
    assert choose_dtype("auto", "cpu") is None and choose_dtype("fp32", "cuda", H100) is None
    assert choose_dtype("bf16", "cuda", T4) == torch.bfloat16  # explicit settings are used as given
    assert choose_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="compute capability"):
        choose_dtype("auto", "cuda")


def test_fp16_training_uses_a_grad_scaler_bf16_does_not():
    assert [needs_grad_scaler(d) for d in (torch.float16, torch.bfloat16, None)] == [True, False, False]
    assert Amp.of("fp16", torch.device("cpu")).scaler is not None
    assert Amp.of("bf16", torch.device("cpu")).scaler is None and Amp.of("auto", torch.device("cpu")).dtype is None


def test_fp16_fit_steps_through_the_scaler(tmp_path):
    """fp16 autocast + GradScaler on CPU (the same code path as fp16 on an older GPU): it learns, and the
    checkpointed scaler state shows the loss was scaled; fp32 has no scaler."""
    cfg = TrainConf(max_epochs=2, precision="fp16", lr=0.01, patience=5)
    model, res = train_local(TRAIN, VAL, DIMS, cfg, checkpoint_dir=tmp_path / "fp16")
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"] and res.best_metrics["ndcg@10"] > 0.6
    scaler = load_checkpoint(tmp_path / "fp16")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    train_local(TRAIN, VAL, DIMS, TrainConf(max_epochs=1), checkpoint_dir=tmp_path / "fp32")
    assert load_checkpoint(tmp_path / "fp32")["scaler"] == {}


# ---- process groups --------------------------------------------------------------------------------------
def test_process_group_carries_cpu_tensors_beside_nccl():
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def _reduce_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mmrank.distributed.backends import _sum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(process_group_backend("cpu"), rank=rank, world_size=2)
    try:
        got = _reduce([1.5 + rank, 10.0 * (rank + 1), 1e-12], _sum, torch.device("cpu"))
        torch.save(torch.tensor(got, dtype=torch.float64), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_reduce_on_a_two_process_gloo_group(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reduce_rank, args=(port, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):  # every rank gets the float64 sums (1e-12 survives: no float32 rounding)
        assert torch.load(tmp_path / f"r.{rank}").tolist() == [4.0, 30.0, 2e-12]
    assert _reduce([1.0, 2.0], None) == [1.0, 2.0]


def test_gpu_bench_on_a_machine_without_gpu_says_so_and_exits_0():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench/gpu.py")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # hides a GPU if this machine has one
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No GPU present" in proc.stdout and "measured nothing" in proc.stdout
