"""Exact cost-vs-resource Pareto frontiers by dynamic programming over tie groups, and their plot.

The DP is the multiple-choice knapsack frontier: after each group, the candidate (resource, cost) sums are
sorted by resource and every point whose cost is not strictly below all cheaper-resource points is pruned.
What remains is exactly the set of non-dominated plans (one plan per frontier point).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from solvers.problem import BUDGETS, Problem

REL_EPS = 1e-10  # resource values / costs closer than this (relative to their scale) count as equal


@dataclass
class ParetoPoint:
    """One non-dominated plan: its resource total (`value` of `objective`) and its cost."""

    objective: str
    value: float
    cost: float
    index: np.ndarray
    problem: Problem = field(repr=False, compare=False)

    @property
    def choice(self) -> dict[str, str]:
        return {n: self.problem.choices[c] for n, c in zip(self.problem.layers, self.index)}

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "value": self.value, "cost": self.cost, "choice": self.choice}


def _check(problem: Problem, objective: str) -> None:
    names = BUDGETS + tuple(n for n in problem.tables if n not in BUDGETS)
    if objective not in names:
        raise ValueError(f"objective={objective!r}; allowed values: {names}")
    if objective not in problem.tables:
        need = "bits and params tables" if objective == "avg_bits" else f"{objective} table"
        raise ValueError(f"pareto over {objective!r} needs the {need}, which the problem lacks")
    if problem.reduced.pairs:
        raise ValueError(f"the DP frontier does not support pair terms between layers of different tie groups "
                         f"(the problem has {len(problem.reduced.pairs)}); use solve(..., method='ilp') per budget")


def pareto(problem: Problem, objective: str = "memory") -> list[ParetoPoint]:
    """The exact frontier of (total `objective`, total cost), sorted by increasing resource / decreasing cost."""
    _check(problem, objective)
    red = problem.reduced
    table = red.tables[objective]
    q_eps = REL_EPS * max(1.0, float(np.abs(table).max(axis=1).sum()))
    c_eps = REL_EPS * max(1.0, float(np.abs(red.cost).max(axis=1).sum()))
    q, c = np.zeros(1), np.zeros(1)
    parents, picks = [], []
    for g in range(len(red.groups)):
        opts = np.flatnonzero(red.allowed[g])
        cq = (table[g, opts][:, None] + q[None, :]).ravel()  # C sorted runs: a stable sort merges them fast
        cc = (red.cost[g, opts][:, None] + c[None, :]).ravel()
        order = np.argsort(cq, kind="stable")
        cs = cc[order]
        prev_min = np.concatenate(([np.inf], np.minimum.accumulate(cs)[:-1]))
        keep = order[cs < prev_min - c_eps]
        # of kept points with equal resource (within q_eps) only the last, cheapest one is non-dominated
        keep = keep[np.append(np.diff(cq[keep]) > q_eps, True)]
        parents.append((keep % len(q)).astype(np.int32))
        picks.append(opts[keep // len(q)].astype(np.int16))
        q, c = cq[keep], cc[keep]
    idx = np.arange(len(q))
    gidx = np.empty((len(q), len(red.groups)), dtype=np.int16)
    for g in range(len(red.groups) - 1, -1, -1):
        gidx[:, g] = picks[g][idx]
        idx = parents[g][idx]
    plans = gidx[:, red.group_of]
    return [ParetoPoint(objective, float(v), float(k), plans[i], problem) for i, (v, k) in enumerate(zip(q, c))]


def plot_pareto(points: list[ParetoPoint], path: str | Path,
                uniform: dict[str, tuple[float, float]] | None = None, title: str | None = None) -> None:
    """Write a PNG of the frontier (step line) with uniform plans {label: (resource, cost)} marked."""
    if not points:
        raise ValueError("points is empty; pass the list returned by pareto()")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p.value for p in points]
    ys = [p.cost for p in points]
    ax.step(xs, ys, where="post", lw=1.2, label=f"frontier ({len(points)} plans)")
    ax.plot(xs, ys, ".", ms=3)
    for label, (x, y) in (uniform or {}).items():
        ax.plot([x], [y], "s", ms=7)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(points[0].objective)
    ax.set_ylabel("cost")
    ax.set_title(title or f"cost vs {points[0].objective}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
