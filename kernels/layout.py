"""Weights of the supported module kinds as 2-D matrices [out, in], and back.

nn.Linear: weight is already [out, in]. nn.Conv1d / nn.Conv2d: [out, in/groups, *kernel] flattens to
[out, in/groups * prod(kernel)]. transformers' Conv1D stores [in, out] and is transposed.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def module_kind(module: nn.Module) -> str:
    """"linear", "hf_conv1d", "conv1d" or "conv2d" (the kinds of docs/architecture.md)."""
    if isinstance(module, nn.Linear):
        return "linear"
    hf = sys.modules.get("transformers.pytorch_utils")  # a transformers Conv1D exists only once it is imported
    if hf is not None and isinstance(module, hf.Conv1D):
        return "hf_conv1d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    raise TypeError(
        f"module of type {type(module).__name__} is not supported; choose nn.Linear, nn.Conv1d, nn.Conv2d "
        f"or transformers.pytorch_utils.Conv1D"
    )


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a 2-D [out, in] matrix (a view where possible; HF Conv1D is transposed)."""
    kind = module_kind(module)
    w = module.weight.detach()
    if kind == "hf_conv1d":
        return w.t()
    return w.reshape(w.shape[0], -1)


def matrix_to_weight(matrix: torch.Tensor, kind: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `weight_matrix`: a [out, in] matrix in the stored layout of a `kind` weight of `weight_shape`."""
    if kind == "hf_conv1d":
        return matrix.t().reshape(weight_shape)
    if kind in ("linear", "conv1d", "conv2d"):
        return matrix.reshape(weight_shape)
    raise ValueError(f"kind={kind!r} is not supported; choose from ('linear', 'hf_conv1d', 'conv1d', 'conv2d')")
