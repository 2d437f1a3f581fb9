"""Budgets: the limits an allocation must respect."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
        A number bounds it at the solve's ``tokens`` per forward; a mapping {tokens: ms} bounds it at each of those
        token counts at once (decode and prefill: a kernel fast at 1 token can be slow at 512).
    bops: bit operations per sample, sum of MACs x weight bits x activation bits.

    Example: ``Budget(avg_bits=4.0)``, ``Budget(memory_mb=40, latency_ms=2.5)`` or
    ``Budget(memory_mb=700, latency_ms={1: 1.9, 512: 5.0})``.
    """

    memory_mb: float | None = None
    avg_bits: float | None = None
    latency_ms: float | Mapping[int, float] | None = None
    bops: float | None = None

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not given:
            raise ValueError("Budget needs at least one of memory_mb, avg_bits, latency_ms, bops")
        if isinstance(self.latency_ms, Mapping):
            object.__setattr__(self, "latency_ms", _per_tokens(self.latency_ms))
            given.pop("latency_ms")
        for name, value in given.items():
            _check_positive(f"Budget.{name}", value)

    def latency_at(self, tokens: int) -> dict[int, float]:
        """The latency bounds by token count: a number's at ``tokens``, a mapping's as given ({} without one)."""
        if self.latency_ms is None:
            return {}
        return dict(self.latency_ms) if isinstance(self.latency_ms, Mapping) else {tokens: float(self.latency_ms)}

    @property
    def memory_bytes(self) -> float | None:
        return None if self.memory_mb is None else self.memory_mb * MIB

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if isinstance(self.latency_ms, Mapping):
            out["latency_ms"] = {str(t): v for t, v in self.latency_ms.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Budget:
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**data)

    def __str__(self) -> str:
        units = {"memory_mb": " MiB", "avg_bits": " bits", "latency_ms": " ms", "bops": " BOPs"}
        parts = []
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                parts += [f"{k} <= {ms:g} ms at {t} token{'s' if int(t) > 1 else ''}" for t, ms in v.items()]
            else:
                parts.append(f"{k} <= {v:g}{units[k]}")
        return ", ".join(parts)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _per_tokens(bounds: Mapping) -> dict[int, float]:
    """{tokens: ms} with int token counts (JSON gives them as strings), sorted; errors name the bad entry."""
    if not bounds:
        raise ValueError("Budget.latency_ms is an empty mapping; give {tokens: ms}, e.g. {1: 2.0, 512: 40.0}")
    out = {}
    for key, ms in bounds.items():
        tokens = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"Budget.latency_ms keys must be positive token counts, got {key!r}")
        if tokens in out:
            raise ValueError(f"Budget.latency_ms gives token count {tokens} twice")
        _check_positive(f"Budget.latency_ms[{tokens}]", ms)
        out[tokens] = float(ms)
    return dict(sorted(out.items()))
