"""A latency table measured on this process's device: the layers' entries and, given the model, its unquantized
rest, cached so that a later job or run on the same device measures only what is new."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn

from kernels.latency import LatencyTable, cache_path, default_dtype, measure
from kernels.model_latency import measure_rest, model_key
from profilers import LayerGraph


def measure_here(layers: Iterable, choices: list[str], tokens: tuple[int, ...], cache_dir: str,
                 model: nn.Module | None = None, graph: LayerGraph | None = None) -> LatencyTable:
    """Measure on this process's device (its GPU when it has one, else the CPU) at each of ``tokens``. With the
    model and its layer graph, the table also gets the model's unquantized rest, so a latency budget bounds the
    whole model (a copy of the model is moved to the device and dtype where it is not there already)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = measure(layers, choices, tokens=tokens, device=device, cache_dir=cache_dir)
    missing = () if model is None else tuple(
        t for t in tokens if t not in getattr(table.rest.get(model_key(model, graph.names)), "ms", {}))
    if missing:
        param, dtype = next(model.parameters()), default_dtype(device)
        here = model if (param.device, param.dtype) == (device, dtype) else copy.deepcopy(model).to(device, dtype)
        measure_rest(here, graph, missing, device, table=table)
        table.save(cache_path(cache_dir, device))
    return table
