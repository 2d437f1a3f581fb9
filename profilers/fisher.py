"""Fisher / gradient-squared profiler (the cheap proxy of NVIDIA ModelOpt's auto_quantize).

cost[i, c] = mean over calibration batches of (g_i . dW_ic)^2, g_i the batch gradient of
the loss w.r.t. layer i's weight and dW_ic = Q_c(W_i) - W_i (estimator="dot"), or of
sum(g_i^2 * dW_ic^2) (estimator="diag": diagonal-Fisher weighted perturbation).
With labels the loss is the task loss. Without labels the gradient of the
self-distillation loss is zero at the float weights, so labels are sampled from the float
model's own predictions (true Fisher): y ~ softmax(logits), or y = output + N(0, 1) for
hidden-state outputs (MSE).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels import Choice

from .calibration import Calibration, call_model, output_tensor
from .graph import LayerGraph
from .perturb import check_finite_grads, check_finite_loss, grads_only, layer_weights, squared_errors, weight_deltas
from .profile import Profile
from .registry import register_profiler, shard_batches, shard_layers


def sampled_loss(model: nn.Module, calib: Calibration, i: int, gen: torch.Generator) -> torch.Tensor:
    """Loss on batch i against targets sampled from the float model's own output distribution."""
    out, is_logits = output_tensor(call_model(model, calib.inputs(i), f"calibration batch {i}"))
    ref = calib.reference(model, i)
    if calib.distill == "kl" or (calib.distill == "auto" and is_logits):
        probs = F.softmax(ref.float(), dim=-1).reshape(-1, ref.shape[-1]).cpu()
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(out.device)
        return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y)
    noise = torch.randn(ref.shape, generator=gen).to(ref.device)
    return F.mse_loss(out.float(), ref.float() + noise)


def _finish(layers: list[str], choices: list[str], sums: np.ndarray, n: np.ndarray, qerr: np.ndarray,
            settings: dict) -> Profile:
    scores = {"batches": n.tolist()}
    scores.update({f"sum_{c}": sums[:, j].tolist() for j, c in enumerate(choices)})
    scores.update({f"qerr_{c}": qerr[:, j].tolist() for j, c in enumerate(choices)})
    return Profile(layers=layers, choices=choices, cost=sums / n[:, None], scores=scores, settings=settings)


def combine(shards: list[Profile]) -> Profile:
    """Exact merge of batch shards: per-batch sums and counts add up."""
    first = shards[0]
    return _finish(first.layers, first.choices, np.sum([s.per_choice("sum") for s in shards], axis=0),
                   np.sum([s.scores["batches"] for s in shards], axis=0), first.per_choice("qerr"), first.settings)


@register_profiler("fisher", combine=combine)
def fisher(model: nn.Module, calib: Calibration, graph: LayerGraph, choices: list[Choice],
           shard: dict | None = None, estimator: str = "dot", seed: int = 0) -> Profile:
    """See the module docstring. estimator: "dot" or "diag"; seed: for sampled labels."""
    if estimator not in ("dot", "diag"):
        raise ValueError(f"estimator must be 'dot' or 'diag', not {estimator!r}")
    layers = shard_layers(graph, shard)
    batches = shard_batches(calib, shard)
    names = [l.name for l in layers]
    params = layer_weights(model, layers)
    deltas = weight_deltas(model, layers, choices)
    sums = np.zeros((len(layers), len(choices)))
    with grads_only(model, params):
        for b in batches:
            if calib.has_labels(b):
                loss = calib.loss(model, b)
            else:
                loss = sampled_loss(model, calib, b, torch.Generator().manual_seed(seed * 1_000_003 + b))
            check_finite_loss(loss, b)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            check_finite_grads(grads, names, b)
            for i, (g, p) in enumerate(zip(grads, params)):
                g = torch.zeros_like(p) if g is None else g.detach().float()
                for j, d in enumerate(deltas[i]):
                    d = d.to(g.device)
                    sums[i, j] += float((g * d).sum() ** 2) if estimator == "dot" else float((g * g * d * d).sum())
    n = np.full(len(layers), float(len(batches)))
    return _finish(names, [c.label for c in choices], sums, n, squared_errors(deltas), {"estimator": estimator, "seed": seed})
