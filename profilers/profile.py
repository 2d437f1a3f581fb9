"""The Profile: every profiler's result, a cost table Omega[layer, choice] plus raw scores.

Shards merge exactly (`merge`): shards over disjoint layers concatenate; shards over
calibration batches (same layers) are combined by the profiler's registered `combine`
function from the additive statistics it keeps in `scores` (sums and counts).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kernels.fileio import atomic_write_json

PAIR_SEP = "||"


@dataclass
class Profile:
    """Per-layer, per-choice quantization cost from one profiler.

    layers: layer names (rows of `cost`); choices: kernels.Choice labels (columns).
    cost: float array [L, C], Omega_i(b), lower is better (roughly: loss increase).
    scores: raw per-layer numbers, each a list of length L (e.g. "trace", "rel_stderr",
        or additive statistics such as "sum", "count" that `merge` needs).
    pairs: optional pair terms {(layer_a, layer_b): array [C, C]} (inter-layer profilers).
    profiler / settings: who made it and with what (defaults filled in).
    model_hash / calib_hash: identity of the model weights and the calibration data.
    elapsed_s: wall time of the profiler run (sum over shards after a merge).
    shard: None for a full run, else {"layers": [...]} or {"batches": [...]}.
    """

    layers: list[str]
    choices: list[str]
    cost: np.ndarray
    scores: dict[str, list[float]] = field(default_factory=dict)
    pairs: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    profiler: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    model_hash: str = ""
    calib_hash: str = ""
    elapsed_s: float = 0.0
    shard: dict[str, list] | None = None

    def __post_init__(self) -> None:
        self.cost = np.asarray(self.cost, dtype=np.float64).reshape(len(self.layers), len(self.choices))
        for key, values in self.scores.items():
            if len(values) != len(self.layers):
                raise ValueError(f"score {key!r} has {len(values)} values for {len(self.layers)} layers")
        self.pairs = {tuple(k): np.asarray(v, dtype=np.float64) for k, v in self.pairs.items()}

    def layer_scores(self, key: str) -> dict[str, float]:
        """One score as {layer: value}."""
        return dict(zip(self.layers, self.scores[key]))

    def per_choice(self, key: str) -> np.ndarray:
        """Scores stored per choice as f"{key}_{label}" (e.g. "qerr_w4"), as an array [L, C]."""
        cols = [self.scores[f"{key}_{c}"] for c in self.choices]
        return np.array(cols, dtype=np.float64).T.reshape(len(self.layers), len(self.choices))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "choices": list(self.choices),
            "cost": self.cost.tolist(),
            "scores": {k: [float(x) for x in v] for k, v in self.scores.items()},
            "pairs": {f"{a}{PAIR_SEP}{b}": v.tolist() for (a, b), v in self.pairs.items()},
            "profiler": self.profiler,
            "settings": self.settings,
            "model_hash": self.model_hash,
            "calib_hash": self.calib_hash,
            "elapsed_s": self.elapsed_s,
            "shard": self.shard,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        pairs = {tuple(k.split(PAIR_SEP, 1)): np.asarray(v) for k, v in d.get("pairs", {}).items()}
        return cls(
            layers=list(d["layers"]),
            choices=list(d["choices"]),
            cost=np.asarray(d["cost"], dtype=np.float64),
            scores={k: list(v) for k, v in d.get("scores", {}).items()},
            pairs=pairs,
            profiler=d.get("profiler", ""),
            settings=d.get("settings", {}),
            model_hash=d.get("model_hash", ""),
            calib_hash=d.get("calib_hash", ""),
            elapsed_s=float(d.get("elapsed_s", 0.0)),
            shard=d.get("shard"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write compact JSON atomically (`kernels.fileio`)."""
        atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @staticmethod
    def merge(profiles: Sequence["Profile"]) -> "Profile":
        """Merge shards of one profiling request; see `merge`."""
        return merge(profiles)


def merge(profiles: Sequence[Profile]) -> Profile:
    """Merge shards exactly.

    Disjoint layer sets: rows concatenate (in shard order), scores and pairs join.
    Identical layer sets (batch shards): the profiler's registered `combine` adds up the
    additive statistics and recomputes cost. Mixed overlaps are an error.
    """
    if not profiles:
        raise ValueError("merge() needs at least one profile")
    first = profiles[0]
    for p in profiles[1:]:
        for attr in ("choices", "profiler", "model_hash", "calib_hash"):
            if getattr(p, attr) != getattr(first, attr):
                raise ValueError(f"cannot merge profiles with different {attr}: {getattr(first, attr)!r} vs {getattr(p, attr)!r}")
    if len(profiles) == 1:
        return first
    layer_sets = [set(p.layers) for p in profiles]
    if all(s == layer_sets[0] for s in layer_sets):
        from .registry import PROFILERS  # deferred: registry imports this module

        combine = getattr(PROFILERS.get(first.profiler), "combine", None)
        if combine is None:
            raise ValueError(f"profiler {first.profiler!r} has no combine() for shards over batches")
        merged = combine(list(profiles))
        merged.profiler, merged.model_hash, merged.calib_hash = first.profiler, first.model_hash, first.calib_hash
        merged.elapsed_s = sum(p.elapsed_s for p in profiles)
        return merged
    seen: set[str] = set()
    for s in layer_sets:
        if seen & s:
            raise ValueError(f"shards overlap on layers {sorted(seen & s)} but do not cover the same layers")
        seen |= s
    keys = set(first.scores)
    if any(set(p.scores) != keys for p in profiles):
        raise ValueError("cannot merge layer shards with different score keys")
    pairs: dict[tuple[str, str], np.ndarray] = {}
    for p in profiles:
        pairs.update(p.pairs)
    return Profile(
        layers=[name for p in profiles for name in p.layers],
        choices=list(first.choices),
        cost=np.concatenate([p.cost for p in profiles], axis=0),
        scores={k: [x for p in profiles for x in p.scores[k]] for k in first.scores},
        pairs=pairs,
        profiler=first.profiler,
        settings=dict(first.settings),
        model_hash=first.model_hash,
        calib_hash=first.calib_hash,
        elapsed_s=sum(p.elapsed_s for p in profiles),
        shard=None,
    )
