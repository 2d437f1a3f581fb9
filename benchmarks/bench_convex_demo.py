"""Convex (BAQ closed form + repair) vs the exact ILP on the profiles of the demo's trained GPT-2.

    python benchmarks/bench_convex_demo.py

Prints, per profiler and memory budget (the byte size of uniform b-bit for b in 3..8 and midpoints), the ILP
optimum, the convex plan's cost, its gap (relative to |ILP cost|), the roundings that reached it (ceil,
lagrange, knapsack; several when tied) and convex's solve time.
Uses the demo's cached model (trains it on first use; BITALLOC_CACHE sets the cache directory).
"""

from __future__ import annotations

from allocator.api import build_problem, profile_model, solver_budgets, uniform_plan
from allocator.budget import Budget
from allocator.demo import DemoSettings, demo_batches, demo_corpus, train_demo_model
from kernels import Choice
from solvers import solve

BITS = (2, 3, 4, 8)


def main() -> None:
    settings = DemoSettings()
    model = train_demo_model(settings)
    train, _ = demo_corpus()
    calib = demo_batches(train, settings.calib_batches, 4, settings.seq_len, seed=10)
    print("| profiler | budget (uniform-b size) | ILP cost | convex cost | gap | rounding | convex ms |")
    print("|---|---|---|---|---|---|---|")
    worst, slowest = 0.0, 0.0
    for name in ("hessian", "fisher", "measured"):
        profiled = profile_model(model, calib, [Choice(b) for b in BITS], profiler=name)
        problem = build_problem(profiled)
        sizes = {b: uniform_plan(profiled, Choice(b)).predicted["total_bytes"] for b in (3, 4, 8)}
        for label, size in [("3", sizes[3]), ("3.5", (sizes[3] + sizes[4]) / 2), ("4", sizes[4]),
                            ("6", (sizes[4] + sizes[8]) / 2)]:
            budgets = solver_budgets(Budget(memory_mb=size / 2**20), profiled.fixed_bytes)
            ilp = solve(problem, method="ilp", **budgets)
            convex = solve(problem, method="convex", **budgets)
            gap = (convex.objective - ilp.objective) / abs(ilp.objective)
            worst, slowest = max(worst, gap), max(slowest, convex.solve_time_s)
            won = [k for k, v in convex.info["rounding_costs"].items()
                   if v <= convex.objective + 1e-12 * abs(convex.objective)]
            print(f"| {name} | {label} | {ilp.objective:.6g} | {convex.objective:.6g} | {gap:.2%} | "
                  f"{' = '.join(won)} | {1e3 * convex.solve_time_s:.1f} |")
    print(f"\nworst gap {worst:.2%}, slowest convex solve {1e3 * slowest:.1f} ms")


if __name__ == "__main__":
    main()
