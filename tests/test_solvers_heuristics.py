"""greedy and convex never break budgets; convex's lower bound never exceeds the optimum; bisection."""
import math

import numpy as np
import pytest

from solvers import InfeasibleError, Problem, TargetNotMetError, bisect_target, pareto, solve
from test_solvers_exact import outcome, random_budgets, random_problem


@pytest.mark.parametrize("seed", range(150))
def test_greedy_and_convex_meet_budgets_and_bound_the_optimum(seed):
    p = random_problem(seed)
    budgets = random_budgets(p, seed)
    ref = outcome(p, "brute", budgets)
    for method in ("greedy", "convex"):
        try:
            got = outcome(p, method, budgets)
        except RuntimeError as e:  # a heuristic may get stuck on several budgets, never on one
            assert len(budgets) > 1 and "found no plan" in str(e)
            continue
        if isinstance(ref, InfeasibleError):
            assert isinstance(got, InfeasibleError)
            continue
        assert p.is_valid(got.index)
        assert all(got.totals[b] <= v + 1e-9 * max(1, abs(v)) for b, v in budgets.items())
        assert got.objective >= ref.objective - 1e-9
        assert got.status == "feasible"
        if method == "convex":
            assert got.lower_bound <= ref.objective + 1e-9
            assert got.gap == pytest.approx((got.objective - got.lower_bound) / abs(got.objective))


def test_convex_water_filling_on_textbook_costs():
    # Omega_i(b) = s_i 2^(-2b) exactly, bits 2..8, memory = params * b / 8: equal marginal loss per byte
    bits = np.arange(2, 9, dtype=float)
    s = np.array([1.0, 4.0, 16.0, 64.0])
    params = np.full(4, 8.0)
    p = Problem(layers=list("abcd"), choices=[f"w{int(b)}" for b in bits], cost=s[:, None] * 2.0 ** (-2 * bits),
                memory=params[:, None] * bits / 8, bits=np.tile(bits, (4, 1)), params=params)
    sol = solve(p, method="convex", memory=20.0)  # 5 bits on average
    # continuous optimum: b_i = 5 + 0.5 log2(s_i / geomean(s)) = 3.5, 4.5, 5.5, 6.5 -> the bound is tight-ish
    assert sol.info["continuous_bits"] == pytest.approx([3.5, 4.5, 5.5, 6.5])
    assert sol.lower_bound == pytest.approx(4 * 8 * 2.0 ** -10)
    exact = solve(p, memory=20.0)
    assert sol.objective == pytest.approx(exact.objective)
    assert sol.lower_bound <= exact.objective


def test_greedy_lowers_the_cheapest_layer_per_byte_first():
    # both layers start at w8; dropping "b" to w4 costs 1 per 4 bytes, dropping "a" costs 3 per 4 bytes
    p = Problem(["a", "b"], ["w4", "w8"], cost=[[3.0, 0.0], [1.0, 0.0]], memory=[[4.0, 8.0], [4.0, 8.0]])
    sol = solve(p, method="greedy", memory=12)
    assert sol.choice == {"a": "w8", "b": "w4"}
    assert sol.objective == 1.0
    assert sol.binding == ["memory"]


def test_bisect_finds_the_smallest_plan_meeting_the_target_in_log_evaluations():
    p = random_problem(7, pairs=False)
    points = pareto(p, "memory")
    quality = lambda sol: -sol.objective  # lower cost = higher quality, monotone along the frontier
    target = -points[len(points) // 3].cost
    sol, log = bisect_target(p, quality, target, objective="memory")
    first_ok = next(i for i, pt in enumerate(points) if -pt.cost >= target)
    assert sol.info["frontier_index"] == first_ok
    assert sol.totals["memory"] == pytest.approx(points[first_ok].value)
    assert sol.status == "optimal"
    assert len(log) <= math.ceil(math.log2(len(points))) + 1
    assert [e["meets"] for e in log][0] is True and all(set(e) >= {"quality", "memory", "cost"} for e in log)


def test_bisect_respects_max_evals_and_reports_a_missed_target():
    p = random_problem(7, pairs=False)
    sol, log = bisect_target(p, lambda s: -s.objective, target=-1e9, max_evals=2)
    assert len(log) == 2 and sol.status == "feasible"
    with pytest.raises(TargetNotMetError, match="misses the target") as e:
        bisect_target(p, lambda s: -s.objective, target=1e9)
    assert len(e.value.log) == 1
