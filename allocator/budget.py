"""Budgets: the limits an allocation must respect."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

MIB = 2**20


@dataclass(frozen=True)
class Budget:
    """Upper bounds for an allocation; give any subset, at least one.

    memory_mb: the whole model's weight storage in MiB (2**20 bytes): quantized layers at their
        packed size (codes + scales + zero points) plus every other parameter and buffer as stored.
    avg_bits: parameter-weighted average weight bits over the quantized layers.
    latency_ms: predicted latency from a measured latency table (needs one): the whole model's when the table
        holds the model's unquantized rest (``kernels.model_latency.measure_rest``), else the quantized layers'.
    bops: bit operations per sample, sum of MACs x weight bits x activation bits.

    Example: ``Budget(avg_bits=4.0)`` or ``Budget(memory_mb=40, latency_ms=2.5)``.
    """

    memory_mb: float | None = None
    avg_bits: float | None = None
    latency_ms: float | None = None
    bops: float | None = None

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not given:
            raise ValueError("Budget needs at least one of memory_mb, avg_bits, latency_ms, bops")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Budget.{name} must be a positive finite number, got {value!r}")

    @property
    def memory_bytes(self) -> float | None:
        return None if self.memory_mb is None else self.memory_mb * MIB

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Budget:
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**data)

    def __str__(self) -> str:
        units = {"memory_mb": " MiB", "avg_bits": " bits", "latency_ms": " ms", "bops": " BOPs"}
        return ", ".join(f"{k} <= {v:g}{units[k]}" for k, v in self.to_dict().items())
