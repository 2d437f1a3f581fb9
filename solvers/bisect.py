"""Accuracy-target bisection: the smallest frontier plan whose measured quality meets a target.

Frontier plans are ordered by resource; assuming quality improves along the frontier, bisection finds the
first plan that meets the target in about log2(frontier size) evaluations, each one logged.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from solvers.errors import TargetNotMetError
from solvers.pareto import pareto
from solvers.problem import Problem
from solvers.solution import Solution

logger = logging.getLogger(__name__)


def bisect_target(problem: Problem, evaluate: Callable[[Solution], float], target: float,
                  objective: str = "memory", higher_is_better: bool = True,
                  max_evals: int = 20) -> tuple[Solution, list[dict]]:
    """Bisect the exact `objective` frontier for the smallest plan with quality meeting `target`.

    Meets means quality >= target (higher_is_better) or <= target. Returns the Solution (status "optimal" when
    the bisection converged, "feasible" when max_evals ran out first) and the log of evaluations.
    """
    if not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be a positive int; got {max_evals!r}")
    t0 = time.perf_counter()
    points = pareto(problem, objective)
    log: list[dict] = []

    def solution(i: int, status: str) -> Solution:
        p = points[i]
        return Solution.build(problem, p.index, {}, "bisect", status, time.perf_counter() - t0,
                              frontier_index=i, frontier_size=len(points), evaluations=len(log))

    def meets(i: int) -> bool:
        quality = float(evaluate(solution(i, "feasible")))
        ok = quality >= target if higher_is_better else quality <= target
        log.append({"eval": len(log) + 1, "frontier_index": i, objective: points[i].value, "cost": points[i].cost,
                    "quality": quality, "meets": ok})
        logger.info("bisect eval %d: frontier point %d/%d, %s %.6g, cost %.6g -> quality %.6g (%s)", len(log), i,
                    len(points), objective, points[i].value, points[i].cost, quality, "meets" if ok else "misses")
        return ok

    hi = len(points) - 1
    if not meets(hi):
        raise TargetNotMetError(f"even the lowest-cost plan ({objective} {points[hi].value:.6g}) has quality "
                                f"{log[-1]['quality']:.6g}, which misses the target {target:.6g}", log)
    lo = -1  # invariant: points[hi] meets, every index <= lo is known (or assumed) to miss
    while hi - lo > 1 and len(log) < max_evals:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return solution(hi, "optimal" if hi - lo == 1 else "feasible"), log
