"""Measured single-layer deltas (the ground truth): quantize one layer at a time at each
choice and measure the change of the mean calibration loss (task loss with labels, else
self-distillation against the float model, which is 0 at the float weights). A choice with quantized
activations (w8gca8) also rounds the layer's input as its emitted module does."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels import Choice

from .calibration import Calibration
from .graph import LayerGraph
from .perturb import activations_rounded, check_finite_loss, perturbed, squared_errors, weight_deltas
from .profile import Profile
from .progress import progress
from .registry import register_profiler, shard_batches, shard_layers


def _finish(layers: list[str], choices: list[str], base_sum: np.ndarray, loss_sums: np.ndarray, n: np.ndarray,
            qerr: np.ndarray, settings: dict) -> Profile:
    cost = (loss_sums - base_sum[:, None]) / n[:, None]
    scores = {"base_loss": (base_sum / n).tolist(), "base_sum": base_sum.tolist(), "batches": n.tolist()}
    scores.update({f"loss_sum_{c}": loss_sums[:, j].tolist() for j, c in enumerate(choices)})
    scores.update({f"qerr_{c}": qerr[:, j].tolist() for j, c in enumerate(choices)})
    return Profile(layers=layers, choices=choices, cost=cost, scores=scores, settings=settings)


def combine(shards: list[Profile]) -> Profile:
    """Exact merge of batch shards: loss sums and batch counts add up."""
    first = shards[0]
    return _finish(first.layers, first.choices,
                   np.sum([s.scores["base_sum"] for s in shards], axis=0),
                   np.sum([s.per_choice("loss_sum") for s in shards], axis=0),
                   np.sum([s.scores["batches"] for s in shards], axis=0),
                   first.per_choice("qerr"), first.settings)


@register_profiler("measured", combine=combine)
def measured(model: nn.Module, calib: Calibration, graph: LayerGraph, choices: list[Choice],
             shard: dict | None = None) -> Profile:
    """cost[i, c] = mean loss with layer i quantized at choice c - mean loss of the float model."""
    layers = shard_layers(graph, shard)
    batches = shard_batches(calib, shard)
    deltas = weight_deltas(model, layers, choices)

    def total_loss() -> float:
        total = 0.0
        for b in batches:
            loss = calib.loss(model, b)
            check_finite_loss(loss, b)
            total += float(loss)
        return total

    with torch.no_grad():
        base = total_loss()  # also caches the float model's reference outputs
        loss_sums = np.zeros((len(layers), len(choices)))
        for i, layer in enumerate(progress(layers, desc="measured: one layer at a time", unit="layer")):
            for j, d in enumerate(deltas[i]):
                with perturbed(model, {layer.name: d}), activations_rounded(model, layer, choices[j]):
                    loss_sums[i, j] = total_loss()
    n = np.full(len(layers), float(len(batches)))
    return _finish([l.name for l in layers], [c.label for c in choices], np.full(len(layers), base), loss_sums, n,
                   squared_errors(deltas), {})
