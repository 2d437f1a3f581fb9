"""Inter-layer dependency profiler: measured pair interactions of nearby layers.

After "Augmenting Hessians with Inter-Layer Dependencies for Mixed-Precision Post-Training
Quantization" (Schaefer et al. 2023): for layers a, b within `hops` of each other in the layer
graph (undirected distance), at the low bit widths,

    Delta_ab(ca, cb) = L(Q_a, Q_b) - L(Q_a) - L(Q_b) + L(none)

on each calibration batch (L: the calibration loss; Q: kernels.fake_quantize with
Choice.spec_for(kind, in_features), as the Hessian profiler uses). An entry is kept when its
mean over batches exceeds `noise_mult` standard errors of that mean and a float rounding
floor `rtol * (|L(none)| + |L(Q_a) - L(none)| + |L(Q_b) - L(none)|)`; kept pairs go to
Profile.pairs[(a, b)] as [C, C] arrays (zero outside the low choices and where not kept).

cost[i, c] is the measured single-layer delta L(Q_i at c) - L(none) (mean over batches), so
the Profile is usable alone; scores["augmented_<choice>"] = cost + 0.5 * the sum of the
layer's positive pair terms with the partner at the same choice, for solvers without pair
terms. Shards are over layers (a shard measures every pair touching its layers, so merged
pairs and augmented scores are exact); the noise estimate needs all batches in one run.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from torch import nn

from kernels import Choice

from .calibration import Calibration
from .graph import LayerGraph, LayerInfo
from .perturb import check_finite_loss, perturbed, weight_delta
from .profile import Profile
from .progress import progress
from .registry import register_profiler, shard_layers


def near_pairs(graph: LayerGraph, hops: int) -> list[tuple[str, str]]:
    """Pairs (a, b), a before b in graph order, at undirected distance 1..hops."""
    order = {n: i for i, n in enumerate(graph.names)}
    undirected = nx.Graph(graph.graph)
    undirected.add_nodes_from(graph.names)
    pairs = set()
    for a in graph.names:
        for b, d in nx.single_source_shortest_path_length(undirected, a, cutoff=hops).items():
            if 0 < d and b in order and order[a] < order[b]:
                pairs.add((a, b))
    return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))


def low_choices(choices: list[Choice], low: int) -> list[int]:
    """Indices of the `low` choices with the fewest weight bits (ties: first listed)."""
    return sorted(sorted(range(len(choices)), key=lambda j: choices[j].wbits)[:low])


class LossTable:
    """Per-batch calibration losses of the model with some layers quantized, memoised."""

    def __init__(self, model: nn.Module, calib: Calibration, layers: dict[str, LayerInfo], choices: list[Choice]):
        self.model, self.calib, self.layers, self.choices = model, calib, layers, choices
        self._deltas: dict[tuple[str, int], torch.Tensor] = {}
        self._losses: dict[tuple[tuple[str, int], ...], np.ndarray] = {}

    def delta(self, name: str, c: int) -> torch.Tensor:
        if (name, c) not in self._deltas:
            self._deltas[(name, c)] = weight_delta(self.model.get_submodule(name), self.layers[name], self.choices[c])
        return self._deltas[(name, c)]

    def __call__(self, *quantized: tuple[str, int]) -> np.ndarray:
        """Losses [batches] with each (layer, choice index) in `quantized` fake-quantized."""
        key = tuple(sorted(quantized))
        if key not in self._losses:
            with torch.no_grad(), perturbed(self.model, {n: self.delta(n, c) for n, c in key}):
                losses = []
                for b in range(len(self.calib)):
                    loss = self.calib.loss(self.model, b)
                    check_finite_loss(loss, b)
                    losses.append(float(loss))
            self._losses[key] = np.array(losses, dtype=np.float64)
        return self._losses[key]

    def interaction(self, a: tuple[str, int], b: tuple[str, int]) -> np.ndarray:
        """Per-batch Delta_ab = L(Q_a, Q_b) - L(Q_a) - L(Q_b) + L(none)."""
        return self(a, b) - self(a) - self(b) + self()


def significant(per_batch: np.ndarray, floor: float, noise_mult: float) -> float:
    """The mean of per-batch values if it exceeds noise_mult standard errors and `floor`, else 0."""
    mean = float(per_batch.mean())
    stderr = float(per_batch.std(ddof=1) / np.sqrt(len(per_batch)))
    return mean if abs(mean) > max(noise_mult * stderr, floor) else 0.0


@register_profiler("interlayer")
def interlayer(
    model: nn.Module,
    calib: Calibration,
    graph: LayerGraph,
    choices: list[Choice],
    shard: dict | None = None,
    hops: int = 2,
    low: int = 2,
    noise_mult: float = 2.0,
    rtol: float = 1e-5,
) -> Profile:
    """Single-layer deltas as cost, significant pair interactions as pairs; see the module docstring.

    hops: graph distance within which pairs are measured; low: how many of the lowest-bit
    choices get pair terms; noise_mult: standard errors an interaction must exceed;
    rtol: relative float rounding floor.
    """
    if shard is not None and "batches" in shard:
        raise ValueError("the interlayer profiler shards over layers, not batches: its noise estimate needs every batch")
    if len(calib) < 2:
        raise ValueError(f"the interlayer profiler needs at least 2 calibration batches to estimate noise, got {len(calib)}")
    if hops < 1 or low < 1:
        raise ValueError(f"hops={hops} and low={low} must be >= 1")
    layers = shard_layers(graph, shard)
    mine = {l.name for l in layers}
    table = LossTable(model, calib, {l.name: l for l in graph.layers}, choices)
    base = table()  # first, so self-distillation references come from the float model
    cost = np.array([[float((table((l.name, c)) - base).mean()) for c in range(len(choices))] for l in layers])
    pairs: dict[tuple[str, str], np.ndarray] = {}
    for a, b in progress(near_pairs(graph, hops), desc="interlayer: layer pairs", unit="pair"):
        if a not in mine and b not in mine:
            continue
        d = np.zeros((len(choices), len(choices)))
        for ca in low_choices(choices, low):
            for cb in low_choices(choices, low):
                scale = abs(base.mean()) + abs((table((a, ca)) - base).mean()) + abs((table((b, cb)) - base).mean())
                d[ca, cb] = significant(table.interaction((a, ca), (b, cb)), rtol * scale, noise_mult)
        if d.any():
            pairs[(a, b)] = d
    names = [l.name for l in layers]
    extra = np.zeros_like(cost)
    kept = np.zeros(len(names))
    for (a, b), d in pairs.items():
        for name in (a, b):
            if name in mine:
                i = names.index(name)
                extra[i] += 0.5 * np.clip(np.diag(d), 0, None)
                kept[i] += 1
    scores = {f"augmented_{c.label}": (cost[:, j] + extra[:, j]).tolist() for j, c in enumerate(choices)}
    scores["pairs"] = kept.tolist()
    settings = {"hops": hops, "low": [choices[j].label for j in low_choices(choices, low)],
                "noise_mult": noise_mult, "rtol": rtol}
    return Profile(layers=names, choices=[c.label for c in choices], cost=cost, scores=scores, pairs=pairs,
                   settings=settings)
