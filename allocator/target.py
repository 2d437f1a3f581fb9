"""Quality-target allocation: the smallest plan whose *measured* quality stays within a tolerance.

Bisection over the exact cost-vs-bytes Pareto frontier (``solvers.bisect_target``); every evaluation applies
the plan and measures it on held-out batches, and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch.nn as nn

from kernels import Choice
from profilers import Calibration
from solvers import Solution, bisect_target

from .api import ProfiledModel, build_problem, parse_choices, plan_from_solution, profile_model
from .budget import MIB, Budget
from .evaluate import evaluate
from .plan import Plan

log = logging.getLogger("bitalloc")

METRICS = {"loss": False, "perplexity": False, "accuracy": True}  # metric -> higher is better


def allocate_to_target(
    model: nn.Module,
    calib: Calibration | Sequence,
    eval_batches: Calibration | Sequence,
    metric: str = "perplexity",
    tolerance: float = 0.5,
    bits: Iterable[int] | None = (2, 3, 4, 8),
    choices: Iterable[Choice | str] | None = None,
    profiler: str = "hessian",
    max_evals: int = 12,
    profiled: ProfiledModel | None = None,
    **profiler_settings,
) -> tuple[Plan, list[dict]]:
    """The smallest plan whose ``metric`` on ``eval_batches`` is within ``tolerance`` of the float model's.

    Example: ``allocate_to_target(model, calib, held_out, metric="perplexity", tolerance=0.5)`` (perplexity at
    most +0.5), or ``metric="accuracy", tolerance=0.01`` (at most 1 point of accuracy lost).
    Returns the plan and the evaluation log (frontier index, bytes, cost, measured quality, met or not).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed values: {sorted(METRICS)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    higher_is_better = METRICS[metric]
    baseline = evaluate(model, eval_batches)
    if metric not in baseline:
        raise ValueError(f"metric {metric!r} is not available for this model's outputs; available: {sorted(baseline)}")
    target = baseline[metric] - tolerance if higher_is_better else baseline[metric] + tolerance
    if profiled is None:
        profiled = profile_model(model, calib, parse_choices(bits, choices), profiler=profiler, **profiler_settings)
    problem = build_problem(profiled)

    def quality(solution: Solution) -> float:
        plan = plan_from_solution(profiled, problem, solution, Budget(avg_bits=32))
        value = evaluate(plan.apply(model, check_hash=False), eval_batches)[metric]
        log.info("bisect: %.4f MiB -> %s %.4f (target %.4f)", plan.predicted["total_bytes"] / MIB, metric, value, target)
        return value

    solution, evaluations = bisect_target(problem, quality, target, objective="memory",
                                          higher_is_better=higher_is_better, max_evals=max_evals)
    plan = plan_from_solution(profiled, problem, solution, Budget(avg_bits=32))
    plan.budget = Budget(memory_mb=plan.predicted["total_bytes"] / MIB)
    plan.solver.update({"target": {"metric": metric, "tolerance": tolerance, "baseline": baseline[metric],
                                   "threshold": target}, "evaluations": evaluations})
    return plan, evaluations
