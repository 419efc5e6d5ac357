"""Model compression (the first design note's resource-cost section): magnitude pruning and int8 quantization,
alone or together, and how to measure what they cost and save.

- `prune_model(model, sparsity)`: in place, the `sparsity` fraction of smallest-magnitude weights of every
  `nn.Linear` set to 0 (L1 unstructured pruning per layer, made permanent). `train.prune_sparsity` applies it
  after training, so the artifact (and the promotion gate) sees the pruned model. Dense kernels run no faster
  on zeros: pruning buys compressibility (and speed only with sparse kernels), which `model_size` shows.
- `quantize_model(model)`: int8 dynamic quantization of every `nn.Linear` (CPU), used by scoring with
  `score.quantize`. Works on a pruned model too (zeros stay zeros in int8).
- `linear_sparsity(model)` and `model_size(model)` (dense bytes, zlib-compressed bytes) for the measurements.
"""
from __future__ import annotations

import copy
import io
import warnings
import zlib

import torch
from torch import nn


def prune_model(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the `sparsity` fraction of smallest |w| of every Linear weight, in place; returns `model`."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0:
        return model
    from torch.nn.utils import prune

    for module in model.modules():
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, "weight", amount=sparsity)
            prune.remove(module, "weight")
    return model


def quantize_model(model: nn.Module) -> nn.Module:
    """int8 dynamic quantization of every `nn.Linear` (weights int8, activations quantized per batch, CPU).

    Uses `torch.ao.quantization.quantize_dynamic` (present, though deprecated in favour of torchao, in torch
    2.11). Returns a new module in eval mode; the original is left untouched.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        qm = quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    return qm.eval()


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over all float `nn.Linear` weights (quantized layers are not counted)."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, torch.Tensor):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def model_size(model: nn.Module) -> dict[str, int]:
    """`bytes`: the serialized state (tensors only; quantized layers in their packed int8 form) and
    `zlib_bytes`: the same compressed, where pruned zeros pay off."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # measuring only: nothing is ever loaded back from this buffer
    raw = buf.getvalue()
    return {"bytes": len(raw), "zlib_bytes": len(zlib.compress(raw, 6))}
