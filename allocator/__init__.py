"""bitalloc's service layer: budgets, allocation, plans, applying a plan and saving the quantized model.

    from allocator import Budget, allocate, load_quantized, save_quantized
    plan = allocate(model, calib_batches, Budget(avg_bits=4.0), bits=(2, 3, 4, 8))
    plan.save("plan.json")
    qmodel = plan.apply(model)
    save_quantized(qmodel, "out/")
"""

from .api import ProfiledModel, allocate, build_problem, profile_model, solve_profiled, uniform_plan
from .budget import Budget
from .evaluate import evaluate
from .jobs import JobSpec, run_job
from .latency_check import LatencyCheck, check_latency, format_checks, predict_latency
from .plan import LayerPlan, ModelIdentity, Plan, PlanError
from .quantize import apply, load_quantized, quantized_bytes, save_quantized
from .submit import submit
from .target import allocate_to_target

__all__ = [
    "Budget", "JobSpec", "LatencyCheck", "LayerPlan", "allocate_to_target", "ModelIdentity", "Plan", "PlanError", "ProfiledModel",
    "allocate", "apply", "build_problem", "check_latency", "evaluate", "format_checks", "load_quantized", "predict_latency",
    "profile_model", "quantized_bytes", "run_job", "save_quantized", "solve_profiled", "submit", "uniform_plan",
]
