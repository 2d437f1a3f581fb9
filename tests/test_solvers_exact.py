"""Every exact method equals brute force on random small problems (pairs, ties, pins, several budgets)."""
import itertools

import numpy as np
import pytest

from solvers import InfeasibleError, Problem, pareto, solve
from solvers.brute import enumerate_plans

BUDGET_NAMES = ("memory", "latency", "bops", "avg_bits")


def random_problem(seed: int, pairs: bool = True, int_cost: bool = False) -> Problem:
    """<= 6 layers x <= 4 choices; memory/bops integer, latency float; random mask, ties, pins, pair terms."""
    rng = np.random.default_rng(seed)
    L, C = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    layers, choices = [f"l{i}" for i in range(L)], [f"w{b}" for b in (2, 3, 4, 8)[:C]]
    bits = np.tile([2, 3, 4, 8][:C], (L, 1)).astype(float)
    params = rng.integers(10, 100, L).astype(float)
    cost = rng.integers(0, 50, (L, C)).astype(float) if int_cost else rng.normal(size=(L, C)) ** 2
    allowed = rng.random((L, C)) < 0.85
    allowed[np.arange(L), rng.integers(0, C, L)] = True
    ties, pins = [], {}
    if rng.random() < 0.5:
        a, b = rng.choice(L, 2, replace=False)
        if (allowed[a] & allowed[b]).any():
            ties.append((layers[a], layers[b]))
    if rng.random() < 0.4:
        i = int(rng.integers(L))
        tied = [layers.index(n) for t in ties for n in t] if layers[i] in {n for t in ties for n in t} else [i]
        ok = np.flatnonzero(np.logical_and.reduce(allowed[tied]))
        pins[layers[i]] = choices[int(rng.choice(ok))]
    pair_terms = {}
    if pairs:
        for a, b in itertools.combinations(range(L), 2):
            if rng.random() < 0.3:
                pair_terms[(layers[a], layers[b])] = rng.normal(scale=0.5, size=(C, C))
    return Problem(layers=layers, choices=choices, cost=cost, memory=params[:, None] * bits / 8,
                   latency=rng.random((L, C)) + bits * 0.1, bops=rng.integers(1, 20, (L, C)).astype(float),
                   bits=bits, params=params, ties=ties, pins=pins, pairs=pair_terms, allowed=allowed)


def random_budgets(p: Problem, seed: int) -> dict[str, float]:
    """1-3 budgets between (a bit below) the smallest and the largest achievable totals."""
    rng = np.random.default_rng(10_000 + seed)
    _, _, totals = enumerate_plans(p)
    names = rng.choice(BUDGET_NAMES, int(rng.integers(1, 4)), replace=False)
    return {str(b): float(np.quantile(totals[b], rng.uniform(0.0, 0.9))) if rng.random() > 0.1
            else float(totals[b].min() * 0.9 - 1) for b in names}


def outcome(p: Problem, method: str, budgets: dict, **options):
    try:
        return solve(p, method=method, **budgets, **options)
    except InfeasibleError as e:
        return e


@pytest.mark.parametrize("seed", range(200))
def test_ilp_equals_brute_force(seed):
    p = random_problem(seed)
    budgets = random_budgets(p, seed)
    ref = outcome(p, "brute", budgets)
    for form, warm in (("marginal", True), ("mccormick", True), ("marginal", False)):
        got = outcome(p, "ilp", budgets, pair_form=form, warm_start=warm)
        if isinstance(ref, InfeasibleError):
            assert isinstance(got, InfeasibleError)
            assert got.smallest == pytest.approx(ref.smallest)
        else:
            assert got.status == "optimal"
            assert got.objective == pytest.approx(ref.objective, abs=1e-7)
            assert p.is_valid(got.index)
            assert all(got.totals[b] <= v + 1e-9 * max(1, abs(v)) for b, v in budgets.items())


@pytest.mark.parametrize("seed", range(12))
def test_cbc_backend_equals_brute_force(seed):
    p = random_problem(seed)
    budgets = random_budgets(p, seed)
    ref, got = outcome(p, "brute", budgets), outcome(p, "ilp", budgets, backend="cbc")
    if isinstance(ref, InfeasibleError):
        assert isinstance(got, InfeasibleError)
    else:
        assert got.objective == pytest.approx(ref.objective, abs=1e-6)


def test_infeasible_message_names_smallest_values():
    p = random_problem(3)
    _, _, totals = enumerate_plans(p)
    with pytest.raises(InfeasibleError, match="memory budget .* is below the smallest achievable") as e:
        solve(p, memory=totals["memory"].min() - 1, bops=1e9)
    assert e.value.smallest == {"memory": pytest.approx(totals["memory"].min()),
                                "bops": pytest.approx(totals["bops"].min())}


def test_jointly_infeasible_budgets_are_named_together():
    # layer takes w2 (small, slow) or w8 (big, fast): either budget alone is fine, both together are not
    p = Problem(["a"], ["w2", "w8"], cost=[[1.0, 0.0]], memory=[[2.0, 8.0]], latency=[[5.0, 1.0]])
    with pytest.raises(InfeasibleError, match="no plan meets memory and latency together") as e:
        solve(p, memory=4, latency=2)
    assert e.value.smallest == {"memory": 2.0, "latency": 1.0}


def brute_frontier(p: Problem, objective: str) -> np.ndarray:
    _, obj, totals = enumerate_plans(p)
    pts = np.unique(np.stack([totals[objective], obj], axis=1), axis=0)
    dominated = ((pts[None, :, 0] <= pts[:, None, 0]) & (pts[None, :, 1] <= pts[:, None, 1])).sum(axis=1) > 1
    return pts[~dominated]


@pytest.mark.parametrize("seed", range(150))
def test_pareto_frontier_equals_brute_force_point_for_point(seed):
    p = random_problem(seed, pairs=False, int_cost=seed % 2 == 0)
    for objective in ("memory", "bops", "latency", "avg_bits"):
        points = pareto(p, objective)
        got = np.array([(pt.value, pt.cost) for pt in points])
        want = brute_frontier(p, objective)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for pt in points:  # each point's plan really has that value and cost
            assert p.totals(pt.index)[objective] == pytest.approx(pt.value)
            assert p.objective(pt.index) == pytest.approx(pt.cost)
            assert p.is_valid(pt.index)


@pytest.mark.parametrize("seed", range(100))
def test_pareto_method_equals_brute_force_for_one_budget(seed):
    p = random_problem(seed, pairs=False)
    budgets = dict(list(random_budgets(p, seed).items())[:1])
    ref, got = outcome(p, "brute", budgets), outcome(p, "pareto", budgets)
    if isinstance(ref, InfeasibleError):
        assert isinstance(got, InfeasibleError)
    else:
        assert got.objective == pytest.approx(ref.objective)
