"""Quantization perturbations dW = Q_b(W) - W shared by the profilers, and autograd helpers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from kernels import Choice, fake_quantize, matrix_to_weight, weight_matrix
from kernels.gpu_activation_quant import ACT_QUANT_KINDS, round_activations

from .graph import LayerInfo


def weight_delta(module: nn.Module, info: LayerInfo, choice: Choice) -> torch.Tensor:
    """Q(W) - W in the weight's stored layout (float32), Q from `choice.spec_for(kind, in_features)`."""
    w = weight_matrix(module).float()
    dq = fake_quantize(w, choice.spec_for(info.kind, info.in_features)) - w
    return matrix_to_weight(dq, info.kind, info.weight_shape).contiguous()


def weight_deltas(model: nn.Module, layers: Sequence[LayerInfo], choices: Sequence[Choice]) -> list[list[torch.Tensor]]:
    """deltas[i][c]: Q_c(W_i) - W_i for every layer and choice."""
    return [[weight_delta(model.get_submodule(l.name), l, c) for c in choices] for l in layers]


def squared_errors(deltas: list[list[torch.Tensor]]) -> np.ndarray:
    """||Q_c(W_i) - W_i||^2 as an array [L, C]."""
    return np.array([[float(d.double().pow(2).sum()) for d in row] for row in deltas], dtype=np.float64).reshape(len(deltas), -1)


def layer_weights(model: nn.Module, layers: Sequence[LayerInfo]) -> list[torch.Tensor]:
    return [model.get_submodule(l.name).weight for l in layers]


@contextmanager
def perturbed(model: nn.Module, changes: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily add changes[name] to module `name`'s weight; the exact weights come back after."""
    saved = {}
    with torch.no_grad():
        for name, d in changes.items():
            w = model.get_submodule(name).weight
            saved[name] = w.detach().clone()
            w.add_(d.to(w.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)


@contextmanager
def activations_rounded(model: nn.Module, info: LayerInfo, choice: Choice) -> Iterator[None]:
    """While inside, layer `info` rounds its input per token to `choice.abits` bits (integer levels, or e4m3 values
    for act_format "fp8"), as its emitted module does for a choice with quantized activations (linear kinds; convs
    run such choices weight-only); otherwise nothing."""
    if choice.abits is None or info.kind not in ACT_QUANT_KINDS:
        yield
        return
    hook = model.get_submodule(info.name).register_forward_pre_hook(
        lambda module, args: (round_activations(args[0], choice.abits, choice.act_format), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def grads_only(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """requires_grad on `params` only (the rest frozen), restored after."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    for p, _ in before:
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face models switched to eager attention (sdpa/flash kernels on the CPU have no
    double backward), switched back after."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = hasattr(model, "set_attn_implementation") and before not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def check_finite_grads(grads: Sequence[torch.Tensor | None], names: Sequence[str], batch: int) -> None:
    """ValueError naming the first layer whose gradient holds NaN/Inf."""
    for g, name in zip(grads, names):
        if g is not None and not torch.isfinite(g).all():
            raise ValueError(f"gradient of layer {name!r} contains NaN/Inf on calibration batch {batch}")


def check_finite_loss(loss: torch.Tensor, batch: int) -> None:
    if not torch.isfinite(loss).all():
        raise ValueError(f"loss is {loss.detach().item()} on calibration batch {batch}")
