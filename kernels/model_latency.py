"""Whole-model latency: time a model's forward, and its unquantized rest once per token count.

A plan's whole-model latency is predicted as rest + the sum of its layers' `LatencyTable.layer_ms` (each table
entry less the table's fixed graph-replay cost where it was graph-timed, which a whole-model graph pays once in
all), where the rest is the model's forward with every quantizable layer replaced by a stub that launches no work
(it returns a preallocated zero tensor of the layer's output shape): attention, norms, embeddings, residual adds,
whatever else the model does. Every forward here is batch 1, `tokens` input tokens, no KV cache (a prefill of
`tokens` tokens; at 1 token it stands in for one decode step without the cache read). CUDA: a CUDA-graph replay
of the forward when it can be captured (else eager), the L2 flushed before each run, CUDA events, median; CPU:
time.perf_counter, median. The rest is stored in a LatencyTable under `model_key(model, layers)`.

With a table on CUDA, `measure_rest` also calibrates the rest: it times a whole forward and keeps what it took beyond
the rest and its layers' isolated figures (`RestLatency.calibration_ms`), which `LatencyTable.rest_ms` adds to the
rest. That is what a layer pays inside the model's graph beyond its isolated figure (the gaps between kernels of a
long graph and the like), the same for one set of layers as for a plan's. The forward is of the model with every
layer quantized to w4 (or w8) where the table holds that choice for all of them, against those very entries;
else of the float model, against its float layers timed alone as the entries are (less the replay overhead).
Uncalibrated, 1-token predictions of a 1.1B Llama on an H100 came out low by 2.3-5.2% (sessions 39, 41). The
float-model calibration (session 41) then missed by up to +6.9% where the isolated float layers' figures moved
between runs (sessions 43-44); the w4 anchor, recomputed from the ten recorded runs' figures, keeps every plan
within -3.8..+3.6% (docs/kernels_gpu.md, "Session 44").
"""
from __future__ import annotations

import hashlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .choice import Choice
from .latency import (LatencyTable, RestLatency, cuda_graph, entry_key, l2_flush_buffer, time_events, time_layer,
                      time_replay_overhead)
from .layout import module_kind, weight_matrix
from .modules import quantize_module

Inputs = Callable[[int], Any]  # tokens -> the forward's input: a tensor, a tuple of tensors or a dict of keyword inputs


@dataclass(frozen=True)
class ForwardTiming:
    """Median ms of one forward and how it was timed: "cuda-graph", "cuda-eager" or "cpu"."""

    ms: float
    mode: str


def _layer_names(layers: Iterable) -> list[str]:
    """Names from a list of names, a LayerGraph-like object (`.names`) or LayerInfo-like objects (`.name`)."""
    names = getattr(layers, "names", layers)
    out = [n if isinstance(n, str) else n.name for n in names]
    if not out:
        raise ValueError("layers is empty: give the names of the model's quantizable layers (e.g. a LayerGraph)")
    return out


def model_key(model: nn.Module, layers: Iterable) -> str:
    """Which model a table's rest belongs to: the model's class, every parameter and buffer name and shape (not
    values, and not dtype or device: the rest is timed as the table's layers are), and the stubbed layers' names."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    h.update(("|" + ",".join(sorted(_layer_names(layers)))).encode())
    return f"{type(model).__name__}:{h.hexdigest()[:16]}"


class _Stub(nn.Module):
    """Stands in for a quantizable layer: runs it once per new input shape to learn its output shape, then returns
    a zero tensor of that shape (shared between stubs) without launching any work. While `calls` is a list, each
    call appends its input's (shape, dtype, device), or None where the layer took more than one input."""

    def __init__(self, layer: nn.Module, zeros: dict) -> None:
        super().__init__()
        self.layer = layer
        self.zeros = zeros
        self.out_shape: dict[tuple, tuple[int, ...]] = {}
        self.calls: list[tuple | None] | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if self.calls is not None:
            self.calls.append(None if args or kwargs else key)
        if key not in self.out_shape:
            self.out_shape[key] = tuple(self.layer(x, *args, **kwargs).shape)
        out = (self.out_shape[key], x.dtype, x.device)
        if out not in self.zeros:
            self.zeros[out] = torch.zeros(out[0], dtype=x.dtype, device=x.device)
        return self.zeros[out]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def stubbed(model: nn.Module, layers: Iterable) -> Iterator[nn.Module]:
    """`model` with each named layer replaced by a stub (zero output, no work), restored on exit. Values that flow
    from a stub are zeros; a model that writes into a layer's output in place changes only values, not work."""
    names = _layer_names(layers)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"layers {missing[:5]} do not exist in the {type(model).__name__}")
    zeros: dict = {}
    try:
        for n in names:
            _set(model, n, _Stub(modules[n], zeros))
        yield model
    finally:
        for n in names:
            _set(model, n, modules[n])


def default_inputs(model: nn.Module) -> Inputs:
    """For a Hugging Face language model: tokens -> batch-1 random input ids with use_cache=False (no KV cache)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"{type(model).__name__} has no config.vocab_size; pass inputs=: a function tokens -> "
                         "the forward's input (tensor, tuple or dict), batch 1")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    return lambda tokens: {"input_ids": torch.randint(0, vocab, (1, tokens), generator=gen).to(device),
                           "use_cache": False}


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _check_device(model: nn.Module, device: torch.device) -> None:
    where = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if any(d.type != device.type or (device.index is not None and d.index != device.index) for d in where):
        raise ValueError(f"the model's tensors are on {sorted(map(str, where))}, not on device={str(device)!r}; "
                         f"move it first, e.g. model.to({str(device)!r})")


def _default_reps(device: torch.device) -> int:
    return 30 if device.type == "cuda" else 5


ANCHORS = ("w4", "w8")  # choices the calibration quantizes every layer to, first one the table holds (_anchor)
CAPTURES = 3  # fresh CUDA-graph captures a whole-model timing takes the median of (see time_forward)


@torch.no_grad()
def time_forward(model: nn.Module, tokens: int, device: str | torch.device = "cuda", reps: int | None = None,
                 inputs: Inputs | None = None, flush: torch.Tensor | None = None,
                 captures: int = CAPTURES) -> ForwardTiming:
    """Median time of one forward of `model` (already on `device`) on batch 1 x `tokens` tokens, no KV cache.

    CUDA: a CUDA-graph replay when the forward can be captured, else eager; the L2 flushed before each run
    (`flush`: the scratch tensor `latency.flush_l2` reads, allocated when None); CUDA events; the median over
    `captures` fresh captures of each one's median of `reps` replays (one capture's figure can sit 1-3% off the
    next one's on an H100, which alone moved a calibrated prediction by as much). CPU: time.perf_counter.
    inputs: tokens -> the forward's input; default `default_inputs(model)` (Hugging Face language models).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available; use device='cpu'")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} must be a positive int")
    if not isinstance(captures, int) or isinstance(captures, bool) or captures < 1:
        raise ValueError(f"captures={captures!r} must be a positive int")
    _check_device(model, dev)
    reps = reps or _default_reps(dev)
    batch = (inputs or default_inputs(model))(tokens)
    run = lambda: _call(model, batch)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        if dev.type == "cpu":
            run()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            return ForwardTiming(statistics.median(times) * 1e3, "cpu")
        with torch.cuda.device(dev):
            for _ in range(3):
                run()
            flush = flush if flush is not None else l2_flush_buffer(dev)
            replay = cuda_graph(run)
            if replay is None:
                return ForwardTiming(time_events(run, reps, flush), "cuda-eager")
            ms = [time_events(replay, reps, flush)]
            for _ in range(captures - 1):
                del replay
                replay = cuda_graph(run)
                ms.append(time_events(replay, reps, flush))
            return ForwardTiming(statistics.median(ms), "cuda-graph")
    finally:
        model.train(was_training)


def measure_rest(model: nn.Module, layers: Iterable, tokens: Iterable[int] = (1, 16, 512),
                 device: str | torch.device = "cuda", reps: int | None = None, inputs: Inputs | None = None,
                 table: LatencyTable | None = None, calibrate: bool | None = None) -> RestLatency:
    """Time the model's forward with every layer in `layers` (names, or a LayerGraph) stubbed out, once per token
    count (batch 1, no KV cache); see the module docstring. The model must already be on `device`, in the dtype
    the table's layers were timed in (`latency.default_dtype(device)` unless `measure` was given another).
    With `table`, the result is stored (merged with earlier token counts) in `table.rest[model_key(model, layers)]`.
    calibrate: also calibrate the rest against a whole forward (`RestLatency.calibration_ms` and
    `.calibration_from`, see the module docstring; needs `table`, whose replay overhead is timed first where it is
    not yet). None: where a table is given on CUDA. On the CPU the isolated timings of small layers carry per-call
    overhead and noise as large as the calibration itself (a tiny conv net's calibrated rest came out negative), so
    it is off there unless asked for.
    """
    names = _layer_names(layers)
    tokens = tuple(tokens)
    if not tokens:
        raise ValueError("tokens is empty: give the token counts to time, e.g. (1, 16)")
    dev = torch.device(device)
    calibrate = table is not None and dev.type == "cuda" if calibrate is None else calibrate
    if calibrate and table is None:
        raise ValueError("calibrate=True needs table=: the float layers are timed as that table's entries are")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    key = model_key(model, names)
    rest = table.rest.get(key) if table is not None else None
    rest = rest or RestLatency(type(model).__name__, str(dtype).removeprefix("torch."), len(names))
    calls = {}
    with stubbed(model, names):
        for t in tokens:
            timing = time_forward(model, t, device, reps, inputs)
            rest.ms[t], rest.mode[t] = timing.ms, timing.mode
            rest.calibration_ms.pop(t, None)
            rest.calibration_from.pop(t, None)
            if calibrate:
                calls[t] = _layer_calls(model, names, t, inputs)
    if calibrate:
        time_replay_overhead(table, dev, reps or _default_reps(dev), None, dtype)
        _calibrate(rest, model, names, calls, table, dev, reps, inputs)
    if table is not None:
        table.rest[key] = rest
    return rest


def _calibrate(rest: RestLatency, model: nn.Module, names: list[str], calls: dict[int, list | None],
               table: LatencyTable, device: torch.device, reps: int | None, inputs: Inputs | None) -> None:
    """Set rest.calibration_ms at each token count of `calls` (its stubbed layer calls; None: not calibrated there):
    a whole forward less the rest and its layers' figures, where the layers are either every stubbed layer quantized
    to an `ANCHORS` choice the table holds for all of them, timed with the table's own entries (`_anchor`;
    quantized once for all the counts that share it), or else the float layers timed alone (`_float_layers_ms`);
    rest.calibration_from says which. Left unset, with a warning, where the forward took no longer than those
    layers."""
    keys = {t: _linear_keys(c, t) for t, c in calls.items() if c is not None}
    anchors = {t: _anchor(table, k, t) for t, k in keys.items()}
    wholes = {}
    for anchor in dict.fromkeys(anchors.values()):
        with nullcontext() if anchor is None else _quantized(model, names, anchor, table, device):
            for t in (t for t, a in anchors.items() if a == anchor):
                wholes[t] = time_forward(model, t, device, reps, inputs).ms
    for t, anchor in anchors.items():
        layers_ms = (_float_layers_ms(calls[t], table, t, device, reps) if anchor is None else
                     sum(table.layer_ms(shape, anchor, t, kind) for shape, kind in keys[t]))
        if wholes[t] <= layers_ms:
            warnings.warn(f"the {anchor or 'float'} forward at {t} tokens ({wholes[t]:.4g} ms) took no longer than "
                          f"its layers timed alone ({layers_ms:.4g} ms): timings this noisy cannot calibrate the rest, "
                          "which stays uncalibrated there (RestLatency.calibration_ms)", stacklevel=3)
            continue
        rest.calibration_ms[t] = wholes[t] - rest.ms[t] - layers_ms
        rest.calibration_from[t] = anchor or "float"


def _linear_keys(calls: list[tuple[nn.Module, tuple]], tokens: int) -> list[tuple[tuple[int, int], str]] | None:
    """(weight shape, kind) of each stubbed call, the key of its table entries; None where a call is not a linear
    layer on `tokens` rows (a conv's entries are keyed by its geometry)."""
    keys = []
    for layer, (shape, _, _) in calls:
        kind = module_kind(layer)
        if kind not in ("linear", "hf_conv1d") or len(shape) < 2 or torch.Size(shape[:-1]).numel() != tokens:
            return None
        keys.append((tuple(weight_matrix(layer).shape), kind))
    return keys


def _anchor(table: LatencyTable, keys: list[tuple[tuple[int, int], str]] | None, tokens: int) -> str | None:
    """The first `ANCHORS` choice the table has an entry for at every key (`_linear_keys`); None where there is none
    or no keys. A quantized model timed against the very entries its plans are predicted from keeps the isolated
    float layers out of the calibration: on an H200 their summed figure moved by 8-10% between two runs where the
    quantized entries and both models' forwards held within 1% (docs/kernels_gpu.md, "Session 44")."""
    if keys is None:
        return None
    return next((label for label in ANCHORS
                 if all(entry_key(shape, label, tokens, kind) in table.entries for shape, kind in keys)), None)


@contextmanager
def _quantized(model: nn.Module, names: list[str], label: str, table: LatencyTable,
               device: torch.device) -> Iterator[nn.Module]:
    """`model` with each named layer replaced by its quantized copy at choice `label` (on the path the table's
    entries timed, as an emitted model runs it), restored on exit."""
    choice = Choice.parse(label)
    if device.type == "cuda":
        table.use_dispatch()
    modules = {n: model.get_submodule(n) for n in names}
    try:
        with torch.no_grad():
            for n, m in modules.items():
                spec = choice.spec_for(module_kind(m), weight_matrix(m).shape[1])
                _set(model, n, quantize_module(m, spec, clip_search=False, backend=choice.kernel))
        yield model
    finally:
        for n, m in modules.items():
            _set(model, n, m)


def _layer_calls(model: nn.Module, names: list[str], tokens: int,
                 inputs: Inputs | None) -> list[tuple[nn.Module, tuple]] | None:
    """(float layer, its input's (shape, dtype, device)) of every stubbed layer call in one forward at `tokens`
    tokens (the layers must be stubbed); None, with a warning, where a layer took more than one input (it cannot
    be timed alone)."""
    stubs = [model.get_submodule(n) for n in names]
    for stub in stubs:
        stub.calls = []
    try:
        with torch.no_grad():
            _call(model, (inputs or default_inputs(model))(tokens))
        calls = [(stub.layer, key) for stub in stubs for key in stub.calls]
    finally:
        for stub in stubs:
            stub.calls = None
    if any(key is None for _, key in calls):
        warnings.warn("a stubbed layer took more than one input, so it cannot be timed alone: the rest is not "
                      f"calibrated at {tokens} tokens (RestLatency.calibration_ms)", stacklevel=3)
        return None
    return calls


@torch.no_grad()
def _float_layers_ms(calls: list[tuple[nn.Module, tuple]], table: LatencyTable, tokens: int, device: torch.device,
                     reps: int | None) -> float:
    """What the float layers of `calls` add to a forward by the table's measure: each distinct (layer type and
    settings, e.g. a conv's stride; parameter shapes; input) timed alone on a random input as the table's entries
    are (`latency.time_layer`), less the replay overhead (`LatencyTable.in_model_ms`), times its calls."""
    flush = l2_flush_buffer(device)
    groups: dict[tuple, list] = {}
    for layer, key in calls:
        kind = (type(layer), layer.extra_repr(), tuple(tuple(p.shape) for p in layer.parameters()), key)
        groups.setdefault(kind, [layer, 0])[1] += 1
    total = 0.0
    for (*_, (shape, dtype, _)), (layer, count) in groups.items():
        x = torch.randn(shape, dtype=dtype, device=device)
        total += count * table.in_model_ms(time_layer(layer, x, reps or _default_reps(device), flush, tokens), tokens)
    return total
