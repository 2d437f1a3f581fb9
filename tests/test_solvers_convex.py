"""convex's knapsack rounding: exact on byte grids, within the budget, within 0.1% of the ILP on a real profile."""
import itertools

import numpy as np
import pytest

from solvers import InfeasibleError, Problem, solve
from solvers.brute import enumerate_plans
from solvers.convex import knapsack, neighbourhood
from test_solvers_exact import outcome, random_budgets, random_problem

BITS = np.array([2.0, 3.0, 4.0, 8.0])

# Fisher costs (x 1e6, 4 digits) of the demo's trained 4-block character GPT-2 (benchmarks/bench_convex_demo.py):
# per block attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; choices w2, w3, w4, w8
FISHER = np.array([
    [151.9, 43.45, 3.89, 0.0312], [90.23, 9.305, 1.084, 0.002412], [51.19, 4.738, 0.6653, 0.01066],
    [9.38, 7.176, 0.8927, 0.0108], [3.613, 0.4257, 0.04915, 0.000231], [1.494, 0.514, 0.1111, 0.0001713],
    [8.523, 1.142, 0.03977, 0.002478], [15.49, 1.703, 0.282, 0.0006107], [2.505, 0.5703, 0.04166, 0.0004049],
    [1.788, 0.4445, 0.0542, 0.0004449], [2.772, 0.3166, 0.05431, 0.0005282], [5.765, 1.193, 0.1687, 0.0002443],
    [3.286, 1.477, 0.2094, 0.000517], [1.517, 0.1552, 0.03683, 0.00018], [3.609, 0.3884, 0.07318, 0.0001737],
    [4.387, 0.9273, 0.09829, 9.068e-05],
])
PARAMS = np.tile([49152.0, 16384.0, 65536.0, 65536.0], 4)


def optimum(cost: np.ndarray, weight: np.ndarray, ok: np.ndarray, cap: float) -> tuple[float, np.ndarray | None]:
    """Least total cost and its plan over every plan with one `ok` choice per row and weight <= cap."""
    best, arg = np.inf, None
    for plan in itertools.product(*(np.flatnonzero(r) for r in ok)):
        rows = np.arange(len(plan))
        if weight[rows, plan].sum() <= cap and cost[rows, plan].sum() < best:
            best, arg = float(cost[rows, plan].sum()), np.array(plan)
    return best, arg


def best_plan(cost: np.ndarray, weight: np.ndarray, ok: np.ndarray, cap: float) -> float:
    """Least total cost over every plan with one `ok` choice per row and total weight <= cap (inf if none)."""
    return optimum(cost, weight, ok, cap)[0]


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_is_exact_on_integer_weights(seed):
    rng = np.random.default_rng(seed)
    G, C = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    cost = rng.normal(size=(G, C))
    weight = 256.0 * rng.integers(1, 40, (G, C))
    ok = rng.random((G, C)) < 0.8
    ok[np.arange(G), rng.integers(0, C, G)] = True
    lightest = np.where(ok, weight, np.inf).min(axis=1).sum()
    cap = float(lightest + rng.uniform(-0.1, 1.0) * (np.where(ok, weight, 0).max(axis=1).sum() - lightest))
    ref = best_plan(cost, weight, ok, cap)
    pick = knapsack(cost, weight, ok, cap)
    if not np.isfinite(ref):
        assert pick is None
        return
    rows = np.arange(G)
    assert ok[rows, pick].all()
    assert weight[rows, pick].sum() <= cap
    assert cost[rows, pick].sum() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_on_real_weights_meets_the_cap_and_loses_at_most_one_step_per_group(seed):
    rng = np.random.default_rng(100 + seed)
    G, C, units = int(rng.integers(2, 7)), 4, 50
    cost = rng.normal(size=(G, C))
    weight = rng.uniform(1.0, 10.0, (G, C))
    ok = np.ones((G, C), dtype=bool)
    lightest = weight.min(axis=1).sum()
    cap = float(lightest + rng.uniform(0.0, 1.0) * (weight.max(axis=1).sum() - lightest))
    pick = knapsack(cost, weight, ok, cap, cells=units * G)
    rows = np.arange(G)
    assert weight[rows, pick].sum() <= cap
    # every plan whose weight above the lightest fits in (units - G) steps is still reachable
    step = (cap - lightest) / units
    assert cost[rows, pick].sum() <= best_plan(cost, weight, ok, cap - G * step) + 1e-12
    assert cost[rows, pick].sum() >= best_plan(cost, weight, ok, cap) - 1e-12
    # measured from an anchor plan that meets the cap, even the coarsest grid keeps that plan: here the optimum
    best, anchor = optimum(cost, weight, ok, cap)
    pick = knapsack(cost, weight, ok, cap, anchor, cells=G)
    assert weight[rows, pick].sum() <= cap
    assert cost[rows, pick].sum() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(60))
def test_convex_is_feasible_never_beats_the_optimum_and_bounds_it(seed):
    p = random_problem(seed, pairs=seed % 2 == 0)
    budgets = random_budgets(p, seed)
    ref = outcome(p, "brute", budgets)
    try:
        got = outcome(p, "convex", budgets)
    except RuntimeError as e:  # a heuristic may get stuck on several budgets, never on one
        assert len(budgets) > 1 and "found no plan" in str(e)
        return
    if isinstance(ref, InfeasibleError):
        assert isinstance(got, InfeasibleError)
        assert got.smallest == pytest.approx(ref.smallest)
        return
    assert p.is_valid(got.index)
    assert all(got.totals[b] <= v + 1e-7 * max(1, abs(v)) for b, v in budgets.items())
    assert ref.objective - 1e-9 <= got.objective
    assert got.lower_bound <= ref.objective + 1e-9
    assert got.info["rounding"] in ("ceil", "lagrange", "knapsack")


@pytest.mark.parametrize("seed", range(5))
def test_convex_without_budgets_picks_each_groups_cheapest_choice(seed):
    p = random_problem(seed, pairs=False)
    got = solve(p, method="convex")
    assert got.objective == pytest.approx(solve(p).objective, abs=1e-12)
    assert "knapsack" not in got.info["rounding_costs"]


def demo_shaped(seed: int) -> Problem:
    """<= 7 layers x {w2, w3, w4, w8}: costs off the 2^(-2b) curve by up to 4x, memory in bytes with scales."""
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 8))
    params = 1024.0 * rng.integers(1, 64, L)
    cost = (10 ** rng.uniform(-2, 1, L) * params)[:, None] * 2.0 ** (-2 * BITS) * 4 ** rng.uniform(-1, 1, (L, 4))
    return Problem([f"l{i}" for i in range(L)], ["w2", "w3", "w4", "w8"], cost=cost,
                   memory=params[:, None] * (BITS / 8 + 1 / 64), bits=np.tile(BITS, (L, 1)), params=params)


@pytest.mark.parametrize("seed", range(40))
def test_convex_is_optimal_among_plans_near_the_continuous_bits(seed):
    # one memory budget in bytes and few layers: the knapsack is exact over every group's neighbourhood
    p = demo_shaped(seed)
    plans, obj, totals = enumerate_plans(p)
    cap = float(np.quantile(totals["memory"], np.random.default_rng(seed).uniform(0.05, 0.95)))
    got = solve(p, method="convex", memory=cap)
    near = neighbourhood(p.bits, p.allowed, np.array(got.info["continuous_bits"]))
    inside = near[np.arange(p.n_layers), plans].all(axis=1) & (totals["memory"] <= cap)
    assert got.totals["memory"] <= cap
    assert got.objective <= obj[inside].min() + 1e-12 * abs(obj[inside].min())
    assert got.objective >= obj[totals["memory"] <= cap].min() * (1 - 1e-12)


@pytest.mark.parametrize("avg_bits", [3.0, 3.5, 4.0, 6.0])
def test_convex_is_within_a_small_gap_of_the_ilp_on_a_trained_model_profile(avg_bits):
    # the memory budgets of bench_convex_demo.py: the byte size of uniform 3, 4 and 8 bits and midpoints;
    # before the knapsack rounding, convex missed the optimum by 0.7% at 3 bits and 2.9% at 3.5
    layers = [f"h{i}.{m}" for i in range(4) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    memory = PARAMS[:, None] * (BITS / 8 + 1 / 64)
    p = Problem(layers, ["w2", "w3", "w4", "w8"], cost=FISHER, memory=memory, bits=np.tile(BITS, (16, 1)),
                params=PARAMS)
    size = lambda b: float(PARAMS.sum() * (b / 8 + 1 / 64))
    cap = {3.0: size(3), 3.5: (size(3) + size(4)) / 2, 4.0: size(4), 6.0: (size(4) + size(8)) / 2}[avg_bits]
    exact = solve(p, memory=cap)
    got = solve(p, method="convex", memory=cap)
    assert got.totals["memory"] <= cap
    assert got.lower_bound <= exact.objective
    assert got.objective <= exact.objective * (1 + 1e-3)
