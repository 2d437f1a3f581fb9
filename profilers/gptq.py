"""GPTQ-style output-error proxy (backward-free, as GPTQ and BAQ use).

Forward hooks collect each layer's calibration inputs X (rows: tokens / output positions).
For linear kinds H = 2 X^T X / N and cost[i, c] = tr(dW H dW^T) with dW = Q_c(W_i) - W_i,
i.e. twice the mean squared error the quantization adds to the layer's output. Convs get the
same number from their output error directly (conv of the input with dW).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels import Choice

from .calibration import Calibration, call_model
from .graph import LayerGraph
from .perturb import squared_errors, weight_deltas
from .profile import Profile
from .registry import register_profiler, shard_batches, shard_layers


def _finish(layers: list[str], choices: list[str], err_sums: np.ndarray, rows: np.ndarray, qerr: np.ndarray) -> Profile:
    scores = {"rows": rows.tolist()}
    scores.update({f"err_sum_{c}": err_sums[:, j].tolist() for j, c in enumerate(choices)})
    scores.update({f"qerr_{c}": qerr[:, j].tolist() for j, c in enumerate(choices)})
    return Profile(layers=layers, choices=choices, cost=2.0 * err_sums / rows[:, None], scores=scores, settings={})


def combine(shards: list[Profile]) -> Profile:
    """Exact merge of batch shards: output-error sums and row counts add up."""
    first = shards[0]
    return _finish(first.layers, first.choices, np.sum([s.per_choice("err_sum") for s in shards], axis=0),
                   np.sum([s.scores["rows"] for s in shards], axis=0), first.per_choice("qerr"))


@register_profiler("gptq", combine=combine)
def gptq(model: nn.Module, calib: Calibration, graph: LayerGraph, choices: list[Choice],
         shard: dict | None = None) -> Profile:
    """See the module docstring."""
    layers = shard_layers(graph, shard)
    deltas = weight_deltas(model, layers, choices)
    hess = {l.name: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for l in layers if l.kind in ("linear", "hf_conv1d")}
    conv_err = {l.name: np.zeros(len(choices)) for l in layers if l.name not in hess}
    rows = {l.name: 0 for l in layers}

    def hook(layer, i):
        def collect(module, args):
            x = args[0].detach()
            if layer.name in hess:
                xm = x.reshape(-1, layer.in_features).double()
                hess[layer.name] += (xm.T @ xm).cpu()
                rows[layer.name] += xm.shape[0]
            else:
                for j, d in enumerate(deltas[i]):
                    y = module._conv_forward(x.float(), d.to(x.device), None)
                    conv_err[layer.name][j] += float(y.double().pow(2).sum())
                rows[layer.name] += y.numel() // y.shape[1]
        return collect

    handles = [model.get_submodule(l.name).register_forward_pre_hook(hook(l, i)) for i, l in enumerate(layers)]
    try:
        with torch.no_grad():
            for b in shard_batches(calib, shard):
                call_model(model, calib.inputs(b), f"calibration batch {b}")
    finally:
        for h in handles:
            h.remove()

    err = np.zeros((len(layers), len(choices)))
    for i, l in enumerate(layers):
        if l.name in hess:
            for j, d in enumerate(deltas[i]):
                dm = (d.t() if l.kind == "hf_conv1d" else d).double().cpu()
                err[i, j] = float(((dm @ hess[l.name]) * dm).sum())
        else:
            err[i] = conv_err[l.name]
    return _finish([l.name for l in layers], [c.label for c in choices], err,
                   np.array([float(rows[l.name]) for l in layers]), squared_errors(deltas))
