"""Hessian-trace profiler (HAWQ-V2/V3): Omega_i(b) = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2.

Hutchinson's estimator with Rademacher probes v over all quantizable weights. Per calibration
batch, one gradient with create_graph=True, then `batch_probes` Hessian-vector products in a
single batched double backward (is_grads_batched); every layer's trace sample is
sum(v_i * (Hv)_i) over its own weight, all from the same full-model HVP. A round = one chunk
of probes on every batch; after each round a layer stops when its running mean's relative
standard error is below `tol`; all stop at the probe cap. The trace is that of the Hessian of
the mean calibration loss (task loss with labels, else self-distillation: Gauss-Newton).
Hugging Face models run with eager attention during profiling (sdpa has no double backward).
A negative trace (task-loss Hessians away from a minimum are indefinite) is kept in scores
but gives cost 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels import Choice

from .calibration import Calibration
from .graph import LayerGraph
from .perturb import check_finite_grads, check_finite_loss, eager_attention, grads_only, layer_weights, squared_errors, weight_deltas
from .profile import Profile
from .progress import progress
from .registry import register_profiler, shard_batches, shard_layers


def probe_seed(seed: int, batch: int, round_: int) -> int:
    """Seed of the probe chunk of (batch, round): the same in sharded and unsharded runs."""
    return ((seed * 1_000_003 + batch) * 1_000_003 + round_) % (2**63)


def rademacher(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """+-1 entries drawn on the CPU (the same on every device), in `like`'s dtype and device."""
    return torch.randint(0, 2, shape, generator=gen).to(like.dtype).mul_(2).sub_(1).to(like.device)


def hvp_chunk(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor], probes: list[torch.Tensor],
              wanted: list[int]) -> dict[int, torch.Tensor]:
    """(H @ v)[i] for i in `wanted`, for a chunk of probes (probes[i] is [P, *params[i].shape])
    from gradients taken with create_graph=True (None for weights the loss does not use),
    in one batched double backward."""
    live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
    hv: tuple[torch.Tensor | None, ...] = (None,) * len(wanted)
    if live and wanted:
        hv = torch.autograd.grad([grads[k] for k in live], [params[i] for i in wanted],
                                 grad_outputs=[probes[k] for k in live], is_grads_batched=True, allow_unused=True)
    return {i: torch.zeros_like(probes[i]) if h is None else h for i, h in zip(wanted, hv)}


def _stats(s: np.ndarray, ss: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and relative standard error of the mean from sums, sums of squares and counts."""
    mean = s / np.maximum(n, 1)
    var = np.maximum(ss - n * mean**2, 0.0) / np.maximum(n - 1, 1)
    stderr = np.sqrt(var / np.maximum(n, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mean != 0, stderr / np.abs(mean), np.inf)
    return mean, rel


def _finish(layers: list[str], choices: list[str], sums, sumsq, counts, qerr: np.ndarray, params: np.ndarray, settings: dict) -> Profile:
    trace, rel = _stats(np.asarray(sums), np.asarray(sumsq), np.asarray(counts))
    scores = {
        "trace": trace.tolist(), "rel_stderr": rel.tolist(), "probes": list(map(float, counts)),
        "sum": list(map(float, sums)), "sumsq": list(map(float, sumsq)), "params": list(map(float, params)),
    }
    scores.update({f"qerr_{c}": qerr[:, j].tolist() for j, c in enumerate(choices)})
    cost = (np.maximum(trace, 0.0) / params)[:, None] * qerr  # an indefinite block's negative trace: no cost
    return Profile(layers=layers, choices=choices, cost=cost, scores=scores, settings=settings)


def combine(shards: list[Profile]) -> Profile:
    """Exact merge of batch shards: probe sums, sums of squares and counts add up."""
    first = shards[0]
    total = {k: np.sum([s.scores[k] for s in shards], axis=0) for k in ("sum", "sumsq", "probes")}
    qerr = first.per_choice("qerr")
    return _finish(first.layers, first.choices, total["sum"], total["sumsq"], total["probes"], qerr,
                   np.asarray(first.scores["params"]), first.settings)


@register_profiler("hessian", combine=combine)
def hessian(
    model: nn.Module,
    calib: Calibration,
    graph: LayerGraph,
    choices: list[Choice],
    shard: dict | None = None,
    tol: float = 1e-2,
    max_probes: int = 200,
    min_probes: int = 16,
    batch_probes: int = 8,
    seed: int = 0,
) -> Profile:
    """Hutchinson trace per layer; see the module docstring.

    tol: relative standard error at which a layer stops; max_probes: cap on probes per layer
    (rounded down to whole rounds over all calibration batches, at least one); min_probes: fewest probes
    before a layer may stop; batch_probes: probes per batched double backward.
    A batch shard runs to the cap (stopping is not additive), so its merge equals the
    unsharded run with tol=0.
    """
    layers = shard_layers(graph, shard)
    batches = shard_batches(calib, shard)
    names = graph.names
    target = [names.index(l.name) for l in layers]
    params = layer_weights(model, graph.layers)
    rounds = max(1, max_probes // (batch_probes * len(calib)))
    adaptive = shard is None or "batches" not in shard
    L = len(layers)
    sums, sumsq, counts = np.zeros(L), np.zeros(L), np.zeros(L)
    active = np.ones(L, dtype=bool)
    bar = progress(desc="hessian: Hutchinson probes", total=rounds * len(batches), unit="batch")
    with grads_only(model, params), eager_attention(model), bar:
        for r in range(rounds):
            for b in batches:
                bar.update()
                bar.set_postfix(layers_left=int(active.sum()))
                loss = calib.loss(model, b)
                check_finite_loss(loss, b)
                gen = torch.Generator().manual_seed(probe_seed(seed, b, r))
                probes = [rademacher(gen, (batch_probes, *p.shape), p) for p in params]
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                check_finite_grads(grads, names, b)
                hv = hvp_chunk(grads, params, probes, [i for j, i in enumerate(target) if active[j]])
                for j, i in enumerate(target):
                    if not active[j]:
                        continue
                    vals = (probes[i] * hv[i]).flatten(1).sum(1).double()
                    if not torch.isfinite(vals).all():
                        raise ValueError(f"Hessian-vector product of layer {names[i]!r} contains NaN/Inf on calibration batch {b}")
                    sums[j] += float(vals.sum())
                    sumsq[j] += float(vals.pow(2).sum())
                    counts[j] += batch_probes
            if adaptive:
                _, rel = _stats(sums, sumsq, counts)
                active &= ~((counts >= min_probes) & (rel < tol))
                if not active.any():
                    break
    qerr = squared_errors(weight_deltas(model, layers, choices))
    settings = {"tol": tol, "max_probes": max_probes, "min_probes": min_probes, "batch_probes": batch_probes, "seed": seed}
    return _finish([l.name for l in layers], [c.label for c in choices], sums, sumsq, counts, qerr,
                   np.array([l.params for l in layers], dtype=np.float64), settings)
