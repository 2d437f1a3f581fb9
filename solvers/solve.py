"""`solve`: validate budgets, dispatch to a registered method, turn its plan into a Solution."""
from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from solvers.errors import InfeasibleError
from solvers.problem import BUDGETS, Problem, latency_at_name
from solvers.registry import SOLVERS, UNAVAILABLE, within
from solvers.solution import Solution

def check_budgets(problem: Problem, budgets: dict[str, float | None]) -> dict[str, float]:
    """The given (non-None) budgets as floats; errors name a budget the problem has no table for."""
    out = {}
    allowed = BUDGETS + tuple(latency_at_name(t) for t in problem.latency_at)
    for b, v in budgets.items():
        if b not in allowed and not b.startswith("latency@"):
            raise ValueError(f"unknown budget {b!r}; allowed budgets: {allowed}")
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{b} budget must be a finite number; got {v!r}")
        if b not in problem.tables:
            need = "bits and params tables" if b == "avg_bits" else f"{b} table"
            have = f" (its latency tables are at tokens {sorted(problem.latency_at)})" if problem.latency_at else ""
            raise ValueError(f"{b} budget given but the problem has no {need}{have}")
        out[b] = float(v)
    return out


def smallest(problem: Problem, budget: str) -> float:
    """The smallest total of a budget's quantity over plans that respect pins, ties and allowed."""
    red = problem.reduced
    return float(np.where(red.allowed, red.tables[budget], np.inf).min(axis=1).sum())


def infeasible_error(problem: Problem, budgets: dict[str, float]) -> InfeasibleError:
    """Explain infeasibility: the smallest achievable value of each budget, and the failing combination."""
    least = {b: smallest(problem, b) for b in budgets}
    lines = [f"{b} <= {v:.6g} (smallest achievable {least[b]:.6g})" for b, v in budgets.items()]
    alone = [b for b, v in budgets.items() if not within(least[b], v)]
    if alone:
        why = "; ".join(f"{b} budget {budgets[b]:.6g} is below the smallest achievable {least[b]:.6g}" for b in alone)
    else:
        from solvers.ilp import feasible

        combo = next((c for k in range(2, len(budgets) + 1) for c in itertools.combinations(budgets, k)
                      if not feasible(problem, {b: budgets[b] for b in c})), tuple(budgets))
        why = f"each budget alone can be met, but no plan meets {' and '.join(combo)} together"
    return InfeasibleError(f"no plan meets the budgets: {why}. Budgets: {', '.join(lines)}", least)


def solve(problem: Problem, method: str = "ilp", memory: float | None = None,
          latency: float | Mapping[int, float] | None = None, bops: float | None = None,
          avg_bits: float | None = None, **options: Any) -> Solution:
    """Choose one choice per layer minimising cost under upper-bound budgets on the totals.

    latency: a number bounds the problem's `latency` table; a mapping {tokens: bound} bounds its `latency_at`
    tables (budgets "latency@<tokens>"), e.g. ``latency={1: 2.0, 512: 40.0}`` for decode and prefill at once.

    Raises InfeasibleError when no plan meets the budgets (with the smallest achievable value of each).
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a solvers.Problem; got {type(problem).__name__}")
    if method in UNAVAILABLE:
        raise ValueError(f"method {method!r} is unavailable here: {UNAVAILABLE[method]}")
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; allowed values: {sorted(SOLVERS)}")
    fn = SOLVERS[method]
    params = list(inspect.signature(fn).parameters)[2:]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"method {method!r} got unknown options {unknown}; allowed options: {params}")
    given = {"memory": memory, "latency": latency, "bops": bops, "avg_bits": avg_bits}
    if isinstance(latency, Mapping):
        given.pop("latency")
        given.update({latency_at_name(t): v for t, v in latency.items()})
    budgets = check_budgets(problem, given)
    if any(not within(smallest(problem, b), v) for b, v in budgets.items()):
        raise infeasible_error(problem, budgets)
    t0 = time.perf_counter()
    res = fn(problem, budgets, **options)
    elapsed = time.perf_counter() - t0
    if res.status == "infeasible":
        raise infeasible_error(problem, budgets)
    if res.status == "failed":
        from solvers.ilp import feasible

        if not feasible(problem, budgets):
            raise infeasible_error(problem, budgets)
        raise RuntimeError(f"method {method!r} found no plan meeting budgets {budgets} although one exists "
                           "(a heuristic got stuck, or time_limit ran out); use method='ilp' without a time limit")
    sol = Solution.build(problem, res.index, budgets, method, res.status, elapsed, res.lower_bound, **res.info)
    if not problem.is_valid(sol.index) or not all(within(sol.totals[b], v) for b, v in budgets.items()):
        raise RuntimeError(f"method {method!r} returned a plan that breaks pins, ties, allowed or budgets "
                           f"(totals {sol.totals}, budgets {budgets}); this is a bug")
    return sol
