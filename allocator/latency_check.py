"""Check latency predictions against the emitted model: for each plan, the whole-model latency predicted from the
table (the model's unquantized rest + the plan's layers) vs the measured forward of the quantized model, and the
quantized model's measured memory vs the plan's predicted bytes."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from kernels.latency import LatencyTable, forward_ms, l2_flush_buffer
from kernels.memory import matrix_shape
from kernels.model_latency import Inputs, model_key, time_forward

from .model import storage_bytes
from .plan import Plan
from .report import format_table, mib


@dataclass(frozen=True)
class LatencyCheck:
    """One plan at one token count (batch 1, no KV cache).

    predicted_ms = rest_ms + layers_ms (from the table; layers_ms sums `LatencyTable.layer_ms`); raw_ms = rest_ms +
    the layers' isolated entries (`LatencyTable.lookup`), before the graph-replay overhead is taken off (equal on
    the CPU); measured_ms: the quantized model's forward, timed as `mode` says; rel_error = (predicted - measured)
    / measured. Memory: on CUDA resident_bytes is what the CUDA allocator holds for the quantized model once on the
    device and peak_bytes the peak allocated during its timed forwards, both over the baseline before the plan was
    applied; on the CPU both are the quantized model's parameter + buffer bytes. predicted_bytes is the plan's
    whole-model total.
    """

    plan: str
    tokens: int
    predicted_ms: float
    rest_ms: float
    layers_ms: float
    raw_ms: float
    measured_ms: float
    mode: str
    rel_error: float
    predicted_bytes: int
    resident_bytes: int
    peak_bytes: int
    memory: str

    def to_dict(self) -> dict:
        return asdict(self)


def predict_latency(plan: Plan, table: LatencyTable, tokens: int, rest_key: str) -> tuple[float, float]:
    """(rest ms, layers ms) of ``plan`` at ``tokens`` tokens from ``table``: the rest stored under ``rest_key``
    (``kernels.model_latency.model_key(model, plan's layer names)``) and the sum of the layers' ``table.layer_ms``
    (their entries less the table's graph-replay overhead)."""
    rest = table.rest_ms(rest_key, tokens)
    if rest is None:
        raise ValueError(f"the latency table ({table.device}) holds no rest-of-model figure for this model "
                         f"(key {rest_key}); measure one with kernels.model_latency.measure_rest(model, layers, "
                         f"tokens=({tokens},), device=..., table=table)")
    return rest, _layers_ms(plan, table, tokens, raw=False)


def _layers_ms(plan: Plan, table: LatencyTable, tokens: int, raw: bool) -> float:
    """Sum over the plan's layers of ``table.layer_ms``, or of ``table.lookup`` (the isolated entries) when raw."""
    figure = table.lookup if raw else table.layer_ms
    total = 0.0
    for layer in plan.layers:
        shape = matrix_shape(layer.weight_shape, layer.kind)
        total += forward_ms(figure, layer, shape, layer.choice, tokens)
    return total


def check_latency(model: nn.Module, plans: Mapping[str, Plan] | Sequence[Plan], table: LatencyTable,
                  tokens: int | Iterable[int] = 1, device: str | torch.device = "cuda", reps: int | None = None,
                  inputs: Inputs | None = None, check_hash: bool = True) -> list[LatencyCheck]:
    """Apply each plan to ``model``, move the quantized model to ``device``, time its forward at each token count
    (``kernels.model_latency.time_forward``: batch 1, no KV cache) and compare with the table's prediction. On CUDA
    the table's measured paths and tiles are installed first (``LatencyTable.use_dispatch``).

    model: the float model, in the dtype the table was measured in, on the CPU or on ``device``.
    plans: name -> Plan (a sequence is named plan0, plan1, ...). The table must hold the model's rest at every
    token count (checked before anything is applied). Returns one LatencyCheck per plan and token count.
    """
    named = dict(plans) if isinstance(plans, Mapping) else {f"plan{i}": p for i, p in enumerate(plans)}
    if not named:
        raise ValueError("plans is empty: give at least one Plan")
    bad = [name for name, p in named.items() if not isinstance(p, Plan)]
    if bad:
        raise TypeError(f"plans {bad} are not allocator.Plan objects")
    counts = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    if not counts:
        raise ValueError("tokens is empty: give the token counts to time, e.g. (1, 16)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available; use device='cpu'")
    if dev.type == "cuda":
        table.use_dispatch()  # the models run the paths and tiles the table's entries timed
    predicted = {(name, t): predict_latency(p, table, t, model_key(model, [layer.name for layer in p.layers]))
                 for name, p in named.items() for t in counts}
    raw = {(name, t): _layers_ms(p, table, t, raw=True) for name, p in named.items() for t in counts}
    cuda = dev.type == "cuda"
    flush = l2_flush_buffer(dev)
    out = []
    for name, plan in named.items():
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(dev)
        qmodel = plan.apply(model, check_hash=check_hash).to(dev)
        if cuda:
            gc.collect()  # the float layers the plan replaced
            torch.cuda.synchronize(dev)
            resident = torch.cuda.memory_allocated(dev) - base
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            resident = storage_bytes(qmodel)
        timings = {t: time_forward(qmodel, t, dev, reps, inputs, flush) for t in counts}
        peak = torch.cuda.max_memory_allocated(dev) - base if cuda else resident
        del qmodel
        for t, timing in timings.items():
            rest, layers = predicted[(name, t)]
            out.append(LatencyCheck(
                plan=name, tokens=t, predicted_ms=rest + layers, rest_ms=rest, layers_ms=layers,
                raw_ms=rest + raw[(name, t)], measured_ms=timing.ms, mode=timing.mode,
                rel_error=(rest + layers - timing.ms) / timing.ms,
                predicted_bytes=int(plan.predicted["total_bytes"]), resident_bytes=int(resident), peak_bytes=int(peak),
                memory="cuda allocator" if cuda else "parameters + buffers"))
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return out


def format_checks(checks: Sequence[LatencyCheck]) -> str:
    """The checks as a plain text table (ms, relative error, MiB)."""
    rows = [{**c.to_dict(), "err": 100 * c.rel_error, "pred_mib": mib(c.predicted_bytes),
             "res_mib": mib(c.resident_bytes), "peak_mib": mib(c.peak_bytes)} for c in checks]
    return format_table(rows, [
        ("plan", "plan", "s"), ("tokens", "tokens", "d"), ("rest_ms", "rest ms", ".4f"), ("layers_ms", "layers ms", ".4f"),
        ("raw_ms", "raw ms", ".4f"), ("predicted_ms", "predicted ms", ".4f"), ("measured_ms", "measured ms", ".4f"),
        ("err", "error %", "+.1f"), ("mode", "timed", "s"), ("pred_mib", "predicted MiB", ".2f"),
        ("res_mib", "resident MiB", ".2f"), ("peak_mib", "peak MiB", ".2f")])
