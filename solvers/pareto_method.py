"""Method "pareto": the min-cost point of the exact DP frontier that meets the (single) budget."""
from __future__ import annotations

from solvers.pareto import pareto
from solvers.problem import Problem
from solvers.registry import MethodResult, register_solver, within


@register_solver("pareto")
def solve_pareto(problem: Problem, budgets: dict[str, float]) -> MethodResult:
    """Exact for one budget and no pair terms between tie groups."""
    if len(budgets) != 1:
        raise ValueError(f"method 'pareto' needs exactly one budget (got {sorted(budgets) or 'none'}); "
                         "use method='ilp' for several")
    (name, cap), = budgets.items()
    points = [p for p in pareto(problem, name) if within(p.value, cap)]
    if not points:
        return MethodResult(None, "infeasible")
    best = min(points, key=lambda p: p.cost)
    return MethodResult(best.index, "optimal", best.cost, {"frontier_points": len(points)})
