"""Top Hessian eigenvalue per layer (HAWQ-V1): power iteration on each layer's diagonal block.

Every iteration runs one batched double backward per calibration batch in which row k of the
probe batch is v_k on layer k's weight and zero elsewhere, giving H_kk v_k for all
unconverged layers at once (H: Hessian of the mean calibration loss). A layer stops when its
Rayleigh quotient changes by less than `tol` (relative). Power iteration finds the eigenvalue
of largest magnitude, the block's spectral norm, so cost = |lambda| * ||Q(W) - W||^2 bounds the
second-order loss change dW^T H dW.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kernels import Choice

from .calibration import Calibration
from .graph import LayerGraph
from .perturb import check_finite_grads, check_finite_loss, eager_attention, grads_only, layer_weights, squared_errors, weight_deltas
from .hessian import hvp_chunk
from .profile import Profile
from .progress import progress
from .registry import register_profiler, shard_layers


def block_hvps(model: nn.Module, calib: Calibration, params: list[torch.Tensor], names: list[str],
               vecs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """H_ii @ vecs[i] for each i in vecs, averaged over all calibration batches."""
    idx = sorted(vecs)
    sel = [params[i] for i in idx]
    out = {i: torch.zeros_like(params[i]) for i in idx}
    probes = []
    for k, i in enumerate(idx):
        p = torch.zeros((len(idx), *params[i].shape), dtype=params[i].dtype, device=params[i].device)
        p[k] = vecs[i]
        probes.append(p)
    for b in range(len(calib)):
        loss = calib.loss(model, b)
        check_finite_loss(loss, b)
        grads = torch.autograd.grad(loss, sel, create_graph=True, allow_unused=True)
        check_finite_grads(grads, [names[i] for i in idx], b)
        hv = hvp_chunk(grads, sel, probes, list(range(len(idx))))
        for k, i in enumerate(idx):
            out[i] += hv[k][k].detach() / len(calib)
    return out


@register_profiler("eigen")
def eigen(model: nn.Module, calib: Calibration, graph: LayerGraph, choices: list[Choice],
          shard: dict | None = None, tol: float = 1e-2, max_iter: int = 100, seed: int = 0) -> Profile:
    """See the module docstring. Shards over layers only (power iteration needs every batch)."""
    if shard is not None and "batches" in shard:
        raise ValueError("the eigen profiler shards over layers only: power iteration needs every calibration batch")
    layers = shard_layers(graph, shard)
    names = [l.name for l in layers]
    params = layer_weights(model, layers)
    vecs = {}
    for i, l in enumerate(layers):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + graph.names.index(l.name))
        v = torch.randn(params[i].shape, generator=gen).to(params[i])
        vecs[i] = v / v.norm()
    lam = np.full(len(layers), np.nan)
    iters = np.zeros(len(layers))
    converged = np.zeros(len(layers), dtype=bool)
    with grads_only(model, params), eager_attention(model):
        for _ in progress(range(max_iter), desc="eigen: power iteration", unit="iter"):
            hv = block_hvps(model, calib, params, names, vecs)
            for i, h in hv.items():
                new = float((vecs[i] * h).sum())
                iters[i] += 1
                converged[i] = abs(new - lam[i]) <= tol * abs(new)
                lam[i] = new
                norm = h.norm()
                if norm == 0:
                    converged[i] = True
                else:
                    vecs[i] = h / norm
            vecs = {i: v for i, v in vecs.items() if not converged[i]}
            if not vecs:
                break
    qerr = squared_errors(weight_deltas(model, layers, choices))
    scores = {"eigenvalue": lam.tolist(), "iterations": iters.tolist(), "converged": converged.astype(float).tolist()}
    scores.update({f"qerr_{c.label}": qerr[:, j].tolist() for j, c in enumerate(choices)})
    return Profile(layers=names, choices=[c.label for c in choices], cost=np.abs(lam)[:, None] * qerr,
                   scores=scores, settings={"tol": tol, "max_iter": max_iter, "seed": seed})
