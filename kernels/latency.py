"""Measured latency tables: every distinct (layer shape, choice, tokens) timed on the target device.

`measure(layers, choices, tokens, device)` quantizes a random weight of each shape under each choice, runs
every path that can compute it (CUDA: our Triton kernels and the library anchors of `gpu_backends`; CPU:
the registered backends of `kernels.backends`), checks each against a float64 reference (a path off by
more than the tolerance is dropped and the reason kept), and times the correct ones: on CUDA with events
around a CUDA-graph replay of one call, the L2 flushed before each replay, the median of `reps`; on the CPU
with time.perf_counter. The fastest correct path per entry is the dispatch table. Tables are cached as
JSON keyed by the device name and the torch / triton versions; only missing entries are measured.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends import BACKENDS, convert_layout
from .choice import Choice
from .quantizer import QuantizedTensor, quantize

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
L2_FLUSH_BYTES = 128 << 20  # > 2x the L2 of an H100 (50 MB) / H200 (60 MB)


def device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"cpu-{platform.machine()}-{platform.processor() or 'unknown'}-{torch.get_num_threads()}threads"


def versions() -> dict[str, str]:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv}


def entry_key(shape: tuple[int, int], choice: Choice | str, tokens: int, kind: str = "linear") -> str:
    label = choice if isinstance(choice, str) else choice.label
    return f"{kind}:{shape[0]}x{shape[1]}|{label}|{tokens}"


@dataclass
class LatencyEntry:
    """One measured (shape, choice, tokens): the fastest correct path and every path's median ms."""

    ms: float
    backend: str
    all_ms: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class LatencyTable:
    """Milliseconds per (layer shape, choice, tokens) on one device, with the winning path of each."""

    device: str
    versions: dict[str, str]
    entries: dict[str, LatencyEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # choice label -> why the device cannot run it

    def lookup(self, shape: tuple[int, int], choice: Choice | str, tokens: int, kind: str = "linear") -> float:
        key = entry_key(shape, choice, tokens, kind)
        if key not in self.entries:
            label = choice if isinstance(choice, str) else choice.label
            if label in self.skipped:
                raise KeyError(f"choice {label} was removed on {self.device}: {self.skipped[label]}")
            raise KeyError(f"{key} was not measured on {self.device}; call measure() with this shape/choice/tokens")
        return self.entries[key].ms

    def latency_matrix(self, shapes: list[tuple[int, int]], choices: list[Choice | str], tokens: int,
                       kind: str = "linear") -> list[list[float]]:
        """[L, C] milliseconds for the solver's Problem(latency=...)."""
        return [[self.lookup(s, c, tokens, kind) for c in choices] for s in shapes]

    @property
    def dispatch(self) -> dict[tuple[int, int, str, int], str]:
        """(N, K, choice label, tokens) -> fastest correct path."""
        out = {}
        for key, e in self.entries.items():
            shape, label, tokens = key.split(":", 1)[1].split("|")
            n, k = (int(v) for v in shape.split("x"))
            out[(n, k, label, int(tokens))] = e.backend
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "versions": self.versions, "skipped": self.skipped,
                "entries": {k: vars(e) for k, e in self.entries.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        return cls(d["device"], dict(d["versions"]), {k: LatencyEntry(**e) for k, e in d["entries"].items()},
                   dict(d.get("skipped", {})))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def cache_path(cache_dir: str | Path, device: str | torch.device) -> Path:
    v = versions()
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name(device)}_torch{v['torch']}_triton{v['triton']}")
    return Path(cache_dir) / f"latency_{slug}.json"


def _shapes(layers: Iterable) -> list[tuple[str, tuple[int, int]]]:
    """Distinct (kind, (out, in)) of (out, in) tuples, LayerInfo-like objects or a LayerGraph."""
    items = getattr(layers, "layers", layers)
    seen: dict[tuple[str, tuple[int, int]], None] = {}
    for it in items:
        if hasattr(it, "out_features"):
            seen[(it.kind, (int(it.out_features), int(it.in_features)))] = None
        else:
            n, k = it
            seen[("linear", (int(n), int(k)))] = None
    return list(seen)


def _cpu_candidates(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Callable]:
    from types import SimpleNamespace
    fns = {}
    dev = torch.device("cpu")
    for b in BACKENDS.values():
        if not b.supports(qt.spec, qt.shape, dev, dtype):
            continue
        qw = SimpleNamespace(qweight=convert_layout(qt.packed, qt.spec, qt.shape, "dense", b.layout), scales=qt.scales,
                             zeros=qt.zeros, spec=qt.spec, matrix_shape=qt.shape, layout=b.layout)
        fns[b.name] = (lambda b, qw: lambda x: b.linear(x, qw))(b, qw)
    return fns


def _time_cpu(fn: Callable, x: torch.Tensor, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cuda(fn: Callable, x: torch.Tensor, reps: int, flush: torch.Tensor, graph: bool = True) -> float:
    """Median ms of fn(x) over `reps` runs, each after an L2 flush, with CUDA events (graph replay if possible)."""
    for _ in range(3):
        fn(x)
    run = lambda: fn(x)  # noqa: E731
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(x)
            run = g.replay
            run()
        except Exception:  # noqa: BLE001 - a path that cannot be captured is timed eagerly
            torch.cuda.synchronize()
            run = lambda: fn(x)  # noqa: E731
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _rel_error(y: torch.Tensor, x: torch.Tensor, qt: QuantizedTensor) -> float:
    ref = x.double().cpu() @ qt.dequantize(torch.float64).t()
    y = y.double().cpu()
    if y.shape != ref.shape or not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def unsupported_reason(choice: Choice, device: torch.device) -> str | None:
    """Why `device` cannot run `choice` (None: it can)."""
    if choice.abits is not None:
        from . import gpu_activation_quant as gaq
        return gaq.unsupported_reason(choice, device)
    return None


def candidates(qt: QuantizedTensor, choice: Choice, dtype: torch.dtype, device: torch.device):
    """(name -> fn, name -> reason skipped) of every path that runs `qt` under `choice` on `device`."""
    if choice.abits is not None:
        from . import gpu_activation_quant as gaq
        return gaq.candidates(qt, choice, dtype)
    if device.type == "cuda":
        from .gpu_backends import gpu_candidates
        return gpu_candidates(qt, dtype)
    return _cpu_candidates(qt, dtype), {}


def measure(layers: Iterable, choices: Iterable[Choice | str], tokens: Iterable[int] = (1, 16, 512),
            device: str | torch.device = "cuda", dtype: torch.dtype | None = None, reps: int | None = None,
            cache_dir: str | Path | None = None, seed: int = 0) -> LatencyTable:
    """Time every distinct (layer shape, choice, tokens); see the module docstring."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available; use device='cpu'")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    reps = reps or (50 if dev.type == "cuda" else 5)
    choices = [Choice.parse(c) if isinstance(c, str) else c for c in choices]
    path = cache_path(cache_dir, dev) if cache_dir is not None else None
    table = LatencyTable.load(path) if path is not None and path.exists() else LatencyTable(device_name(dev), versions())
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=dev) if dev.type == "cuda" else None
    gen = torch.Generator().manual_seed(seed)
    for choice in choices:
        reason = unsupported_reason(choice, dev)
        if reason is not None:
            table.skipped[choice.label] = reason
            continue
        for kind, shape in _shapes(layers):
            todo = [t for t in tokens if entry_key(shape, choice, t, kind) not in table.entries]
            if not todo:
                continue
            qt = quantize(torch.randn(*shape, generator=gen), choice.spec_for(kind, shape[1]), clip_search=False)
            fns, skipped = candidates(qt, choice, dtype, dev)
            for t in todo:
                x = torch.randn(t, shape[1], generator=gen).to(dev, dtype)
                ms, rejected = {}, dict(skipped)
                for name, fn in fns.items():
                    try:
                        err = _rel_error(fn(x), x, qt)
                    except Exception as e:  # noqa: BLE001 - a failing path is reported, not fatal
                        rejected[name] = f"{type(e).__name__}: {e}"[:300]
                        continue
                    if err > TOLERANCE[dtype] * (4 if choice.abits is not None else 1):
                        rejected[name] = f"relative error {err:.2e} over tolerance"
                        continue
                    ms[name] = (time_cuda(fn, x, reps, flush, graph=t <= 64) if dev.type == "cuda"
                                else _time_cpu(fn, x, reps))
                if not ms:
                    raise RuntimeError(f"no correct path for {entry_key(shape, choice, t, kind)}: {rejected}")
                best = min(ms, key=ms.get)
                table.entries[entry_key(shape, choice, t, kind)] = LatencyEntry(ms[best], best, ms, rejected)
            if path is not None:
                table.save(path)
    if path is not None:
        table.save(path)
    return table
