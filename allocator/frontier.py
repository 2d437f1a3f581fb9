"""The exact Pareto frontier of a saved profile, as JSON and (optionally) a PNG plot."""

from __future__ import annotations

import os

import numpy as np

from kernels.fileio import atomic_write_json
from kernels.latency import LatencyTable
from solvers import pareto, plot_pareto

from .api import ProfiledModel, build_problem, check_table_tokens, rest_latency_ms
from .budget import MIB


def frontier(profile_path: str | os.PathLike, objective: str = "memory", out: str | os.PathLike | None = None,
             plot: str | os.PathLike | None = None, latency_table: LatencyTable | None = None,
             tokens: int = 1) -> list[dict]:
    """Non-dominated (cost, quantity) plans of a profiled model. memory is reported in whole-model MiB; latency
    (needs ``latency_table``, at ``tokens`` tokens per forward) in ms, the whole model's where the table holds the
    model's rest (``kernels.model_latency.measure_rest``), else the quantized layers'."""
    profiled = ProfiledModel.load(profile_path)
    if objective == "latency":
        if latency_table is None:
            raise ValueError("a latency frontier needs a latency table: pass latency_table= (`bitalloc pareto "
                             "--latency-table latency.json --tokens N`), measured with `bitalloc latency`")
        check_table_tokens(latency_table, latency_table.rest.get(profiled.rest_key), (tokens,))
    problem = build_problem(profiled, latency_table=latency_table if objective == "latency" else None, tokens=tokens)
    points = pareto(problem, objective=objective)
    shift, scale, unit = 0.0, 1.0, objective
    if objective == "memory":
        shift, scale, unit = profiled.fixed_bytes, MIB, "memory_mb"
    elif objective == "latency":
        rest = rest_latency_ms(profiled, latency_table, tokens)
        shift, unit = rest or 0.0, "latency_ms" if rest is not None else "latency_layers_ms"
    rows = [{"value": (p.value + shift) / scale, "cost": p.cost, "choice": p.choice} for p in points]
    if out is not None:
        atomic_write_json(out, {"objective": unit, **({"tokens": tokens} if objective == "latency" else {}),
                                "points": rows})
    if plot is not None:
        table = problem.tables[objective]
        uniform = {label: ((float(table[:, j].sum()) + shift) / scale, float(problem.cost[:, j].sum()))
                   for j, label in enumerate(problem.choices) if problem.allowed[:, j].all()}
        scaled = [type(p)(unit, (p.value + shift) / scale, p.cost, np.asarray(p.index), problem) for p in points]
        plot_pareto(scaled, plot, uniform=uniform, title=f"{profiled.model.name}: cost vs {unit}")
    print(f"{len(rows)} Pareto-optimal plans, {unit} from {rows[0]['value']:.4g} to {rows[-1]['value']:.4g}"
          + (f"; wrote {out}" if out else "") + (f", {plot}" if plot else ""))
    return rows
