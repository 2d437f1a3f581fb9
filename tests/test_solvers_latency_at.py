"""Latency bounded at several token counts at once (decode and prefill): `Problem(latency_at=...)` and
`solve(latency={tokens: ms})`, every method against brute force."""
import numpy as np
import pytest

from solvers import InfeasibleError, Problem, pareto, solve
from solvers.brute import enumerate_plans
from test_solvers_exact import outcome


def two_token_problem(seed: int) -> Problem:
    """<= 6 layers x <= 4 choices; the last choice is fast at 1 token and slow at 512 (a decode-only kernel)."""
    rng = np.random.default_rng(seed)
    L, C = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    bits = np.tile([2, 3, 4, 8][:C], (L, 1)).astype(float)
    decode = rng.random((L, C)) + bits * 0.1
    prefill = rng.random((L, C)) * 5 + 10
    decode[:, -1] *= 0.5
    prefill[:, -1] *= 4
    return Problem(layers=[f"l{i}" for i in range(L)], choices=[f"w{b}" for b in (2, 3, 4, 8)[:C]],
                   cost=rng.normal(size=(L, C)) ** 2, memory=bits * 10, bits=bits,
                   latency_at={1: decode, 512: prefill})


def budgets_for(p: Problem, seed: int) -> dict[int, float]:
    rng = np.random.default_rng(seed + 1)
    _, _, totals = enumerate_plans(p)
    return {t: float(np.quantile(totals[f"latency@{t}"], rng.uniform(0.05, 0.9))) for t in (1, 512)}


@pytest.mark.parametrize("seed", range(40))
def test_every_method_meets_decode_and_prefill_budgets(seed):
    p = two_token_problem(seed)
    latency = budgets_for(p, seed)
    ref = outcome(p, "brute", {"latency": latency})
    ilp = outcome(p, "ilp", {"latency": latency})
    if isinstance(ref, InfeasibleError):
        assert isinstance(ilp, InfeasibleError)
        assert set(ilp.smallest) == {"latency@1", "latency@512"}
        return
    assert ilp.objective == pytest.approx(ref.objective, abs=1e-9)
    for method in ("ilp", "greedy", "convex"):
        try:
            got = solve(p, method=method, latency=latency)
        except RuntimeError as e:  # a heuristic may get stuck on two budgets
            assert method != "ilp" and "found no plan" in str(e)
            continue
        assert got.totals["latency@1"] <= latency[1] + 1e-9
        assert got.totals["latency@512"] <= latency[512] + 1e-9
        assert got.objective >= ref.objective - 1e-9
        assert set(got.budgets) == {"latency@1", "latency@512"}


def test_a_prefill_bound_keeps_the_decode_only_kernel_out():
    # one layer: w4 is fast enough at both; "w4@k" decodes faster and prefills 5x slower but is more accurate
    p = Problem(["a"], ["w4", "w4@k"], cost=[[1.0, 0.5]], latency_at={1: [[2.0, 1.0]], 512: [[10.0, 50.0]]})
    assert solve(p, latency={1: 2.5}).choice == {"a": "w4@k"}
    assert solve(p, latency={1: 2.5, 512: 20.0}).choice == {"a": "w4"}
    with pytest.raises(InfeasibleError, match="no plan meets latency@1 and latency@512 together"):
        solve(p, latency={1: 1.5, 512: 20.0})


def test_latency_budgets_must_name_a_measured_token_count():
    p = two_token_problem(0)
    with pytest.raises(ValueError, match=r"latency@16 budget given but the problem has no latency@16 table "
                                         r"\(its latency tables are at tokens \[1, 512\]\)"):
        solve(p, latency={1: 5.0, 16: 5.0})
    with pytest.raises(ValueError, match="latency budget given but the problem has no latency table"):
        solve(p, latency=5.0)


def test_latency_at_round_trips_through_json_and_gives_pareto_objectives(tmp_path):
    p = two_token_problem(3)
    p.save(tmp_path / "p.json")
    q = Problem.load(tmp_path / "p.json")
    assert list(q.latency_at) == [1, 512]
    np.testing.assert_array_equal(q.latency_at[512], p.latency_at[512])
    front = pareto(q, objective="latency@512")
    _, _, totals = enumerate_plans(q)
    assert front[0].value == pytest.approx(totals["latency@512"].min())
    with pytest.raises(ValueError, match="latency_at keys must be positive token counts"):
        Problem(["a"], ["w4"], cost=[[0.0]], latency_at={0: [[1.0]]})
    with pytest.raises(ValueError, match="latency_at has token count 1 twice"):
        Problem(["a"], ["w4"], cost=[[0.0]], latency_at={1: [[1.0]], "1": [[2.0]]})
