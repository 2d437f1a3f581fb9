"""Allocation jobs: a spec file (YAML or JSON) that says what to allocate, validated up front, and run in-process
or with its profiling shards spread over Ray workers (``ray:`` section).

    spec = JobSpec.load("job.yaml")
    plan = run_job(spec)            # writes <out>/plan.json and <out>/status.json; shards go to the store

Every finished shard lands in the result store (``allocator.store``) at once, so a rerun of a stopped job,
or a second job on the same model and calibration data, recomputes only the shards that are missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kernels import Choice, LatencyTable
from kernels.fileio import atomic_write_json
from profilers import PROFILERS, Calibration, LayerGraph, build_layer_graph, model_hash, profile
from solvers import SOLVERS

from .api import ProfiledModel, parse_choices, solve_profiled
from .budget import MIB, Budget
from .model import quantized_layer_bias_bytes, storage_bytes
from .plan import Plan
from .store import ProfileRequest, ResultStore

log = logging.getLogger("bitalloc")

SHARD_KEYS = {"by", "count"}
RAY_KEYS = {"address", "workers", "gpus_per_worker", "cpus_per_worker", "max_retries", "placement_timeout_s"}
LATENCY_KEYS = {"accelerator", "tokens"}


@dataclass
class RaySettings:
    """How profiling shards are spread over Ray: ``workers`` actors, each with one model copy and
    ``gpus_per_worker`` GPUs, placed with one placement group; a crashed worker is restarted and its shard
    retried up to ``max_retries`` times. ``address``: None joins the job's cluster or starts a local one."""

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_retries: int = 2
    placement_timeout_s: float = 30.0


@dataclass
class LatencySettings:
    """Measure the latency table on a GPU of type ``accelerator`` (a Ray accelerator label such as "H100";
    None: on this machine's device) for ``tokens`` tokens per call; needed by a ``latency_ms`` budget. A budget
    of {tokens: ms} is measured at its own token counts (``tokens`` is then not used)."""

    accelerator: str | None = None
    tokens: int = 16


@dataclass
class JobSpec:
    """One allocation job. Paths are resolved against the spec file's directory; a model that is not a
    directory is a Hugging Face hub id. ``store`` defaults to ``<out>/store``; point several jobs at one
    store to share their profiles. ``shards``: ``{"by": "batches"|"layers", "count": N}`` (default: batch
    shards, one per calibration batch, for profilers that can combine them; else layer shards)."""

    model: str
    calib: str
    budget: Budget
    out: str
    bits: list[int] | None = None
    choices: list[str] | None = None
    profiler: str = "hessian"
    profiler_settings: dict[str, Any] = field(default_factory=dict)
    solver: str = "ilp"
    solver_options: dict[str, Any] = field(default_factory=dict)
    store: str | None = None
    save_model: bool = False
    imports: list[str] = field(default_factory=list)
    shards: dict[str, Any] = field(default_factory=dict)
    ray: RaySettings | None = None
    latency: LatencySettings | None = None

    @property
    def store_dir(self) -> Path:
        return Path(self.store) if self.store else Path(self.out) / "store"

    @property
    def latency_tokens(self) -> tuple[int, ...]:
        """The token counts the job's latency table is measured at: those of its latency budget."""
        return tuple(self.budget.latency_at(self.latency.tokens if self.latency else LatencySettings.tokens))

    @property
    def candidates(self) -> list[Choice]:
        return parse_choices(self.bits if self.bits is not None else (2, 3, 4, 8), self.choices)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> JobSpec:
        """Validate a spec: unknown keys, types, names of profilers and solvers, budgets that no candidate
        can meet -- all before anything is loaded or scheduled."""
        if not isinstance(data, dict):
            raise ValueError(f"a job spec is a mapping of keys to values, got {type(data).__name__}")
        allowed = {f for f in cls.__dataclass_fields__}
        _check_keys("job spec", data, allowed)
        missing = [k for k in ("model", "calib", "budget", "out") if k not in data]
        if missing:
            raise ValueError(f"job spec is missing required keys {missing}")
        d = dict(data)
        for module in d.get("imports", []):
            importlib.import_module(module)  # may register profilers / solvers the spec names
        base = Path(base_dir) if base_dir is not None else None
        for key in ("model", "calib", "out", "store"):
            if d.get(key) is not None:
                d[key] = _resolve(str(d[key]), base, must_exist=key == "calib", hub_ok=key == "model")
        if not isinstance(d["budget"], dict):
            raise ValueError("budget must be a mapping such as {avg_bits: 4}")
        d["budget"] = Budget.from_dict(d["budget"])
        for key in ("profiler_settings", "solver_options", "shards"):
            if not isinstance(d.get(key, {}), dict):
                raise ValueError(f"{key} must be a mapping, got {d[key]!r}")
        _check_keys("shards", d.get("shards", {}), SHARD_KEYS)
        if d.get("ray") is not None:
            _check_keys("ray", d["ray"], RAY_KEYS)
            d["ray"] = RaySettings(**d["ray"])
        if d.get("latency") is not None:
            _check_keys("latency", d["latency"], LATENCY_KEYS)
            d["latency"] = LatencySettings(**d["latency"])
        spec = cls(**d)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.profiler not in PROFILERS:
            raise ValueError(f"unknown profiler {self.profiler!r}; registered: {sorted(PROFILERS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; registered: {sorted(SOLVERS)}")
        candidates = self.candidates
        lowest = min(c.wbits for c in candidates)
        if self.budget.avg_bits is not None and self.budget.avg_bits < lowest:
            raise ValueError(f"budget avg_bits={self.budget.avg_bits:g} is impossible: the fewest bits among the "
                             f"candidates {[c.label for c in candidates]} is {lowest}")
        if self.budget.latency_ms is not None and self.latency is None:
            raise ValueError("a latency_ms budget needs a latency table: add latency: {accelerator: ..., tokens: ...}")
        by = self.shards.get("by", "batches")
        if by not in ("batches", "layers"):
            raise ValueError(f"shards.by must be 'batches' or 'layers', got {by!r}")
        count = self.shards.get("count")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"shards.count must be a positive integer, got {count!r}")
        if self.ray is not None:
            r = self.ray
            if not isinstance(r.workers, int) or r.workers < 1:
                raise ValueError(f"ray.workers must be a positive integer, got {r.workers!r}")
            if r.gpus_per_worker < 0 or r.cpus_per_worker <= 0 or r.max_retries < 0:
                raise ValueError("ray.gpus_per_worker and ray.max_retries must be >= 0, ray.cpus_per_worker > 0")

    @classmethod
    def load(cls, path: str | os.PathLike) -> JobSpec:
        """Read a ``.yaml`` / ``.yml`` / ``.json`` spec file and validate it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"job spec {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"job spec {str(path)!r} is not valid YAML: {e}") from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"job spec {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
        else:
            raise ValueError(f"job spec {str(path)!r}: use a .yaml, .yml or .json file")
        return cls.from_dict(data, base_dir=path.parent)


def _check_keys(what: str, data: Any, allowed: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {data!r}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def _resolve(value: str, base: Path | None, must_exist: bool, hub_ok: bool) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if hub_ok and not path.exists():
        return value  # a hub id such as "gpt2"
    if must_exist and not path.exists():
        raise FileNotFoundError(f"{str(path)!r} (from the job spec) does not exist")
    return str(path.resolve())


def load_inputs(spec: JobSpec) -> tuple[Any, Calibration]:
    """The model and calibration data a spec names (the same on the driver and on every worker)."""
    from .calib_files import load_calibration
    from .model import load_model

    model = load_model(spec.model)
    return model, Calibration(load_calibration(spec.calib, tokenizer_path=spec.model))


def plan_shards(spec: JobSpec, graph: LayerGraph, n_batches: int) -> list[dict[str, list]]:
    """Split the work: batch shards (profilers with a ``combine``) or groups of consecutive layers."""
    by = spec.shards.get("by", "batches")
    if by == "batches" and getattr(PROFILERS[spec.profiler], "combine", None) is None:
        by = "layers"
    items = list(range(n_batches)) if by == "batches" else graph.names
    count = min(spec.shards.get("count") or len(items), len(items))
    size = math.ceil(len(items) / count)
    return [{by: items[i:i + size]} for i in range(0, len(items), size)]


def profile_shard(model, calib: Calibration, graph: LayerGraph, spec: JobSpec, shard: dict[str, list],
                  store: ResultStore, request: ProfileRequest) -> dict[str, Any]:
    """Profile one shard into the store unless it is there already; returns its file and whether it was
    computed. The file is written atomically when the shard finishes."""
    path = store.path(request, shard)
    computed = not path.exists()
    start = time.perf_counter()
    if computed:
        profile(model, calib, graph, spec.candidates, profiler=spec.profiler, cache_dir=str(store.root),
                shard=shard, **spec.profiler_settings)
    return {"path": str(path), "computed": computed, "seconds": time.perf_counter() - start,
            "items": shard_items(shard)}


def shard_items(shard: dict[str, list]) -> int:
    """How many layers (or calibration batches) a shard covers."""
    return len(next(iter(shard.values())))


class Progress:
    """Stage, shards done of total, the layers (or calibration batches) they cover, and an ETA, written to
    ``<out>/status.json`` and logged."""

    def __init__(self, out: Path, shards: list[dict[str, list]], layers: int) -> None:
        self.path, self.total, self.layers = out / "status.json", len(shards), layers
        self.unit = next(iter(shards[0]))
        self.units_total = sum(len(s[self.unit]) for s in shards)
        self.done = self.computed = self.units_done = 0
        self.start = time.perf_counter()

    def update(self, stage: str, shard_result: dict | None = None, **extra: Any) -> None:
        if shard_result is not None:
            self.done += 1
            self.computed += bool(shard_result["computed"])
            self.units_done += shard_result["items"]
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = elapsed / self.computed * left if self.computed and stage == "profile" else 0.0
        status = {"stage": stage, "shards_done": self.done, "shards_total": self.total,
                  "shards_computed": self.computed, "shards_reused": self.done - self.computed,
                  f"{self.unit}_done": self.units_done, f"{self.unit}_total": self.units_total,
                  "layers": self.layers, "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1), **extra}
        atomic_write_json(self.path, status)
        log.warning("bitalloc progress: %s", json.dumps(status))


def run_job(spec: JobSpec | str | os.PathLike | dict) -> Plan:
    """Run a job: load, check the budget is reachable, profile its shards (in-process, or on Ray with a
    ``ray:`` section) into the store, merge, solve, write ``<out>/plan.json``; returns the Plan."""
    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_dict(spec) if isinstance(spec, dict) else JobSpec.load(spec)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    model, calib = load_inputs(spec)
    graph = build_layer_graph(model, calib[0])
    fixed = storage_bytes(model, exclude=set(graph.names)) + quantized_layer_bias_bytes(model, graph.names)
    check_memory_budget(spec, graph, fixed)
    store = ResultStore(spec.store_dir)
    request = ProfileRequest(model_hash(model), calib.hash(), spec.profiler, tuple(c.label for c in spec.candidates),
                             tuple(graph.names), dict(spec.profiler_settings))
    shards = plan_shards(spec, graph, len(calib))
    progress = Progress(out, shards, len(graph))
    progress.update("profile", missing=len(store.missing(request, shards)))
    if spec.ray is None:
        for shard in shards:
            progress.update("profile", profile_shard(model, calib, graph, spec, shard, store, request))
    else:
        from .distributed import profile_on_ray

        for result in profile_on_ray(spec, request, shards):
            progress.update("profile", result)
    prof = store.merged(request, shards)
    profiled = ProfiledModel.build(model, graph, prof)
    progress.update("solve")
    plan, table = solve_job(spec, profiled, model)
    plan.save(out / "plan.json")
    if spec.save_model:
        from .quantize import save_quantized

        save_quantized(plan.apply(model), out, latency_table=table)
    progress.update("done", plan=str(out / "plan.json"))
    return plan


def check_memory_budget(spec: JobSpec, graph: LayerGraph, fixed_bytes: int) -> None:
    """Reject a memory budget below the smallest model the candidates can make, before profiling."""
    if spec.budget.memory_mb is None:
        return
    from kernels import weight_nbytes

    def held(layer) -> list[Choice]:  # the candidates a layer can take (a library kernel's may not hold it)
        shape = (layer.out_features, layer.in_features)
        return [c for c in spec.candidates if c.kernel_reason(layer.kind, shape) is None] or spec.candidates

    smallest = fixed_bytes + sum(
        min(weight_nbytes((l.out_features, l.in_features), c.spec_for(l.kind, l.in_features), c.kernel)
            for c in held(l))
        for l in graph.layers)
    if spec.budget.memory_bytes < smallest:
        raise ValueError(f"budget memory_mb={spec.budget.memory_mb:g} is impossible: the smallest achievable with "
                         f"candidates {[c.label for c in spec.candidates]} is {smallest / MIB:.4f} MiB")


def solve_job(spec: JobSpec, profiled: ProfiledModel, model) -> tuple[Plan, LatencyTable | None]:
    """Solve; a ``latency_ms`` budget gets a latency table measured on the target accelerator with the rest of
    ``model``, and so bounds the whole model's latency. Returns the plan and that table (None without one)."""
    if spec.budget.latency_ms is None:
        return solve_profiled(profiled, spec.budget, method=spec.solver, **spec.solver_options), None
    from .distributed import latency_table

    table = latency_table(spec, profiled.graph, model)
    return solve_profiled(profiled, spec.budget, method=spec.solver, latency_table=table, tokens=spec.latency.tokens,
                          **spec.solver_options), table
