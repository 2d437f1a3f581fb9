"""Profiler registry and the `profile()` entry point (dispatch, sharding, on-disk cache).

A profiler is a function registered by name:

    @register_profiler("hessian", combine=combine_fn)
    def hessian(model, calib, graph, choices, shard=None, **settings) -> Profile: ...

It gets the model (in eval mode), a `Calibration`, the `LayerGraph`, a list of
`kernels.Choice`, and `shard` (None, {"layers": [names]} or {"batches": [indices]}); it profiles
`shard_layers(graph, shard)` on `shard_batches(calib, shard)` and returns a Profile with
layers, choices (labels), cost, scores and its effective settings. `profile()` fills in
profiler, model_hash, calib_hash, elapsed_s and shard. `combine(shards) -> Profile` merges
shards over batches exactly (from additive statistics the profiler keeps in scores).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from kernels import Choice

from . import cache
from .calibration import Calibration, model_hash
from .graph import LayerGraph, LayerInfo
from .profile import Profile

ProfilerFn = Callable[..., Profile]
PROFILERS: dict[str, ProfilerFn] = {}


def register_profiler(name: str, combine: Callable[[list[Profile]], Profile] | None = None) -> Callable[[ProfilerFn], ProfilerFn]:
    """Decorator: register a profiler function under `name` (its `combine` merges batch shards)."""

    def deco(fn: ProfilerFn) -> ProfilerFn:
        if name in PROFILERS and PROFILERS[name] is not fn:
            raise ValueError(f"profiler {name!r} is already registered")
        fn.combine = combine  # type: ignore[attr-defined]
        PROFILERS[name] = fn
        return fn

    return deco


def parse_choices(choices: Iterable[Choice | str | int]) -> list[Choice]:
    """Choices as kernels.Choice: Choice objects, labels ("w4g64") or plain bit widths."""
    out = []
    for c in choices:
        if isinstance(c, Choice):
            out.append(c)
        elif isinstance(c, str):
            out.append(Choice.parse(c))
        elif isinstance(c, int) and not isinstance(c, bool):
            out.append(Choice(c))
        else:
            raise TypeError(f"choice {c!r} is not a kernels.Choice, a label or a bit width")
    if not out:
        raise ValueError("no choices given")
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate choices: {labels}")
    return out


def normalize_shard(shard: dict[str, Sequence] | None, graph: LayerGraph, calib: Calibration) -> dict[str, list] | None:
    """Check a shard spec: None, {"layers": [names]} or {"batches": [indices]}."""
    if shard is None:
        return None
    if not isinstance(shard, dict) or set(shard) - {"layers", "batches"} or len(shard) != 1:
        raise ValueError(f"shard must be {{'layers': [names]}} or {{'batches': [indices]}}, not {shard!r}")
    if "layers" in shard:
        names = list(shard["layers"])
        unknown = [n for n in names if n not in graph.names]
        if unknown:
            raise ValueError(f"shard names unknown layers {unknown}; the graph has {graph.names}")
        return {"layers": names}
    idx = [int(i) for i in shard["batches"]]
    bad = [i for i in idx if not 0 <= i < len(calib)]
    if bad:
        raise ValueError(f"shard batch indices {bad} out of range for {len(calib)} calibration batches")
    return {"batches": sorted(set(idx))}


def shard_layers(graph: LayerGraph, shard: dict[str, list] | None) -> list[LayerInfo]:
    """The layers a (normalised) shard covers, in graph order."""
    if shard is None or "layers" not in shard:
        return list(graph.layers)
    wanted = set(shard["layers"])
    return [l for l in graph.layers if l.name in wanted]


def shard_batches(calib: Calibration, shard: dict[str, list] | None) -> list[int]:
    """The calibration batch indices a (normalised) shard covers."""
    if shard is None or "batches" not in shard:
        return list(range(len(calib)))
    return list(shard["batches"])


def profile(
    model: nn.Module,
    calib: Calibration | Iterable,
    graph: LayerGraph,
    choices: Iterable[Choice | str | int],
    profiler: str = "hessian",
    cache_dir: str | None = None,
    shard: dict[str, Sequence] | None = None,
    **settings: Any,
) -> Profile:
    """Run profiler `profiler` (a key of PROFILERS) and return its Profile.

    calib: a Calibration or an iterable of batches. With `cache_dir`, a result for the same
    model weights, calibration data, profiler, choices, layers, settings and shard is loaded
    instead of recomputed. The model is put in eval mode for the run and restored after.
    """
    if profiler not in PROFILERS:
        raise ValueError(f"unknown profiler {profiler!r}; registered: {sorted(PROFILERS)}")
    if not isinstance(calib, Calibration):
        calib = Calibration(calib)
    choice_objs = parse_choices(choices)
    labels = [c.label for c in choice_objs]
    shard_n = normalize_shard(shard, graph, calib)
    m_hash, c_hash = model_hash(model), calib.hash()
    key = cache.cache_key(model_hash=m_hash, calib_hash=c_hash, profiler=profiler, choices=labels,
                          layers=graph.names, settings=settings, shard=shard_n)
    if cache_dir is not None:
        hit = cache.load_cached(cache_dir, key, profiler)
        if hit is not None:
            return hit
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        prof = PROFILERS[profiler](model, calib, graph, choice_objs, shard=shard_n, **settings)
    finally:
        model.train(was_training)
    prof.profiler, prof.model_hash, prof.calib_hash, prof.shard = profiler, m_hash, c_hash, shard_n
    prof.elapsed_s = time.perf_counter() - start
    if cache_dir is not None:
        cache.store(cache_dir, key, prof)
    return prof
