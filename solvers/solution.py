"""A solved plan with its objective, totals, budget slack and solver status."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solvers.jsonio import atomic_write_json
from solvers.problem import Problem

BINDING_RTOL = 1e-3  # a budget binds when its slack is at most this fraction of the budget


@dataclass
class Solution:
    """One choice per layer; `binding` lists budgets with slack <= BINDING_RTOL * |budget|."""

    choice: dict[str, str]
    index: np.ndarray
    objective: float
    totals: dict[str, float]
    budgets: dict[str, float]
    slack: dict[str, float]
    binding: list[str]
    status: str
    method: str
    solve_time_s: float
    lower_bound: float | None = None
    gap: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, problem: Problem, index: np.ndarray, budgets: dict[str, float], method: str, status: str,
              solve_time_s: float, lower_bound: float | None = None, **info: Any) -> "Solution":
        """Evaluate a plan on `problem`: objective (pair terms included), totals, slack, binding budgets."""
        index = np.asarray(index, dtype=np.int64)
        totals = problem.totals(index)
        objective = problem.objective(index)
        slack = {b: float(v - totals[b]) for b, v in budgets.items()}
        binding = [b for b, s in slack.items() if s <= BINDING_RTOL * max(abs(budgets[b]), 1e-12)]
        gap = None
        if lower_bound is not None:
            gap = max(0.0, objective - lower_bound) / max(abs(objective), 1e-12)
        return cls(choice={n: problem.choices[c] for n, c in zip(problem.layers, index)}, index=index,
                   objective=objective, totals=totals, budgets=dict(budgets), slack=slack, binding=binding,
                   status=status, method=method, solve_time_s=solve_time_s, lower_bound=lower_bound, gap=gap,
                   info=info)

    def summary(self) -> str:
        """One line per budget: which binds, and by how much slack the others hold."""
        lines = [f"{self.method}: {self.status}, objective {self.objective:.6g} in {self.solve_time_s:.3f} s"
                 + (f" (lower bound {self.lower_bound:.6g}, gap {self.gap:.2%})" if self.gap is not None else "")]
        if not self.budgets:
            lines.append("no budgets given")
        for b, v in self.budgets.items():
            tag = "binds" if b in self.binding else "slack"
            pct = self.slack[b] / abs(v) if v else float("nan")
            lines.append(f"  {b}: total {self.totals[b]:.6g} <= budget {v:.6g}, {tag} {self.slack[b]:.6g} ({pct:.2%})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("choice", "objective", "totals", "budgets", "slack", "binding", "status",
                                           "method", "solve_time_s", "lower_bound", "gap", "info")}
        d["index"] = self.index.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Solution":
        kw = dict(d)
        kw["index"] = np.asarray(kw["index"], dtype=np.int64)
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Solution":
        return cls.from_dict(json.loads(Path(path).read_text()))
