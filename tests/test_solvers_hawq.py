"""HAWQ-V3's published ILP: the nine ResNet18 bit strings must come back exactly."""
import json
from pathlib import Path

import numpy as np
import pytest

from solvers import Problem, solve

# a copy of shared/data/hawq_v3_resnet_ilp.json (the workplace's reference data), so the test never skips
DATA = Path(__file__).resolve().parent / "data" / "hawq_v3_resnet_ilp.json"


def hawq_problem(net: str) -> tuple[Problem, dict]:
    """The formulation stated in the file: 4 or 8 bits, cost trace * (delta8 - delta4) at 8 bits."""
    d = json.loads(DATA.read_text())["nets"][net]
    n = len(d["parameters"])
    names = d.get("layer_names", [f"layer{i}" for i in range(n)])
    col = lambda a4, a8: np.stack([np.asarray(a4, float), np.asarray(a8, float)], axis=1)
    trace, d4, d8 = (np.asarray(d[k]) for k in ("Hutchinson_trace", "delta_weights_4bit_square",
                                                  "delta_weights_8bit_square"))
    params, bops = np.asarray(d["parameters"]), np.asarray(d["bops"])
    p = Problem(layers=names, choices=["w4", "w8"], cost=col(np.zeros(n), trace * (d8 - d4)),
                memory=col(params * 4 / 8, params * 8 / 8), bops=col(bops / 64, bops / 16),
                latency=col(d["latency_int4"], d["latency_int8"]), bits=col(np.full(n, 4), np.full(n, 8)),
                params=params, ties=[(names[a], names[b]) for a, b in d["ties"]])
    return p, d


def budget(p: Problem, quantity: str, r: float) -> float:
    t = p.tables[quantity]
    return float(t[:, 0].sum() + r * (t[:, 1].sum() - t[:, 0].sum()))


@pytest.mark.parametrize("kind,quantity", [("modelsize", "memory"), ("bops", "bops"), ("latency", "latency")])
@pytest.mark.parametrize("r", [0.75, 0.5, 0.25])
@pytest.mark.parametrize("method", ["ilp", "pareto"])
def test_resnet18_published_bit_strings(kind, quantity, r, method):
    p, d = hawq_problem("resnet18")
    sol = solve(p, method=method, **{quantity: budget(p, quantity, r)})
    bits = [int(sol.choice[n][1:]) for n in p.layers]
    assert bits == d["expected_bits"][f"{kind}_{r}"]
    assert sol.status == "optimal"


def test_resnet18_convex_is_close_and_its_bound_holds():
    p, _ = hawq_problem("resnet18")
    for quantity in ("memory", "bops", "latency"):
        for r in (0.25, 0.5, 0.75):
            cap = budget(p, quantity, r)
            exact = solve(p, **{quantity: cap})
            approx = solve(p, method="convex", **{quantity: cap})
            assert approx.lower_bound <= exact.objective + 1e-12
            assert approx.totals[quantity] <= cap
            # costs are negative here (gain from 8 bits): a worse plan has a larger objective
            assert approx.objective <= exact.objective + 0.05 * abs(exact.objective)


def test_resnet50_solves_with_ties_held():
    p, d = hawq_problem("resnet50")
    sol = solve(p, memory=budget(p, "memory", 0.5), bops=budget(p, "bops", 0.5))
    assert sol.status == "optimal"
    for a, b in d["ties"]:
        assert sol.index[a] == sol.index[b]
    assert sol.totals["memory"] <= budget(p, "memory", 0.5)
