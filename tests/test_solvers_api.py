"""Problem validation, JSON round trips, Solution fields and summaries, the registry."""
import json

import numpy as np
import pytest

from solvers import SOLVERS, Problem, Solution, pareto, plot_pareto, solve

LAYERS = ["q", "k", "v", "mlp"]
DIAG = np.eye(4, 3, dtype=bool) | np.eye(4, 3, -3, dtype=bool)  # q: w2, k: w4, v: w8, mlp: w2
CHOICES = ["w2", "w4", "w8"]
BITS = np.tile([2.0, 4.0, 8.0], (4, 1))
PARAMS = np.array([100.0, 100.0, 100.0, 400.0])
COST = np.array([[9.0, 3.0, 0.0], [8.0, 2.0, 0.0], [7.0, 1.0, 0.0], [20.0, 4.0, 0.0]])


def small(**kw) -> Problem:
    args = dict(layers=LAYERS, choices=CHOICES, cost=COST, memory=PARAMS[:, None] * BITS / 8,
                latency=BITS * [[1.0], [1.0], [1.0], [4.0]], bits=BITS, params=PARAMS)
    args.update(kw)
    return Problem(**args)


def test_solution_reports_totals_binding_and_slack():
    p = small()
    sol = solve(p, memory=500.0, latency=100.0)  # all at 8 bits: 800 bytes, latency 56
    assert sol.status == "optimal" and sol.method == "ilp"
    assert sol.choice == {"q": "w8", "k": "w8", "v": "w8", "mlp": "w4"}
    assert sol.objective == 4.0
    assert sol.totals == {"memory": 500.0, "latency": 40.0, "avg_bits": pytest.approx(4000 / 700)}
    assert sol.slack == {"memory": 0.0, "latency": 60.0}
    assert sol.binding == ["memory"]
    assert "memory: total 500 <= budget 500, binds 0 (0.00%)" in sol.summary()
    assert "latency: total 40 <= budget 100, slack 60 (60.00%)" in sol.summary()
    tight = solve(p, avg_bits=4.0)
    assert tight.binding == ["avg_bits"] and tight.totals["avg_bits"] == 4.0
    assert "avg_bits: total 4 <= budget 4, binds 0" in tight.summary()
    assert Solution.from_dict(json.loads(json.dumps(tight.to_dict()))).choice == tight.choice


def test_ties_pins_and_allowed_are_honoured():
    allowed = np.ones((4, 3), dtype=bool)
    allowed[3, 2] = False  # no 8-bit kernel for mlp
    p = small(ties=[("q", "k", "v")], pins={"q": "w8"}, allowed=allowed)
    sol = solve(p)
    assert sol.choice == {"q": "w8", "k": "w8", "v": "w8", "mlp": "w4"}


def test_pair_terms_change_the_optimum():
    # a negative interaction makes q and k prefer to sit at w4 together
    d = np.zeros((3, 3))
    d[1, 1] = -10.0
    p = small(pairs={("q", "k"): d})
    sol = solve(p, avg_bits=8.0)
    assert sol.choice["q"] == sol.choice["k"] == "w4"
    assert sol.objective == 3.0 + 2.0 - 10.0


def test_problem_json_round_trip(tmp_path):
    allowed = np.ones((4, 3), dtype=bool)
    allowed[0, 0] = False
    p = small(ties=[("k", "v")], pins={"mlp": "w4"}, pairs={("q", "mlp"): np.eye(3)}, allowed=allowed)
    p.save(tmp_path / "p.json")
    q = Problem.load(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    assert solve(q, memory=600).choice == solve(p, memory=600).choice
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


@pytest.mark.parametrize("kw,match", [
    (dict(cost=np.ones((4, 2))), r"cost must have shape \[layers, choices\] = \(4, 3\); got \(4, 2\)"),
    (dict(cost=np.where(np.eye(4, 3) > 0, np.nan, 1.0)), r"cost\[layer 'q', choice 'w2'\] is nan"),
    (dict(latency=np.full((4, 3), np.inf)), r"latency\[layer 'q', choice 'w2'\] is inf"),
    (dict(ties=[("q", "nope")]), r"ties names unknown layer 'nope'"),
    (dict(pins={"q": "w3"}), r"pin 'q' -> 'w3': unknown choice; allowed values: \['w2', 'w4', 'w8'\]"),
    (dict(pins={"q": "w2", "k": "w8"}, ties=[("q", "k")]), r"pins conflict with ties"),
    (dict(pins={"q": "w8"}, allowed=DIAG), r"pin 'q' -> 'w8' conflicts with allowed"),
    (dict(ties=[("q", "k")], allowed=DIAG),
     r"tied layers \['q', 'k'\] have no common allowed choice"),
    (dict(pairs={("q", "x"): np.zeros((3, 3))}), r"pairs names unknown layer 'x'"),
    (dict(pairs={("q", "k"): np.zeros((2, 3))}), r"pairs\[\('q', 'k'\)\] must have shape"),
    (dict(allowed=np.zeros((4, 3), dtype=bool)), r"allowed marks no choice available for layer 'q'"),
    (dict(params=[1.0, 2.0]), r"params must have shape \[layers\] = \(4,\)"),
])
def test_bad_problems_get_specific_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_solve_calls_get_specific_errors():
    p = Problem(["a"], ["w4", "w8"], cost=[[1.0, 0.0]], memory=[[4.0, 8.0]])
    with pytest.raises(ValueError, match="latency budget given but the problem has no latency table"):
        solve(p, latency=1.0)
    with pytest.raises(ValueError, match="avg_bits budget given but the problem has no bits and params tables"):
        solve(p, avg_bits=4)
    with pytest.raises(ValueError, match=r"unknown method 'lp'; allowed values: \['brute', 'convex'"):
        solve(p, method="lp")
    with pytest.raises(ValueError, match=r"method 'ilp' got unknown options \['gap'\]"):
        solve(p, gap=0.1)
    with pytest.raises(ValueError, match=r"backend='gurobi'; allowed values: \('highs', 'cbc'\)"):
        solve(p, backend="gurobi")
    with pytest.raises(ValueError, match="memory budget must be a finite number"):
        solve(p, memory=float("nan"))
    with pytest.raises(ValueError, match="method 'convex' needs the bits table"):
        solve(p, method="convex", memory=8)
    with pytest.raises(ValueError, match="method 'pareto' needs exactly one budget"):
        solve(p, method="pareto")


def test_registry_holds_one_entry_per_method():
    assert sorted(SOLVERS) == ["brute", "convex", "greedy", "ilp", "pareto"]


def test_pareto_rejects_pair_terms_and_plots_with_uniform_points(tmp_path):
    d = np.zeros((3, 3))
    with pytest.raises(ValueError, match="the DP frontier does not support pair terms"):
        pareto(small(pairs={("q", "k"): d}))
    with pytest.raises(ValueError, match=r"objective='bytes'; allowed values"):
        pareto(small(), "bytes")
    p = small()
    points = pareto(p, "memory")
    assert points[0].value == 175.0 and points[-1].value == 700.0  # all-w2 and all-w8 plans
    assert [pt.cost for pt in points] == sorted((pt.cost for pt in points), reverse=True)
    uniform = {c: (p.totals(np.full(4, j))["memory"], p.objective(np.full(4, j))) for j, c in enumerate(CHOICES)}
    plot_pareto(points, tmp_path / "f.png", uniform=uniform)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert points[0].to_dict()["choice"] == {n: "w2" for n in LAYERS}
