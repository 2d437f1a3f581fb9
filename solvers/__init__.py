"""bitalloc.solvers: pure optimisation of one choice per layer under budgets (numpy, scipy, pulp, networkx)."""
from solvers import brute, convex, greedy, pareto_method  # noqa: F401  (register the methods)
from solvers.registry import UNAVAILABLE

try:
    from solvers import ilp  # noqa: F401  (registers "ilp"; needs pulp and highspy)
except ImportError as e:  # e.g. a GPU image without them: every other method still works
    UNAVAILABLE["ilp"] = f"{e}; install pulp and highspy"
from solvers.bisect import bisect_target
from solvers.errors import InfeasibleError, TargetNotMetError
from solvers.pareto import ParetoPoint, pareto, plot_pareto
from solvers.problem import Problem
from solvers.registry import SOLVERS, register_solver
from solvers.solution import Solution
from solvers.solve import solve

__all__ = ["Problem", "Solution", "solve", "pareto", "ParetoPoint", "plot_pareto", "InfeasibleError",
           "TargetNotMetError", "SOLVERS", "register_solver", "bisect_target"]
