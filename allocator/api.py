"""The allocation verbs: profile a model, turn the profile into a Problem, solve it, return a Plan."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch.nn as nn

from kernels import SUPPORTED_BITS, Choice, weight_nbytes
from kernels.fileio import atomic_write_json
from kernels.gpu_activation_quant import unsupported_reason as act_unsupported_reason
from kernels.latency import LatencyTable, forward_ms, parse_entry_key
from kernels.model_latency import model_key
from profilers import Calibration, LayerGraph, Profile, build_layer_graph, profile
from solvers import InfeasibleError, Problem, Solution, solve
from solvers.problem import latency_at_name
from solvers.solve import smallest as least_total

from .budget import MIB, Budget
from .io import read_json
from .model import model_identity, quantized_layer_bias_bytes, storage_bytes
from .plan import LayerPlan, ModelIdentity, Plan

log = logging.getLogger("bitalloc")

SLOW_ELSEWHERE = 1.5  # warn_slow_elsewhere: a plan this many times the fastest at an unbounded token count

FLOAT_ACT_BITS = 16
LAYERS_ONLY = ("quantized layers only: the latency table holds no rest-of-model figure for this model "
               "(measure one with kernels.model_latency.measure_rest or `bitalloc latency --model`)")


@dataclass
class ProfiledModel:
    """Everything needed to solve again under other budgets without the model: layer graph, profile,
    the bytes of the model's unquantized rest, the model's identity, and the key of its rest in latency tables
    (``kernels.model_latency.model_key``; "" for profiles saved before it existed). Saved by ``bitalloc profile``."""

    graph: LayerGraph
    profile: Profile
    fixed_bytes: int
    model: ModelIdentity
    rest_key: str = ""

    @classmethod
    def build(cls, model: nn.Module, graph: LayerGraph, prof: Profile) -> ProfiledModel:
        """Wrap a profile of ``model``'s layers in ``graph``: the rest's bytes, the identity and the rest key."""
        fixed = storage_bytes(model, exclude=set(graph.names)) + quantized_layer_bias_bytes(model, graph.names)
        return cls(graph, prof, fixed, model_identity(model), model_key(model, graph.names))

    def to_dict(self) -> dict:
        return {"kind": "bitalloc.profiled_model", "model": asdict(self.model), "fixed_bytes": self.fixed_bytes,
                "rest_key": self.rest_key, "graph": self.graph.to_dict(), "profile": self.profile.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ProfiledModel:
        if data.get("kind") != "bitalloc.profiled_model":
            raise ValueError("not a bitalloc profile file (its 'kind' is not 'bitalloc.profiled_model'); write one with `bitalloc profile`")
        return cls(LayerGraph.from_dict(data["graph"]), Profile.from_dict(data["profile"]), int(data["fixed_bytes"]),
                   ModelIdentity(**data["model"]), data.get("rest_key", ""))

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> ProfiledModel:
        return cls.from_dict(read_json(path, "profile"))


def parse_choices(bits: Iterable[int] | None, choices: Iterable[Choice | str] | None) -> list[Choice]:
    """Candidate choices from plain weight bits, or from Choice objects / labels."""
    if choices is not None:
        out = [c if isinstance(c, Choice) else Choice.parse(c) for c in choices]
    else:
        bits = tuple(bits or ())
        bad = [b for b in bits if b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"bits={bad} not supported; choose from {SUPPORTED_BITS}")
        out = [Choice(int(b)) for b in sorted(set(bits))]
    if not out:
        raise ValueError("give at least one candidate in bits= or choices=")
    for c in out:
        if c.abits is not None and (reason := act_unsupported_reason(c)) is not None:
            raise ValueError(f"choices: {reason}")
    return out


def profile_model(
    model: nn.Module,
    calib: Calibration | Sequence,
    choices: Sequence[Choice],
    profiler: str = "hessian",
    cache_dir: str | None = None,
    **settings,
) -> ProfiledModel:
    """Build the layer graph and profile every quantizable layer at every choice."""
    calib = calib if isinstance(calib, Calibration) else Calibration(calib)
    graph = build_layer_graph(model, calib[0])
    log.info("layer graph: %d quantizable layers, %d skipped", len(graph), len(graph.skipped))
    prof = profile(model, calib, graph, choices, profiler=profiler, cache_dir=cache_dir, **settings)
    return ProfiledModel.build(model, graph, prof)


def build_problem(profiled: ProfiledModel, pins: dict[str, str] | None = None, ties: Sequence[Sequence[str]] = (),
                  latency_table: LatencyTable | None = None, tokens: int | Sequence[int] = 1) -> Problem:
    """The solver's table: cost from the profile; bytes, bits and BOPs from the exact memory model; latency
    (what each layer adds to a whole-model forward, ``LatencyTable.layer_ms``) from a measured
    ``kernels.LatencyTable`` at ``tokens`` tokens per forward: one count fills the Problem's ``latency`` column,
    a sequence fills ``latency_at`` (a column per count, budgets "latency@<tokens>"). The table's removed choices
    (those the device cannot run) become unavailable, as do library-kernel choices on layers the kernel cannot hold
    (``Choice.kernel_reason``)."""
    graph, prof = profiled.graph, profiled.profile
    if list(prof.layers) != graph.names:
        raise ValueError("the profile's layers do not match the layer graph (was it made for another model?)")
    choices = [Choice.parse(label) for label in prof.choices]
    counts = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    memory = np.zeros((len(graph), len(choices)))
    bits = np.zeros_like(memory)
    bops = np.zeros_like(memory)
    latency = {} if latency_table is None else {t: np.zeros_like(memory) for t in counts}
    allowed = np.ones(memory.shape, dtype=bool)
    for i, layer in enumerate(graph.layers):
        for j, choice in enumerate(choices):
            spec = choice.spec_for(layer.kind, layer.in_features)
            shape = (layer.out_features, layer.in_features)
            memory[i, j] = weight_nbytes(shape, spec, choice.kernel)
            bits[i, j] = choice.wbits
            bops[i, j] = layer.macs * choice.wbits * (choice.abits or FLOAT_ACT_BITS)
            if choice.kernel_reason(layer.kind, shape) is not None:
                allowed[i, j] = False
                continue
            if latency_table is not None:
                if choice.label in latency_table.skipped:
                    allowed[i, j] = False
                    continue
                for t in counts:
                    latency[t][i, j] = forward_ms(latency_table.layer_ms, layer, shape, choice, t)
    one = latency and isinstance(tokens, int)
    return Problem(
        layers=graph.names,
        choices=list(prof.choices),
        cost=np.asarray(prof.cost, dtype=float),
        memory=memory,
        bits=bits,
        bops=bops,
        latency=latency[tokens] if one else None,
        latency_at=None if one else latency,
        allowed=allowed,
        params=np.array([layer.params for layer in graph.layers], dtype=float),
        pairs={tuple(k): np.asarray(v) for k, v in prof.pairs.items()},
        pins=dict(pins or {}),
        ties=[tuple(t) for t in ties],
    )


def rest_latency_ms(profiled: ProfiledModel, latency_table: LatencyTable | None, tokens: int) -> float | None:
    """The latency table's figure for the model's unquantized rest at ``tokens`` tokens (None: it has none)."""
    if latency_table is None or not profiled.rest_key:
        return None
    return latency_table.rest_ms(profiled.rest_key, tokens)


def solver_budgets(budget: Budget, fixed_bytes: int,
                   rest_ms: float | Mapping[int, float | None] = 0.0) -> dict[str, float | dict[int, float]]:
    """Translate a user Budget into the solver's per-layer budgets (memory and latency minus the unquantized rest;
    ``rest_ms`` by token count for a Budget whose ``latency_ms`` is a mapping)."""
    out: dict[str, float | dict[int, float]] = {}
    if budget.memory_mb is not None:
        out["memory"] = budget.memory_bytes - fixed_bytes
    if budget.avg_bits is not None:
        out["avg_bits"] = budget.avg_bits
    if budget.bops is not None:
        out["bops"] = budget.bops
    if isinstance(budget.latency_ms, Mapping):
        rests = rest_ms if isinstance(rest_ms, Mapping) else {}
        out["latency"] = {t: ms - (rests.get(t) or 0.0) for t, ms in budget.latency_ms.items()}
    elif budget.latency_ms is not None:
        out["latency"] = budget.latency_ms - rest_ms
    return out


def solve_profiled(
    profiled: ProfiledModel,
    budget: Budget,
    method: str = "ilp",
    pins: dict[str, str] | None = None,
    ties: Sequence[Sequence[str]] = (),
    latency_table: LatencyTable | None = None,
    tokens: int = 1,
    **solver_options,
) -> Plan:
    """Solve a profiled model under ``budget`` and return the Plan. A latency budget needs ``latency_table``
    (``kernels.latency.measure`` on the target device); a number bounds it at ``tokens`` tokens per forward, a
    mapping {tokens: ms} at each of its token counts. It bounds the whole model's latency (the table's rest of this
    model + the quantized layers) when the table holds the model's rest (``kernels.model_latency.measure_rest``),
    else the quantized layers' summed latency (the plan says which). With a table, the plan's
    ``predicted["latency_ms_at"]`` gives its latency at every token count the table measured."""
    bounds = budget.latency_at(tokens)
    if bounds and latency_table is None:
        raise ValueError("a latency budget needs a latency table: pass latency_table=kernels.latency.measure(...) "
                         "measured on the target device")
    per_tokens = isinstance(budget.latency_ms, Mapping)
    counts = tuple(bounds) if per_tokens else (tokens,)
    if latency_table is not None:
        check_table_tokens(latency_table, latency_table.rest.get(profiled.rest_key), counts)
    problem = build_problem(profiled, pins=pins, ties=ties, latency_table=latency_table,
                            tokens=counts if per_tokens else tokens)
    rests = {t: rest_latency_ms(profiled, latency_table, t) for t in counts}
    budgets = solver_budgets(budget, profiled.fixed_bytes, rests if per_tokens else rests[tokens] or 0.0)
    for t, ms in bounds.items():
        if rests[t] is not None and ms <= rests[t]:
            least = rests[t] + least_total(problem, latency_at_name(t) if per_tokens else "latency")
            raise InfeasibleError(
                f"latency budget {ms:g} ms at {t} tokens is below the model's unquantized rest alone: the rest takes "
                f"{rests[t]:.4g} ms at {t} tokens on {latency_table.device}; the smallest achievable is {least:.4g} ms",
                smallest={"latency_ms" if not per_tokens else f"latency_ms@{t}": least},
            )
    if budgets.get("memory", 1) <= 0:
        smallest = profiled.fixed_bytes + problem.memory.min(axis=1).sum()
        raise InfeasibleError(
            f"memory budget {budget.memory_mb:g} MiB is below the model's unquantized rest alone "
            f"({profiled.fixed_bytes / MIB:.4f} MiB); the smallest achievable is {smallest / MIB:.4f} MiB",
            smallest={"memory_mb": smallest / MIB},
        )
    try:
        solution = solve(problem, method=method, **budgets, **solver_options)
    except InfeasibleError as e:
        raise _in_user_units(e, profiled.fixed_bytes, rests, counts[0]) from None
    log.info("%s", solution.summary())
    plan = plan_from_solution(profiled, problem, solution, budget, rests if per_tokens else rests[tokens])
    if latency_table is not None:
        plan.solver.update(latency_tokens=counts[0], latency_table=latency_table.device)
        plan.predicted["latency_ms_at"], fastest = latency_by_tokens(profiled, problem, solution, latency_table)
        if bounds:
            warn_slow_elsewhere(plan, fastest, bounds)
    return plan


def check_table_tokens(table: LatencyTable, rest, counts: Sequence[int]) -> None:
    """A clear error where the table (or its rest of this model, ``rest``) was not measured at every count."""
    measured = table_tokens(table)
    missing = [t for t in counts if t not in measured]
    if missing:
        raise ValueError(f"the latency table ({table.device}) was measured at tokens {measured}, not at {missing}; "
                         f"measure it with kernels.latency.measure(..., tokens={tuple(counts)}) or "
                         f"`bitalloc latency --tokens {','.join(map(str, counts))}`")
    missing = [] if rest is None else [t for t in counts if t not in rest.ms]
    if missing:
        raise ValueError(f"the latency table ({table.device}) holds this model's unquantized rest at tokens "
                         f"{sorted(rest.ms)}, not at {missing}; measure it with kernels.model_latency.measure_rest("
                         f"model, graph, tokens={tuple(missing)}, device=..., table=table) or `bitalloc latency --model`")


def table_tokens(table: LatencyTable) -> list[int]:
    """The token counts a latency table has entries at."""
    return sorted({parse_entry_key(key)[3] for key in table.entries})


def latency_by_tokens(profiled: ProfiledModel, problem: Problem, solution: Solution,
                      table: LatencyTable) -> tuple[dict[str, float], dict[str, float]]:
    """A solved plan's predicted latency at every token count ``table`` measured for all its layers' choices, and the
    least any plan of ``problem`` reaches there (every layer at its fastest allowed choice, pins and ties kept per
    layer); each {"tokens": ms}, the whole model's where the table holds its rest at that count, else the layers':
    a plan bounded at decode shows here what it costs at prefill, and how far that is from the fastest."""
    plan_ms, fastest = {}, {}
    rows, index = np.arange(len(solution.index)), np.asarray(solution.index)
    allowed = problem.reduced.allowed[problem.reduced.group_of]
    for t in table_tokens(table):
        ms = _layer_choice_ms(profiled, problem, table, t)
        rest = _rest_or_nan(profiled, table, t)
        if np.isnan(rest):
            continue
        if np.isfinite(ms[rows, index]).all():
            plan_ms[str(t)] = float(ms[rows, index].sum() + rest)
        least = np.where(allowed, ms, np.inf).min(axis=1)
        if np.isfinite(least).all():
            fastest[str(t)] = float(least.sum() + rest)
    return plan_ms, fastest


def _layer_choice_ms(profiled: ProfiledModel, problem: Problem, table: LatencyTable, tokens: int) -> np.ndarray:
    """[layers, choices]: what each layer adds to a forward at ``tokens`` tokens with each choice (inf: not
    measured)."""
    out = np.full((len(profiled.graph.layers), len(problem.choices)), np.inf)
    for i, layer in enumerate(profiled.graph.layers):
        for j, choice in enumerate(problem.choices):
            try:
                out[i, j] = forward_ms(table.layer_ms, layer, (layer.out_features, layer.in_features), choice, tokens)
            except KeyError:
                pass
    return out


def _rest_or_nan(profiled: ProfiledModel, table: LatencyTable, tokens: int) -> float:
    """The rest's latency at ``tokens`` (0 where the table holds no rest of this model, NaN where not at this count)."""
    try:
        return rest_latency_ms(profiled, table, tokens) or 0.0
    except KeyError:
        return float("nan")


def warn_slow_elsewhere(plan: Plan, fastest: Mapping[str, float], bounded: Iterable[int]) -> None:
    """Warn where a latency-bounded plan takes more than ``SLOW_ELSEWHERE`` times the fastest plan's latency at a
    token count its budget leaves unbounded (a decode bound alone can choose a kernel that is fast at 1 token and
    many times slower at 512, e.g. ``w4@tinygemm``)."""
    bounded = {int(t) for t in bounded}
    for t, ms in plan.predicted.get("latency_ms_at", {}).items():
        least = fastest.get(t)
        if int(t) not in bounded and least and ms > SLOW_ELSEWHERE * least:
            both = sorted(bounded | {int(t)})
            warnings.warn(
                f"the plan takes {ms:.4g} ms at {t} tokens, {ms / least:.1f}x the fastest plan there ({least:.4g} ms), "
                f"because its latency budget bounds only {sorted(bounded)} tokens; to bound both, give "
                f"Budget(latency_ms={{{', '.join(f'{b}: ...' for b in both)}}}) "
                f"(CLI: --latency-ms {','.join(f'{b}:MS' for b in both)})", stacklevel=3)


def _in_user_units(error: InfeasibleError, fixed_bytes: int, rests: Mapping[int, float | None],
                   tokens: int) -> InfeasibleError:
    """Restate a solver's infeasibility in the Budget's units (whole-model MiB instead of layer bytes, and
    whole-model ms instead of the layers' where the rest's latency is known; "latency" is at ``tokens``)."""
    least = {}
    for name, value in error.smallest.items():
        if name == "memory":
            least["memory_mb"] = (value + fixed_bytes) / MIB
        elif name == "latency" and rests.get(tokens) is not None:
            least["latency_ms"] = value + rests[tokens]
        elif name.startswith("latency@"):
            t = int(name.split("@")[1])
            least[f"latency_ms@{t}"] = value + (rests.get(t) or 0.0)
        else:
            least[name] = value
    parts = [f"{k} >= {v:.6g}" for k, v in least.items()]
    return InfeasibleError(f"no plan meets the budget; smallest achievable: {', '.join(parts)} ({error})", smallest=least)


def plan_from_solution(profiled: ProfiledModel, problem: Problem, solution: Solution, budget: Budget,
                       rest_ms: float | Mapping[int, float | None] | None = None) -> Plan:
    """Turn a solver Solution into a Plan with exact specs, bytes and predictions. With a latency column, the
    predicted ``latency_ms`` is the whole model's (``rest_ms`` + layers) when ``rest_ms`` is given, else the
    layers' sum; ``latency_layers_ms`` is always the layers' sum and ``solver["latency_scope"]`` says which. With
    columns at several token counts (``Problem.latency_at``; ``rest_ms`` then by token count) these are at the
    smallest count."""
    graph, prof = profiled.graph, profiled.profile
    layers = []
    for i, layer in enumerate(graph.layers):
        j = int(solution.index[i])
        choice = Choice.parse(prof.choices[j])
        spec = choice.spec_for(layer.kind, layer.in_features)
        layers.append(LayerPlan(
            name=layer.name, kind=layer.kind, weight_shape=tuple(layer.weight_shape), choice=choice.label,
            bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric, params=layer.params,
            bytes=int(problem.memory[i, j]), cost=float(prof.cost[i, j]), abits=choice.abits, scale_dtype=spec.scale_dtype,
            conv=layer.conv, calls=layer.calls,
        ))
    layer_bytes = sum(layer.bytes for layer in layers)
    n = sum(layer.params for layer in layers)
    predicted = {
        "layer_bytes": layer_bytes,
        "total_bytes": layer_bytes + profiled.fixed_bytes,
        "fixed_bytes": profiled.fixed_bytes,
        "avg_bits": sum(layer.bits * layer.params for layer in layers) / n,
        "cost": float(solution.objective),
        "bops": float(sum(problem.bops[i, int(solution.index[i])] for i in range(len(layers)))),
    }
    scope = {}
    table = problem.latency
    if table is None and problem.latency_at:
        first, table = next(iter(problem.latency_at.items()))
        rest_ms = rest_ms.get(first) if isinstance(rest_ms, Mapping) else rest_ms
    if table is not None:
        layers_ms = float(sum(table[i, int(solution.index[i])] for i in range(len(layers))))
        predicted["latency_layers_ms"] = layers_ms
        predicted["latency_ms"] = layers_ms if rest_ms is None else rest_ms + layers_ms
        if rest_ms is not None:
            predicted["latency_rest_ms"] = rest_ms
        scope = {"latency_scope": "whole model" if rest_ms is not None else LAYERS_ONLY}
    return Plan(
        model=profiled.model,
        layers=layers,
        budget=budget,
        predicted=predicted,
        profiler={"name": prof.profiler, "settings": prof.settings, "elapsed_s": prof.elapsed_s},
        solver={"method": solution.method, "status": solution.status, "objective": float(solution.objective),
                "binding": list(solution.binding), "slack": {k: float(v) for k, v in solution.slack.items()},
                "solve_time_s": float(solution.solve_time_s), **scope},
        skipped=dict(graph.skipped),
    )


def uniform_plan(profiled: ProfiledModel, choice: Choice | str) -> Plan:
    """The plan that puts every layer at the same choice (the baseline a mixed plan must beat)."""
    label = choice.label if isinstance(choice, Choice) else Choice.parse(choice).label
    problem = build_problem(profiled)
    if label not in problem.choices:
        raise ValueError(f"choice {label!r} was not profiled; profiled choices: {problem.choices}")
    blocked = [f"{layer.name} ({reason})" for layer in profiled.graph.layers
               if (reason := Choice.parse(label).kernel_reason(layer.kind, (layer.out_features, layer.in_features)))]
    if blocked:
        raise ValueError(f"choice {label!r} cannot hold {len(blocked)} layer(s): {'; '.join(blocked)}")
    index = np.full(len(problem.layers), problem.choices.index(label))
    solution = Solution.build(problem, index, {}, method="uniform", status="fixed", solve_time_s=0.0)
    return plan_from_solution(profiled, problem, solution, Budget(avg_bits=float(Choice.parse(label).wbits)))


def allocate(
    model: nn.Module,
    calib: Calibration | Sequence,
    budget: Budget,
    bits: Iterable[int] | None = (2, 3, 4, 8),
    choices: Iterable[Choice | str] | None = None,
    profiler: str = "hessian",
    method: str = "ilp",
    pins: dict[str, str] | None = None,
    ties: Sequence[Sequence[str]] = (),
    cache_dir: str | None = None,
    profiler_settings: dict | None = None,
    solver_options: dict | None = None,
    latency_table: LatencyTable | None = None,
    tokens: int = 1,
) -> Plan:
    """Choose a bit width for every quantizable layer of ``model`` within ``budget``.

    Example::

        plan = allocate(model, calib_batches, Budget(avg_bits=4.0), bits=(2, 3, 4, 8))
        plan.save("plan.json")
        qmodel = plan.apply(model)

    calib: batches as the model's forward takes them (tensor, tuple of tensors, or dict of keyword inputs,
    optionally with "labels"). profiler: a name in ``profilers.PROFILERS``; method: a name in ``solvers.SOLVERS``.
    """
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, e.g. Budget(avg_bits=4.0); got {type(budget).__name__}")
    if method == "bisect":
        raise ValueError("method='bisect' searches for a quality target, not a budget: use "
                         "allocator.allocate_to_target(model, calib, eval_batches, metric=..., tolerance=...)")
    start = time.perf_counter()
    profiled = profile_model(model, calib, parse_choices(bits, choices), profiler=profiler, cache_dir=cache_dir,
                             **(profiler_settings or {}))
    plan = solve_profiled(profiled, budget, method=method, pins=pins, ties=ties, latency_table=latency_table,
                          tokens=tokens, **(solver_options or {}))
    plan.solver["total_time_s"] = time.perf_counter() - start
    return plan
