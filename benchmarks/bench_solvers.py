"""Solver benchmark on synthetic problems shaped like real models; prints a markdown table.

    python benchmarks/bench_solvers.py            # the table in docs/solvers.md
    python benchmarks/bench_solvers.py --cbc      # also time the CBC backend
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solvers import Problem, pareto, solve  # noqa: E402

BITS = np.array([2, 3, 4, 5, 6, 8, 3, 4], dtype=float)
GROUP64 = np.array([0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)  # w3g64, w4g64: finer scales, more bytes, less error
LABELS = ["w2", "w3", "w4", "w5", "w6", "w8", "w3g64", "w4g64"]


def synthetic(n_layers: int, seed: int, n_edges: int = 0) -> Problem:
    """Layers with log-uniform sizes, cost trace * params * 2^(-2b), bytes incl. fp16 scales, latency ~ bytes."""
    rng = np.random.default_rng(seed)
    params = np.round(10 ** rng.uniform(4, 7, n_layers))
    trace = 10 ** rng.uniform(-3, 0, n_layers)
    noise = rng.uniform(0.9, 1.1, (n_layers, len(BITS)))
    cost = (trace * params)[:, None] * 2.0 ** (-2 * BITS) * np.where(GROUP64, 0.7, 1.0) * noise
    groups = np.where(GROUP64, 64, 128)
    memory = np.ceil(params[:, None] * BITS / 8) + 2 * np.ceil(params[:, None] / groups)
    latency = 1e-6 * memory * rng.uniform(0.8, 1.2, (n_layers, 1)) + 0.01
    pairs = {}
    names = [f"layer{i}" for i in range(n_layers)]
    if n_edges:
        edges = {(i, i + 1) for i in range(n_layers - 1)}
        while len(edges) < n_edges:
            a, b = sorted(rng.choice(n_layers, 2, replace=False))
            edges.add((int(a), int(b)))
        scale = np.sqrt(cost.mean(axis=1))
        for a, b in sorted(edges):  # interactions ~10% of the layers' own costs, either sign
            pairs[(names[a], names[b])] = 0.1 * scale[a] * scale[b] * rng.normal(size=(8, 8))
    return Problem(layers=names, choices=LABELS, cost=cost, memory=memory, latency=latency,
                   bits=np.tile(BITS, (n_layers, 1)), params=params, pairs=pairs)


def transformer(n_blocks: int, seed: int, d: int = 4096, ffn: int = 11008) -> Problem:
    """A Llama-shaped stack: per block q, k, v, o (d x d) and gate, up (ffn x d), down (d x ffn)."""
    rng = np.random.default_rng(seed)
    shapes = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn)]
    params = np.array([o * i for _ in range(n_blocks) for o, i in shapes], dtype=float)
    n = len(params)
    trace = 10 ** rng.uniform(-3, 0, n)
    cost = (trace * params)[:, None] * 2.0 ** (-2 * BITS) * np.where(GROUP64, 0.7, 1.0)
    memory = params[:, None] * BITS / 8 + 2 * params[:, None] / np.where(GROUP64, 64, 128)
    names = [f"block{b}.{m}" for b in range(n_blocks) for m in ("q", "k", "v", "o", "gate", "up", "down")]
    return Problem(layers=names, choices=LABELS, cost=cost, memory=memory, bits=np.tile(BITS, (n, 1)),
                   params=params)


def budget(p: Problem, quantity: str, r: float) -> float:
    """r of the way from the smallest to the largest total."""
    t = p.tables[quantity]
    return float(t.min(axis=1).sum() + r * (t.max(axis=1).sum() - t.min(axis=1).sum()))


def timed(fn, *args, **kw):
    """Result, wall seconds and CPU seconds of this process (all threads): on a shared machine CPU time is
    the steadier figure, wall time the one a user waits."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def row(name: str, seconds: tuple[float, float], goal: str, note: str) -> None:
    print(f"| {name} | {seconds[0]:.3f} | {seconds[1]:.3f} | {goal} | {note} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cbc", action="store_true", help="also time the CBC backend")
    args = ap.parse_args()
    print("| case | wall s | CPU s | goal | result |\n|---|---|---|---|---|")

    big = synthetic(1000, seed=0)
    caps = {"memory": budget(big, "memory", 0.4), "latency": budget(big, "latency", 0.45)}
    sol, t = timed(solve, big, **caps)
    row("ILP 1000 x 8, memory + latency (HiGHS)", t, "< 1 s, proven optimal",
        f"{sol.status}, build {sol.info['build_s']:.3f} s, {sol.info['n_variables']} vars, binding {sol.binding}")
    for method in ("convex", "greedy"):
        h, th = timed(solve, big, method=method, **caps)
        extra = f", rounded vs own bound {h.gap:.3%}" if h.gap is not None else ""
        row(f"{method} 1000 x 8, same budgets", th, "-",
            f"cost {(h.objective - sol.objective) / sol.objective:+.3%} vs ILP optimum{extra}")
    if args.cbc:
        c, tc = timed(solve, big, backend="cbc", **caps)
        row("ILP 1000 x 8, memory + latency (CBC)", tc, "-", f"{c.status}, objective equal: "
            f"{np.isclose(c.objective, sol.objective, rtol=1e-9)}")

    paired = synthetic(200, seed=1, n_edges=400)
    cap = {"memory": budget(paired, "memory", 0.4)}
    for form in ("marginal", "mccormick"):
        s2, t2 = timed(solve, paired, pair_form=form, time_limit=30, **cap)
        row(f"ILP 200 x 8, 400 pair edges, {form}", t2, "< 10 s, proven optimal",
            f"{s2.status}, {s2.info['n_variables']} vars, objective {s2.objective:.6g}")

    for name, prob in (("Llama-shaped 224 x 8 (32 blocks)", transformer(32, seed=3)),
                       ("random sizes 50 x 8", synthetic(50, seed=2)),
                       ("random sizes 100 x 8", synthetic(100, seed=2))):
        pts, tp = timed(pareto, prob, "memory")
        row(f"Pareto frontier (memory), {name}", tp, "< 5 s", f"{len(pts)} frontier points, exact")
    llama = transformer(32, seed=3)
    s3, t3 = timed(solve, llama, memory=budget(llama, "memory", 0.3))
    row("ILP Llama-shaped 224 x 8, memory", t3, "-", s3.status)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_solvers_hawq import budget as hbudget, hawq_problem

    worst, over = 0.0, 0
    for net in ("resnet18", "resnet50"):
        p, _ = hawq_problem(net)
        for q in ("memory", "bops", "latency"):
            for r in (0.25, 0.5, 0.75):
                e = solve(p, **{q: hbudget(p, q, r)})
                c = solve(p, method="convex", **{q: hbudget(p, q, r)})
                gap = (c.objective - e.objective) / abs(e.objective)
                worst, over = max(worst, gap), over + (gap > 0.01)
    row("convex vs ILP, HAWQ-V3 ResNet18/50 (18 budgets)", (0.0, 0.0), "within 1%",
        f"worst gap {worst:.3%}, {over} of 18 above 1%")
    print(json.dumps({"backend": "HiGHS " + _highs_version() + " via PuLP"}))


def _highs_version() -> str:
    import highspy

    h = highspy.Highs()
    return f"{h.versionMajor()}.{h.versionMinor()}.{h.versionPatch()}"


if __name__ == "__main__":
    main()
