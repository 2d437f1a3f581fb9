"""The Plan: one bit width (and quantization spec) per layer, saved as versioned JSON.

A plan records what it was made for (the model's identity), what it promises (predicted bytes,
average bits, cost), and how it was made (profiler, solver, settings, time). Loading validates it and
says exactly what is wrong; ``plan.apply(model)`` emits the quantized model.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kernels import SUPPORTED_BITS, QuantSpec
from kernels.fileio import atomic_write_json
from kernels.latency import conv_geometries

from .budget import Budget
from .io import read_json

if TYPE_CHECKING:
    import torch.nn as nn

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan that is malformed or does not match the model it is used with."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a plan belongs to: a name and a hash of its weights' names, shapes and values."""

    name: str
    hash: str
    n_params: int


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer: its choice label and the exact quantization spec it implies."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    choice: str
    bits: int
    group_size: int | None
    symmetric: bool
    params: int
    bytes: int
    cost: float
    abits: int | None = None
    scale_dtype: str = "float16"
    conv: list[dict[str, Any]] | None = None  # a conv's traced geometries (`LayerInfo.conv`; key its latency entries)
    calls: int = 1  # runs per forward (`LayerInfo.calls`): the layer's latency counts this often

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv", conv_geometries(self.conv, self.calls))  # frozen: old plans' one geometry

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, scale_dtype=self.scale_dtype)


_GEOMETRY_KEYS = {"in_shape", "stride", "padding", "dilation", "groups", "calls"}


def _count(v: Any) -> bool:
    """Whether `v` is an int >= 1 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _geometries_ok(conv: Any, calls: int) -> bool:
    """Whether a plan layer's conv entry is a list of geometries (`profilers.graph.conv_geometry` plus "calls")
    that each run >= 1 times, `calls` in all."""
    ints = lambda v: isinstance(v, list) and all(isinstance(e, int) and e >= 0 for e in v)  # noqa: E731
    return (isinstance(conv, list) and bool(conv)
            and all(isinstance(g, dict) and _GEOMETRY_KEYS <= g.keys() and ints(g["in_shape"]) and ints(g["stride"])
                    and ints(g["dilation"]) and (ints(g["padding"]) or isinstance(g["padding"], str))
                    and _count(g["groups"]) and _count(g["calls"]) for g in conv)
            and sum(g["calls"] for g in conv) == calls)


@dataclass
class Plan:
    """A complete allocation for one model. See ``docs/architecture.md`` for the data flow."""

    model: ModelIdentity
    layers: list[LayerPlan]
    budget: Budget
    predicted: dict[str, float]
    profiler: dict
    solver: dict
    skipped: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    @property
    def bits(self) -> dict[str, int]:
        """Layer name -> weight bits."""
        return {layer.name: layer.bits for layer in self.layers}

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "model": asdict(self.model),
            "budget": self.budget.to_dict(),
            "predicted": dict(self.predicted),
            "profiler": self.profiler,
            "solver": self.solver,
            "layers": [{**asdict(layer), "weight_shape": list(layer.weight_shape)} for layer in self.layers],
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Build a plan from its JSON form, naming the first thing that is wrong."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version is {version!r}; this bitalloc reads schema_version {SCHEMA_VERSION}")
        missing = [k for k in ("model", "budget", "predicted", "profiler", "solver", "layers") if k not in data]
        if missing:
            raise PlanError(f"plan is missing the keys {missing}")
        try:
            model = ModelIdentity(**data["model"])
            budget = Budget.from_dict(data["budget"])
        except (TypeError, ValueError) as e:
            raise PlanError(f"plan has a malformed model or budget entry: {e}") from None
        layers = []
        for i, entry in enumerate(data["layers"]):
            try:
                layer = LayerPlan(**{**entry, "weight_shape": tuple(entry["weight_shape"])})
            except (TypeError, KeyError) as e:
                raise PlanError(f"plan layer #{i} ({entry.get('name', '?')!r}) is malformed: {e}") from None
            if layer.bits not in SUPPORTED_BITS:
                raise PlanError(f"plan layer {layer.name!r} has bits={layer.bits}; supported bits are {SUPPORTED_BITS}")
            if not _count(layer.calls):
                raise PlanError(f"plan layer {layer.name!r} has calls={layer.calls!r}; it must be an int >= 1")
            if layer.conv is not None and not _geometries_ok(layer.conv, layer.calls):
                raise PlanError(f"plan layer {layer.name!r} has a malformed conv entry: it must be a list of "
                                f"geometries with the keys {sorted(_GEOMETRY_KEYS)}, whose calls add up to "
                                f"calls={layer.calls}")
            try:
                layer.spec
            except ValueError as e:
                raise PlanError(f"plan layer {layer.name!r} has an invalid quantization spec: {e}") from None
            layers.append(layer)
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise PlanError(f"plan lists layers more than once: {dup}")
        return cls(
            model=model,
            layers=layers,
            budget=budget,
            predicted=data["predicted"],
            profiler=data["profiler"],
            solver=data["solver"],
            skipped=data.get("skipped", {}),
            created=data.get("created", ""),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Plan:
        """Read and validate a plan; with ``model``, also check that the plan belongs to it."""
        plan = cls.from_dict(read_json(path, "plan"))
        if model is not None:
            plan.validate(model)
        return plan

    def validate(self, model: nn.Module, check_hash: bool = True) -> None:
        """Raise PlanError unless every planned layer exists in ``model`` with the planned shape and kind."""
        from .model import layer_kind, model_identity

        modules = dict(model.named_modules())
        for layer in self.layers:
            module = modules.get(layer.name)
            if module is None:
                raise PlanError(f"plan layer {layer.name!r} does not exist in the model")
            kind = layer_kind(module)
            if kind != layer.kind:
                raise PlanError(f"plan layer {layer.name!r} is a {layer.kind} in the plan but a {kind or type(module).__name__} in the model")
            shape = tuple(module.weight.shape)
            if shape != layer.weight_shape:
                raise PlanError(f"plan layer {layer.name!r} has weight shape {layer.weight_shape} in the plan but {shape} in the model")
        if check_hash:
            identity = model_identity(model)
            if identity.hash != self.model.hash:
                raise PlanError(
                    f"plan was made for model {self.model.name!r} (hash {self.model.hash[:12]}), but this model "
                    f"{identity.name!r} hashes to {identity.hash[:12]}; pass check_hash=False to apply it anyway"
                )

    def apply(self, model: nn.Module, inplace: bool = False, check_hash: bool = True) -> nn.Module:
        """Return the quantized model: every planned layer replaced by a packed quantized module."""
        from .quantize import apply

        return apply(model, self, inplace=inplace, check_hash=check_hash)

    def summary(self) -> str:
        """A one-screen description: budget, predictions and the bits of each layer."""
        p = self.predicted
        lines = [
            f"plan for {self.model.name} ({len(self.layers)} layers; made by {self.profiler.get('name')} + {self.solver.get('method')})",
            f"budget: {self.budget}",
            f"predicted: {p.get('total_bytes', 0) / 2**20:.3f} MiB model, {p.get('layer_bytes', 0) / 2**20:.3f} MiB quantized layers, "
            f"{p.get('avg_bits', float('nan')):.3f} avg bits, cost {p.get('cost', float('nan')):.4g}",
        ]
        if "latency_ms" in p:
            scope = self.solver.get("latency_scope", "quantized layers only")
            tokens = self.solver.get("latency_tokens")
            others = [f"{ms:.4g} ms at {t}" for t, ms in p.get("latency_ms_at", {}).items() if int(t) != tokens]
            lines.append(f"predicted latency: {p['latency_ms']:.4g} ms" + (f" at {tokens} tokens" if tokens else "")
                         + (f" (rest {p['latency_rest_ms']:.4g} + layers {p['latency_layers_ms']:.4g})"
                            if "latency_rest_ms" in p else "")
                         + (f", {', '.join(others)} tokens" if others else "") + f"; {scope}")
        width = max(len(layer.name) for layer in self.layers)
        lines += [f"  {layer.name:<{width}}  {layer.choice:>8}  {layer.bytes:>10} B" for layer in self.layers]
        if self.skipped:
            lines.append(f"skipped ({len(self.skipped)}): " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items()))
        return "\n".join(lines)
