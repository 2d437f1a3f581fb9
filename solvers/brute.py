"""Method "brute": exhaustive enumeration over tie groups; the reference the other methods are tested against."""
from __future__ import annotations

import numpy as np

from solvers.problem import Problem
from solvers.registry import MethodResult, register_solver, within


def enumerate_plans(problem: Problem, max_plans: int = 2_000_000) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Every valid plan as layer indices [N, L], with its objective [N] and totals {budget: [N]}."""
    red = problem.reduced
    options = [np.flatnonzero(a) for a in red.allowed]
    n = int(np.prod([len(o) for o in options], dtype=float))
    if n > max_plans:
        raise ValueError(f"brute force over {n} plans exceeds max_plans={max_plans}; use method='ilp'")
    grids = np.meshgrid(*options, indexing="ij")
    gidx = np.stack([g.ravel() for g in grids], axis=1)
    cols = np.arange(gidx.shape[1])
    obj = red.cost[cols, gidx].sum(axis=1)
    for (g, h), d in red.pairs.items():
        obj = obj + d[gidx[:, g], gidx[:, h]]
    totals = {b: t[cols, gidx].sum(axis=1) for b, t in red.tables.items()}
    return gidx[:, red.group_of], obj, totals


@register_solver("brute")
def solve_brute(problem: Problem, budgets: dict[str, float], max_plans: int = 2_000_000) -> MethodResult:
    """Exact by enumeration (small problems only); ties in the objective go to the first plan enumerated."""
    plans, obj, totals = enumerate_plans(problem, max_plans)
    ok = np.ones(len(obj), dtype=bool)
    for b, v in budgets.items():
        ok &= within(totals[b], v)
    if not ok.any():
        return MethodResult(None, "infeasible")
    best = int(np.argmin(np.where(ok, obj, np.inf)))
    return MethodResult(plans[best], "optimal", float(obj[best]))
