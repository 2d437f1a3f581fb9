"""The solver registry: each method module registers one function under its name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np



@dataclass
class MethodResult:
    """What a method returns to `solve`: a layer-level plan and how good it is known to be.

    status: "optimal" (proven), "feasible" (meets the budgets, optimality not proven),
    "infeasible" (proven that no plan meets the budgets) or "failed" (a heuristic found no plan).
    """

    index: np.ndarray | None
    status: str
    lower_bound: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


FEASIBILITY_RTOL = 1e-7  # totals may exceed a budget by this fraction of max(1, |budget|) (solver tolerance)


def within(total: Any, budget: float) -> Any:
    """total <= budget up to FEASIBILITY_RTOL; works elementwise on arrays."""
    return np.asarray(total) <= budget + FEASIBILITY_RTOL * max(1.0, abs(budget))


Method = Callable[..., MethodResult]
SOLVERS: dict[str, Method] = {}
UNAVAILABLE: dict[str, str] = {}  # method name -> why it could not be registered (a missing dependency)


def register_solver(name: str) -> Callable[[Method], Method]:
    """Register `fn(problem, budgets, **options) -> MethodResult` as solve(..., method=name)."""

    def deco(fn: Method) -> Method:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = fn
        return fn

    return deco
