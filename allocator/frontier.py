"""The exact Pareto frontier of a saved profile, as JSON and (optionally) a PNG plot."""

from __future__ import annotations

import os

import numpy as np

from kernels.fileio import atomic_write_json
from solvers import pareto, plot_pareto

from .api import ProfiledModel, build_problem
from .budget import MIB


def frontier(profile_path: str | os.PathLike, objective: str = "memory", out: str | os.PathLike | None = None,
             plot: str | os.PathLike | None = None) -> list[dict]:
    """Non-dominated (cost, quantity) plans of a profiled model; memory is reported in whole-model MiB."""
    profiled = ProfiledModel.load(profile_path)
    problem = build_problem(profiled)
    points = pareto(problem, objective=objective)
    shift = profiled.fixed_bytes if objective == "memory" else 0.0
    scale = MIB if objective == "memory" else 1.0
    rows = [{"value": (p.value + shift) / scale, "cost": p.cost, "choice": p.choice} for p in points]
    unit = "memory_mb" if objective == "memory" else objective
    if out is not None:
        atomic_write_json(out, {"objective": unit, "points": rows})
    if plot is not None:
        table = getattr(problem, objective)
        uniform = {label: ((float(table[:, j].sum()) + shift) / scale, float(problem.cost[:, j].sum()))
                   for j, label in enumerate(problem.choices)}
        scaled = [type(p)(unit, (p.value + shift) / scale, p.cost, np.asarray(p.index), problem) for p in points]
        plot_pareto(scaled, plot, uniform=uniform, title=f"{profiled.model.name}: cost vs {unit}")
    print(f"{len(rows)} Pareto-optimal plans, {unit} from {rows[0]['value']:.4g} to {rows[-1]['value']:.4g}"
          + (f"; wrote {out}" if out else "") + (f", {plot}" if plot else ""))
    return rows
