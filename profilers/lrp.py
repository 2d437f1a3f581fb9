"""LRP relevance profiler (LRP-QViT): Omega_i(b) = share_i * ||Q_b(W_i) - W_i||^2 / ||W_i||^2.

Relevance starts at the output -- the predicted class logit of every row (classification and
language models; padding positions of an "attention_mask" left out) or the sum of the output
(regression, hidden states) -- and is propagated
back with the rules of `lrp_rules` (AttnLRP-style rules for transformers, epsilon/gamma for
Linear/Conv). A layer's relevance is sum |R| over the elements of its *output* (the rules'
x * grad there), summed over calibration batches and calls; its share is that over the sum of
all quantizable layers' relevance, and the relative weight quantization error scales it
[scoring after Ranjan & Savakis 2024, "LRP-QViT: mixed-precision vision transformer
quantization via layer-wise relevance propagation"].

Fallbacks, never silent zeros: modules with no rule pass relevance as plain gradient x input
and are listed in settings["fallback_modules"]; a layer whose LRP relevance on a batch is
zero (e.g. q/k projections when attention="cp" detaches the softmax) is scored on that batch
by plain gradient x input at its output, counted in scores["fallback_batches"].
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kernels import Choice

from .calibration import Calibration
from .graph import LayerGraph
from .lrp_rules import LRPRules
from .perturb import grads_only, squared_errors, weight_deltas
from .profile import Profile
from .registry import register_profiler, shard_batches, shard_layers

TARGETS = ("predicted", "sum")


def output_seed(out: Tensor, target: str, mask: Tensor | None = None) -> Tensor:
    """The scalar whose gradient seeds relevance: R_out = out * d(seed)/d(out).

    mask: an attention mask [batch, positions]; positions where it is 0 (padding) seed nothing
    when the output has those leading dimensions (token-level outputs).
    """
    picked = out
    if target == "predicted" and out.dim() >= 2 and out.shape[-1] > 1:
        picked = out.gather(-1, out.argmax(-1, keepdim=True))
    if mask is not None and picked.dim() > mask.dim() and picked.shape[:mask.dim()] == mask.shape:
        mask = mask.to(device=picked.device, dtype=picked.dtype)
        picked = picked * mask.reshape(*mask.shape, *[1] * (picked.dim() - mask.dim()))
    return picked.sum()


def output_relevance(outputs: dict[str, list[Tensor]], seed: Tensor, names: Sequence[str]) -> np.ndarray:
    """sum |y * d(seed)/dy| over every recorded output of each named layer (0 if never called)."""
    flat = [(i, t) for i, n in enumerate(names) for t in outputs.get(n, []) if t.requires_grad]
    for i, t in flat:  # forward order: the first non-finite output is where NaN/Inf start
        if not torch.isfinite(t).all():
            raise ValueError(f"the output of layer {names[i]!r} contains NaN/Inf")
    rel = np.zeros(len(names))
    if not flat:
        return rel
    grads = torch.autograd.grad(seed, [t for _, t in flat], allow_unused=True)
    for (i, t), g in reversed(list(zip(flat, grads))):  # backward order, likewise
        if g is not None:
            r = (t.detach() * g).double()
            if not torch.isfinite(r).all():
                raise ValueError(f"relevance at the output of layer {names[i]!r} contains NaN/Inf")
            rel[i] += float(r.abs().sum())
    return rel


@contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the plain outputs of the named modules (no rules): for the gradient x input fallback."""
    outputs: dict[str, list[Tensor]] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            outputs.setdefault(name, []).append(out)
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _finish(layers: list[str], choices: list[str], relevance: np.ndarray, total: np.ndarray,
            fallback: np.ndarray, rel_qerr: np.ndarray, settings: dict) -> Profile:
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, relevance / total, 0.0)
    scores = {"share": share.tolist(), "relevance": relevance.tolist(), "total_relevance": total.tolist(),
              "fallback_batches": fallback.tolist()}
    scores.update({f"rel_qerr_{c}": rel_qerr[:, j].tolist() for j, c in enumerate(choices)})
    return Profile(layers=layers, choices=choices, cost=share[:, None] * rel_qerr, scores=scores, settings=settings)


def combine(shards: list[Profile]) -> Profile:
    """Exact merge of batch shards: relevance sums, totals and fallback counts add up."""
    first = shards[0]
    total = {k: np.sum([s.scores[k] for s in shards], axis=0) for k in ("relevance", "total_relevance", "fallback_batches")}
    rel_qerr = np.array([first.scores[f"rel_qerr_{c}"] for c in first.choices]).T
    settings = dict(first.settings)
    settings["fallback_modules"] = {k: v for s in shards for k, v in s.settings["fallback_modules"].items()}
    return _finish(first.layers, first.choices, total["relevance"], total["total_relevance"],
                   total["fallback_batches"], rel_qerr, settings)


@register_profiler("lrp", combine=combine)
def lrp(
    model: nn.Module,
    calib: Calibration,
    graph: LayerGraph,
    choices: list[Choice],
    shard: dict | None = None,
    epsilon: float = 1e-6,
    gamma: float = 0.0,
    attention: str = "attnlrp",
    target: str = "predicted",
) -> Profile:
    """LRP share of every layer times its relative quantization error; see the module docstring.

    epsilon / gamma: linear-rule stabilizer and gamma (0: pure epsilon rule); attention:
    "attnlrp" (softmax gradient rule, q/k get relevance) or "cp" (softmax detached);
    target: "predicted" (predicted class logit per row) or "sum" (sum of the output).
    Relevance of all layers comes from the same backward, so layer shards share the total.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; choose from {TARGETS}")
    names = graph.names
    rows = [names.index(l.name) for l in shard_layers(graph, shard)]
    relevance, fallback = np.zeros(len(names)), np.zeros(len(names))
    fallback_modules: dict[str, str] = {}
    with grads_only(model, list(model.parameters())):
        for b in shard_batches(calib, shard):
            inputs = calib.inputs(b)
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            with LRPRules(model, epsilon=epsilon, gamma=gamma, attention=attention, watch=names) as rules:
                seed = output_seed(calib.forward(model, b), target, mask)
            rel = output_relevance(rules.outputs, seed, names)
            fallback_modules.update(rules.fallback)
            zero = rel == 0
            if zero.any():
                unscored = [names[i] for i in np.flatnonzero(zero)]
                with recording(model, unscored) as outputs:
                    plain_seed = output_seed(calib.forward(model, b), target, mask)
                rel[zero] = output_relevance(outputs, plain_seed, unscored)
                fallback[zero] += 1
            relevance += rel
    layers = [graph.layers[i] for i in rows]
    weight_sq = np.array([[float(model.get_submodule(l.name).weight.detach().double().pow(2).sum())] for l in layers])
    rel_qerr = squared_errors(weight_deltas(model, layers, choices)) / np.maximum(weight_sq, np.finfo(float).tiny)
    settings = {"epsilon": epsilon, "gamma": gamma, "attention": attention, "target": target,
                "score": "output relevance share", "fallback_modules": fallback_modules}
    total = np.full(len(rows), relevance.sum())
    return _finish([l.name for l in layers], [c.label for c in choices], relevance[rows], total,
                   fallback[rows], rel_qerr, settings)
