"""Method "ilp": the exact integer program (HAWQ-V3 style), solved by HiGHS (or CBC) through PuLP.

One binary x[g, c] per tie group and allowed choice, sum_c x[g, c] = 1, one row per budget.
Pair terms D[a, b] between groups g, h use product variables y[a, b] = x[g, a] * x[h, b]:
- pair_form="marginal" (default): y >= 0, sum_b y[a, b] = x[g, a], sum_a y[a, b] = x[h, b]. With binary x this
  forces y to the product exactly, for terms of either sign, and its LP relaxation is far tighter.
- pair_form="mccormick": y >= x[g, a] + x[h, b] - 1 for D > 0, y <= x[g, a] and y <= x[h, b] for D < 0.
"""
from __future__ import annotations

import time

import highspy
import numpy as np
import pulp

from solvers.problem import Problem
from solvers.registry import MethodResult, register_solver

BACKENDS = ("highs", "cbc")
PAIR_FORMS = ("marginal", "mccormick")


def _expr(pairs) -> pulp.LpAffineExpression:
    return pulp.LpAffineExpression([(v, float(c)) for v, c in pairs if c != 0])


def build_model(problem: Problem, budgets: dict[str, float], pair_form: str = "marginal",
                with_objective: bool = True) -> tuple[pulp.LpProblem, dict[int, dict[int, pulp.LpVariable]]]:
    """The PuLP model over tie groups; returns it with x[g][c]."""
    red = problem.reduced
    lp = pulp.LpProblem("bitalloc", pulp.LpMinimize)
    x = {g: {int(c): lp.add_variable(f"x{g}_{c}", 0, 1, pulp.LpBinary) for c in np.flatnonzero(red.allowed[g])}
         for g in range(len(red.groups))}
    terms = []
    if with_objective:
        terms = [(v, red.cost[g, c]) for g, xs in x.items() for c, v in xs.items()]
    for g, xs in x.items():
        lp += pulp.LpConstraint(_expr((v, 1.0) for v in xs.values()), pulp.LpConstraintEQ, f"one_{g}", 1.0)
    for b, cap in budgets.items():
        t = red.tables[b]
        lp += pulp.LpConstraint(_expr((v, t[g, c]) for g, xs in x.items() for c, v in xs.items()),
                                pulp.LpConstraintLE, f"budget_{b}", float(cap))
    if with_objective:
        for (g, h), d in red.pairs.items():
            terms += _pair_terms(lp, x[g], x[h], d, g, h, pair_form)
    lp.setObjective(_expr(terms))
    return lp, x


def _pair_terms(lp: pulp.LpProblem, xg: dict, xh: dict, d: np.ndarray, g: int, h: int, form: str) -> list:
    if form == "marginal":
        y = {(a, b): lp.add_variable(f"y{g}_{h}_{a}_{b}", 0) for a in xg for b in xh}
        for a, va in xg.items():
            lp += pulp.LpConstraint(_expr([(y[a, b], 1.0) for b in xh] + [(va, -1.0)]), pulp.LpConstraintEQ, None, 0)
        for b, vb in xh.items():
            lp += pulp.LpConstraint(_expr([(y[a, b], 1.0) for a in xg] + [(vb, -1.0)]), pulp.LpConstraintEQ, None, 0)
        return [(v, d[a, b]) for (a, b), v in y.items()]
    terms = []
    for a, va in xg.items():
        for b, vb in xh.items():
            if d[a, b] == 0:
                continue
            y = lp.add_variable(f"y{g}_{h}_{a}_{b}", 0, 1)
            if d[a, b] > 0:
                lp += pulp.LpConstraint(_expr([(y, 1.0), (va, -1.0), (vb, -1.0)]), pulp.LpConstraintGE, None, -1)
            else:
                lp += pulp.LpConstraint(_expr([(y, 1.0), (va, -1.0)]), pulp.LpConstraintLE, None, 0)
                lp += pulp.LpConstraint(_expr([(y, 1.0), (vb, -1.0)]), pulp.LpConstraintLE, None, 0)
            terms.append((y, d[a, b]))
    return terms


def _run(lp: pulp.LpProblem, backend: str, time_limit: float | None, threads: int | None,
         msg: bool) -> tuple[str, float | None]:
    """Solve; returns (status, proven lower bound on the objective or None)."""
    if backend == "highs":
        lp.solve(pulp.HiGHS(msg=msg, gapRel=0.0, gapAbs=1e-9, timeLimit=time_limit, threads=threads))
        h = lp.solverModel
        st = h.getModelStatus()
        info = h.getInfo()
        if st == highspy.HighsModelStatus.kOptimal:
            return "optimal", float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
        if st in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible", None
        if info.primal_solution_status == 2:
            return "feasible", float(info.mip_dual_bound)
        return "failed", None
    lp.solve(pulp.PULP_CBC_CMD(msg=msg, gapRel=0.0, timeLimit=time_limit, threads=threads))
    status = {1: "optimal", -1: "infeasible"}.get(lp.status, "failed")
    if status == "optimal" and lp.sol_status != pulp.LpSolutionOptimal:
        status = "feasible" if lp.sol_status == pulp.LpSolutionIntegerFeasible else "failed"
    return status, None


def _check(backend: str, pair_form: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS}")
    if pair_form not in PAIR_FORMS:
        raise ValueError(f"pair_form={pair_form!r}; allowed values: {PAIR_FORMS}")


@register_solver("ilp")
def solve_ilp(problem: Problem, budgets: dict[str, float], backend: str = "highs", pair_form: str = "marginal",
              time_limit: float | None = None, threads: int | None = None, msg: bool = False) -> MethodResult:
    """Exact: minimise cost plus pair terms under the budgets; status "optimal" means proven optimal."""
    _check(backend, pair_form)
    t0 = time.perf_counter()
    lp, x = build_model(problem, budgets, pair_form)
    t_build = time.perf_counter() - t0
    status, bound = _run(lp, backend, time_limit, threads, msg)
    info = {"backend": backend, "pair_form": pair_form, "build_s": t_build,
            "n_variables": lp.numVariables(), "n_constraints": lp.numConstraints()}
    if status in ("infeasible", "failed"):
        return MethodResult(None, status, info=info)
    gindex = np.array([max(xs, key=lambda c: xs[c].varValue or 0.0) for xs in x.values()])
    objective = problem.objective(problem.reduced.expand(gindex))
    if status == "optimal":
        bound = objective if bound is None else min(bound, objective)
    return MethodResult(problem.reduced.expand(gindex), status, bound, info)


def feasible(problem: Problem, budgets: dict[str, float], backend: str = "highs") -> bool:
    """Whether any plan meets `budgets` (pins, ties and allowed included); costs are ignored."""
    lp, _ = build_model(problem, budgets, with_objective=False)
    status, _ = _run(lp, backend, None, None, False)
    if status == "failed":
        raise RuntimeError(f"the {backend} backend could not decide feasibility of budgets {budgets}")
    return status != "infeasible"
