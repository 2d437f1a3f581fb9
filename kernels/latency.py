"""Measured latency tables: every distinct (layer shape, choice, tokens) timed on the target device.

`measure(layers, choices, tokens, device)` quantizes a random weight of each shape under each choice, runs every
path that can compute it (CUDA: our Triton kernels and the library anchors of `gpu_backends`; CPU: the registered
backends of `kernels.backends`), checks each against a float64 reference (a path off by more than the tolerance is
dropped and the reason kept), and times the correct ones: on CUDA with events around a CUDA-graph replay of one
call, the L2 flushed before each replay, the median of `reps`; on the CPU with time.perf_counter. The fastest
correct path per entry is the dispatch table. On CUDA our fused kernel is also timed at the other tiles
`triton_linear.tile_candidates` offers (decode tiles up to 16 tokens, the Hopper wgmma prefill's above; as
"triton_fused[<tile label>]"), and the fastest of our paths, tile included, is installed for emitted models
(`gpu_backends.use_measured`; `LatencyTable.use_dispatch` installs a whole table); a W<b>A8 entry times each of
`a8_linear.PATHS` (the weight-only kernels measured and installed first, as one path runs them) and installs the
fastest (`a8_linear.use_measured`). Each weight-only linear entry then times the path the backend registry
dispatches a `QuantizedLinear` to (`selected`): that is what an emitted model runs, so `lookup` returns its time.
A library-kernel choice (`Choice.kernel`, e.g. "w4@tinygemm") times only the backend its layers are held for (its
fallback where that cannot run); layers it cannot hold (`Choice.kernel_reason`) get no entry.
Convs whose geometry the layer graph recorded are timed as the QuantizedConv an emitted model holds, on `tokens`
samples of their traced input shape, under a kind that carries the geometry (`geometry_kind`; `latency_calls` lists
a layer's entries with their calls). `rest` holds the unquantized rest of whole models (attention, norms,
embeddings; `kernels.model_latency.measure_rest`, with its calibration against the float model's own forward), so a
plan's latency can be predicted for the whole model.
Each graph-timed entry (CUDA, tokens <= GRAPH_MAX_TOKENS) carries the fixed launch and event cost of one timed
replay, which a whole-model graph pays once in all: `measure` times that cost once per table
(`replay_overhead_ms`: a replay of one layer less what each further layer of a graph adds, which a layer also
pays inside a model) and `LatencyTable.layer_ms` subtracts it, giving what a layer adds to a model's
forward. The L2 flush before each timed run reads a 128 MiB buffer: a flush that writes it would leave the L2
full of dirty lines, and every timed kernel would pay for writing them back, which it does not inside a model.
Tables are cached as JSON keyed by the device name, the torch / triton versions and a hash of our kernels' and
timing code's sources (a changed kernel is timed again); only missing entries are measured.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import a8_linear
from .backends import BACKENDS, Backend, forced_backend, layer_view, select_backend
from .choice import Choice, QuantSpec
from .fileio import atomic_write_json
from .gpu_activation_quant import ACT_QUANT_KINDS
from .gpu_layout import repack_for_gpu
from .modules import QuantizedConv
from .quantizer import QuantizedTensor, quantize

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
ACT_QUANT_TOLERANCE = 8e-2  # x rounded to 8 bits per token (int8: about 1% of the output), or e4m3 (2^-4 steps)
L2_FLUSH_BYTES = 128 << 20  # > 2x the L2 of an H100 (50 MB) / H200 (60 MB)
# on CUDA, entries of up to this many tokens are timed as CUDA-graph replays: every count, since a whole-model
# forward is graph-captured at every count (timed eagerly, a 512-token layer also paid Python and launch time: a
# 1B Llama's layers summed to twice their share of the measured forward)
GRAPH_MAX_TOKENS = 1 << 16
MIN_LAYER_FRACTION = 0.1  # layer_ms never goes below this fraction of the raw entry


def device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"cpu-{platform.machine()}-{platform.processor() or 'unknown'}-{torch.get_num_threads()}threads"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The activation dtype tables are measured in by default: bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# the modules whose code decides what a layer runs and how it is timed: a change to any starts a new cache
_TIMED_SOURCES = ("a8_linear.py", "backends.py", "cpu_backends.py", "gpu_backends.py", "gpu_layout.py", "triton_linear.py",
                  "gpu_activation_quant.py", "latency.py", "modules.py", "packing.py", "quantizer.py")  # convs: modules


def versions() -> dict[str, str]:
    """torch and triton versions, and a hash of our kernels' and timing code's sources."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _TIMED_SOURCES)).hexdigest()[:12]
    return {"torch": torch.__version__, "triton": tv, "kernels": code}


def entry_key(shape: tuple[int, int], choice: Choice | str, tokens: int, kind: str = "linear") -> str:
    label = choice if isinstance(choice, str) else choice.label
    return f"{kind}:{shape[0]}x{shape[1]}|{label}|{tokens}"


def parse_entry_key(key: str) -> tuple[str, tuple[int, int], str, int]:
    """(kind, (N, K), choice label, tokens) of an `entry_key`."""
    kind, rest = key.split(":", 1)
    shape, label, tokens = rest.split("|")
    n, k = (int(v) for v in shape.split("x"))
    return kind, (n, k), label, int(tokens)


@dataclass
class LatencyEntry:
    """One measured (shape, choice, tokens): the fastest correct path, every path's median ms, and the path an
    emitted model's layer runs (`selected`; None for tables from before it was recorded, conv kinds and
    activation-quantized choices, whose paths are not the registry's)."""

    ms: float
    backend: str
    all_ms: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)
    selected: str | None = None

    @property
    def model_ms(self) -> float:
        """Median ms of the path an emitted model runs; the fastest path's where that was not measured."""
        return self.all_ms.get(self.selected, self.ms) if self.selected is not None else self.ms


@dataclass
class RestLatency:
    """The unquantized rest of one model (its forward with every quantizable layer stubbed out), in median ms
    per token count (batch 1, no KV cache), and how each was timed ("cuda-graph", "cuda-eager", "cpu").
    calibration_ms: a whole forward less the rest and less its layers' figures, per token count: what the model's
    layers cost inside its forward beyond their isolated figures (gaps between kernels in the model's graph and the
    like), charged to every plan with the rest (`LatencyTable.rest_ms`; `model_latency.measure_rest`). The forward
    is of the model with every layer quantized to one choice, against that choice's own entries, where the table
    holds them (calibration_from: its label), else of the float model against its float layers timed as the
    table's entries are ("float")."""

    model: str
    dtype: str
    layers: int
    ms: dict[int, float] = field(default_factory=dict)
    mode: dict[int, str] = field(default_factory=dict)
    calibration_ms: dict[int, float] = field(default_factory=dict)
    calibration_from: dict[int, str] = field(default_factory=dict)  # per token count: "float" or the choice label

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "layers": self.layers,
                "ms": {str(t): v for t, v in self.ms.items()}, "mode": {str(t): v for t, v in self.mode.items()},
                "calibration_ms": {str(t): v for t, v in self.calibration_ms.items()},
                "calibration_from": {str(t): v for t, v in self.calibration_from.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RestLatency":
        return cls(d["model"], d["dtype"], int(d["layers"]), {int(t): float(v) for t, v in d["ms"].items()},
                   {int(t): str(v) for t, v in d.get("mode", {}).items()},
                   {int(t): float(v) for t, v in d.get("calibration_ms", {}).items()},
                   {int(t): str(v) for t, v in d.get("calibration_from", {}).items()})


@dataclass
class LatencyTable:
    """Milliseconds per (layer shape, choice, tokens) on one device, with the winning path of each."""

    device: str
    versions: dict[str, str]
    entries: dict[str, LatencyEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # choice label -> why the device cannot run it
    rest: dict[str, RestLatency] = field(default_factory=dict)  # model_latency.model_key -> the model's rest
    replay_overhead_ms: float = 0.0  # fixed cost of one timed graph replay (`replay_overhead_ms()`); 0 on the CPU
    graph_max_tokens: int = 0  # entries of up to this many tokens were graph-timed (GRAPH_MAX_TOKENS; 0: none)

    def lookup(self, shape: tuple[int, int], choice: Choice | str, tokens: int, kind: str = "linear") -> float:
        """Median ms of one layer as an emitted model runs it, as measured in isolation (`LatencyEntry.model_ms`)."""
        key = entry_key(shape, choice, tokens, kind)
        if key not in self.entries:
            label = choice if isinstance(choice, str) else choice.label
            if label in self.skipped:
                raise KeyError(f"choice {label} was removed on {self.device}: {self.skipped[label]}")
            raise KeyError(f"{key} was not measured on {self.device}; call measure() with this shape/choice/tokens")
        return self.entries[key].model_ms

    def layer_ms(self, shape: tuple[int, int], choice: Choice | str, tokens: int, kind: str = "linear") -> float:
        """What one layer adds to a whole-model forward: its `lookup` figure less the replay overhead
        (`in_model_ms`). The solver's latency column and whole-model predictions use this."""
        return self.in_model_ms(self.lookup(shape, choice, tokens, kind), tokens)

    def in_model_ms(self, ms: float, tokens: int) -> float:
        """An isolated figure timed as this table's entries are, as part of a whole-model forward: less
        `replay_overhead_ms` where `tokens` was graph-timed, never below MIN_LAYER_FRACTION of `ms` (noise can put a
        tiny layer near the overhead, and the floor keeps the result increasing in `ms`, so a layer's choices keep
        their order)."""
        if tokens > self.graph_max_tokens:
            return ms
        return max(ms - self.replay_overhead_ms, MIN_LAYER_FRACTION * ms)

    def rest_ms(self, key: str, tokens: int) -> float | None:
        """Median ms of the rest of the model `key` (`model_latency.model_key`) at `tokens` tokens, with its
        calibration (`RestLatency.calibration_ms`) where it was measured: what a plan's whole-model prediction adds
        to its layers. None when the table holds no rest for that model, KeyError when it does but not at
        `tokens`."""
        rest = self.rest.get(key)
        if rest is None:
            return None
        if tokens not in rest.ms:
            raise KeyError(f"the rest of model {key} was measured at tokens {sorted(rest.ms)} on {self.device}, "
                           f"not at {tokens}; call model_latency.measure_rest with tokens=({tokens},)")
        return rest.ms[tokens] + rest.calibration_ms.get(tokens, 0.0)

    def latency_matrix(self, shapes: list[tuple[int, int]], choices: list[Choice | str], tokens: int,
                       kind: str = "linear") -> list[list[float]]:
        """[L, C] milliseconds (`layer_ms`) for the solver's Problem(latency=...)."""
        return [[self.layer_ms(s, c, tokens, kind) for c in choices] for s in shapes]

    @property
    def dispatch(self) -> dict[tuple[int, int, str, int], str]:
        """(N, K, choice label, tokens) -> fastest correct path of the linear-path entries (not convs timed with
        their geometry, which run one path)."""
        out = {}
        for key, e in self.entries.items():
            kind, (n, k), label, tokens = parse_entry_key(key)
            if "(" not in kind:
                out[(n, k, label, tokens)] = e.backend
        return out

    def use_dispatch(self) -> None:
        """Run emitted models' "triton" layers in this process by this table's measured winners among our paths
        (dequantize + cuBLAS or the fused kernel, and the fused kernel's tile) per (shape, choice, tokens): what
        its `selected` entries timed; and their W<b>A8 layers by the fastest of `a8_linear.PATHS`. `measure` does
        this on CUDA; call it after loading a table in a new process (a table of another device installs tiles
        measured there). Other token counts take the path and tile measured at the nearest count (the default tile
        where that tile cannot run them: `gpu_backends.pick`)."""
        use_paths(self.measured_paths())

    def measured_paths(self, layers: Iterable[tuple[str, tuple[int, int], str]] | None = None) -> list[dict[str, Any]]:
        """The fastest of our paths per weight-only linear entry, and the fastest W<b>A8 path per entry that timed
        them, as JSON records for `use_paths` ({"kind", "shape": [N, K], "choice", "tokens", "path"}); `layers`:
        only these (kind, (N, K), choice label)."""
        wanted = None if layers is None else {(kind, tuple(shape), label) for kind, shape, label in layers}
        records = []
        for key, e in self.entries.items():
            kind, shape, label, tokens = parse_entry_key(key)
            path = _fastest_ours(e.all_ms) if Choice.parse(label).abits is None else _fastest_a8(e.all_ms)
            if kind in ("linear", "hf_conv1d") and path is not None and (wanted is None or (kind, shape, label) in wanted):
                records.append({"kind": kind, "shape": list(shape), "choice": label, "tokens": tokens, "path": path})
        return records

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "versions": self.versions, "skipped": self.skipped,
                "entries": {k: vars(e) for k, e in self.entries.items()},
                "rest": {k: r.to_dict() for k, r in self.rest.items()},
                "replay_overhead_ms": self.replay_overhead_ms, "graph_max_tokens": self.graph_max_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        """Tables from before the replay overhead was recorded load with none (their entries stay uncorrected)."""
        return cls(d["device"], dict(d["versions"]), {k: LatencyEntry(**e) for k, e in d["entries"].items()},
                   dict(d.get("skipped", {})), {k: RestLatency.from_dict(r) for k, r in d.get("rest", {}).items()},
                   float(d.get("replay_overhead_ms", 0.0)), int(d.get("graph_max_tokens", 0)))

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def use_paths(records: Iterable[dict[str, Any]]) -> None:
    """Install measured paths (`LatencyTable.measured_paths` records) in this process: for "triton" layers
    (`gpu_backends.use_measured`), and for W<b>A8 layers (`a8_linear.use_measured`, paths `a8_linear.PATHS`);
    a malformed record raises a ValueError naming it."""
    from .gpu_backends import use_measured
    for r in records:
        try:
            kind, (n, k), label, tokens, path = r["kind"], r["shape"], r["choice"], r["tokens"], r["path"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (n, k, tokens)):
                raise ValueError("shape and tokens must be integers >= 1")
            choice = Choice.parse(label)
            if choice.abits is None:
                use_measured(choice.spec_for(kind, k), (n, k), tokens, path)
            elif a8_linear.path_format(path) != choice.act_format:
                raise ValueError(f"path {path!r} runs {a8_linear.path_format(path)} activations, {label} "
                                 f"{choice.act_format} ones")
            else:
                a8_linear.use_measured((n, k), choice.wbits, tokens, path)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"measured path {r!r} is malformed: {e}") from None


def cache_path(cache_dir: str | Path, device: str | torch.device) -> Path:
    v = versions()
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name(device)}_torch{v['torch']}_triton{v['triton']}_{v['kernels']}")
    return Path(cache_dir) / f"latency_{slug}.json"


def conv_geometries(conv: Any, calls: int) -> list[dict[str, Any]] | None:
    """A conv layer's traced geometries as `LayerInfo.conv` holds them: one dict per distinct input geometry
    (`profilers.graph.conv_geometry`), each with the number of calls that ran it ("calls"). Graphs and plans written
    before a layer could have several geometries store one dict for all its calls; it becomes a one-item list."""
    if conv is None or isinstance(conv, list):
        return conv
    return [{**conv, "calls": conv.get("calls", calls)}]


def geometry_kind(kind: str, weight_shape: tuple[int, ...], conv: dict[str, Any] | None) -> str:
    """The kind latency entries are keyed by: the layer kind, with a conv's geometry appended, e.g.
    "conv2d(64x56x56,k3x3,s1x1,p1x1,d1x1,g1)": two convs with one weight matrix but other geometries run
    differently."""
    if conv is None:
        return kind
    dims = lambda v: v if isinstance(v, str) else "x".join(str(int(e)) for e in v)  # noqa: E731
    mode = "" if conv.get("padding_mode", "zeros") == "zeros" else f",{conv['padding_mode']}"
    return (f"{kind}({dims(conv['in_shape'])},k{dims(weight_shape[2:])},s{dims(conv['stride'])},"
            f"p{dims(conv['padding'])},d{dims(conv['dilation'])},g{int(conv['groups'])}{mode})")


def latency_calls(layer: Any) -> list[tuple[str, int]]:
    """(entry kind, calls) for each way one forward runs `layer` (a LayerInfo or LayerPlan): a conv once per traced
    geometry (a head shared across feature-map sizes runs at each), anything else `layer.calls` times at its kind.
    A layer's latency is the sum of calls x entry."""
    calls = getattr(layer, "calls", 1)
    convs = conv_geometries(getattr(layer, "conv", None), calls)
    if not convs:
        return [(layer.kind, calls)]
    return [(geometry_kind(layer.kind, layer.weight_shape, g), int(g["calls"])) for g in convs]


def forward_ms(figure: Callable[..., float], layer: Any, shape: tuple[int, int], choice: Choice | str,
               tokens: int) -> float:
    """What `layer` adds to one forward: sum over `latency_calls` of calls x `figure(shape, choice, tokens, kind)`
    (`LatencyTable.layer_ms` or `.lookup`)."""
    return sum(calls * figure(shape, choice, tokens, kind) for kind, calls in latency_calls(layer))


@dataclass(frozen=True)
class TimedLayer:
    """One distinct thing to time: the entry kind (`geometry_kind`), the layer kind, the weight matrix (out, in),
    and for convs of known geometry the weight shape and geometry. Plain data: a Ray task is sent a list of them."""

    key_kind: str
    kind: str
    shape: tuple[int, int]
    weight_shape: tuple[int, ...] | None = None
    conv: str | None = None  # the geometry as JSON (hashable)


def timed_layers(layers: Iterable) -> list[TimedLayer]:
    """Distinct layers to time (one per conv geometry) from (out, in) tuples, TimedLayers, LayerInfo-like objects
    (kind, out/in_features, and for convs weight_shape and conv) or a LayerGraph."""
    items = getattr(layers, "layers", layers)
    seen: dict[TimedLayer, None] = {}
    for it in items:
        if isinstance(it, TimedLayer):
            seen[it] = None
        elif hasattr(it, "out_features"):
            shape = (int(it.out_features), int(it.in_features))
            convs = conv_geometries(getattr(it, "conv", None), getattr(it, "calls", 1))
            if not convs:
                seen[TimedLayer(it.kind, it.kind, shape)] = None
            for g in convs or ():
                geometry = {k: v for k, v in g.items() if k != "calls"}
                seen[TimedLayer(geometry_kind(it.kind, it.weight_shape, g), it.kind, shape, tuple(it.weight_shape),
                            json.dumps(geometry, sort_keys=True))] = None
        else:
            n, k = it
            seen[TimedLayer("linear", "linear", (int(n), int(k)))] = None
    return list(seen)


def _conv_path(layer: TimedLayer, qt: QuantizedTensor, dtype: torch.dtype, device: torch.device):
    """(the QuantizedConv an emitted model would hold for `qt`, x -> its float64 reference output, the input
    shape per sample)."""
    g = json.loads(layer.conv)
    geo = (g["stride"], g["padding"], g["dilation"], g["groups"], g["padding_mode"])
    module = QuantizedConv(layer.kind, layer.weight_shape, qt.spec, False, dtype, *geo)
    module.set_quantized(qt, None)
    module = module.to(device)
    conv = torch.nn.functional.conv1d if layer.kind == "conv1d" else torch.nn.functional.conv2d
    w64 = qt.dequantize(torch.float64).view(layer.weight_shape)
    reference = torch.nn.Conv1d if layer.kind == "conv1d" else torch.nn.Conv2d

    @torch.no_grad()
    def ref(x: torch.Tensor) -> torch.Tensor:
        if g["padding_mode"] == "zeros":
            return conv(x.double().cpu(), w64, None, *geo[:4])
        m = reference(w64.shape[1] * g["groups"], w64.shape[0], tuple(w64.shape[2:]), *geo[:4], bias=False,
                      padding_mode=g["padding_mode"]).double()
        m.weight.data = w64
        return m(x.double().cpu())

    return module, ref, tuple(g["in_shape"])


def _registry_fn(b: Backend, qt: QuantizedTensor, device: torch.device) -> Callable:
    """x -> registry backend `b` run on `qt`'s buffers in b's layout on `device`, as a QuantizedLinear holds them."""
    qw = layer_view(qt, b, device)
    return lambda x: b.linear(x, qw)


def _cpu_candidates(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Callable]:
    dev = torch.device("cpu")
    return {b.name: _registry_fn(b, qt, dev) for b in BACKENDS.values() if b.supports(qt.spec, qt.shape, dev, dtype)}


def selected_backend(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device,
                     kernel: str | None = None) -> Backend | None:
    """The registry backend a QuantizedLinear holding `qt` dispatches to on `device`: for a library-kernel choice
    (`Choice.kernel`) the kernel's backend, or its fallback where it cannot run; None: none supports it."""
    if kernel is not None:
        return forced_backend(kernel, qt.spec, qt.shape, device, dtype)
    try:
        return select_backend(qt.spec, qt.shape, device, dtype)
    except RuntimeError:
        return None


def _records_selected(choice: Choice, kind: str) -> bool:
    """Whether an emitted layer of this kind and choice runs a registry backend (so its entry records which)."""
    return choice.abits is None and kind in ("linear", "hf_conv1d")


def _time_cpu(fn: Callable, x: torch.Tensor, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_layer(fn: Callable, x: torch.Tensor, reps: int, flush: torch.Tensor | None, tokens: int) -> float:
    """Median ms of one layer's fn(x) at `tokens` tokens as table entries are timed: on CUDA `time_cuda` (a graph
    replay up to GRAPH_MAX_TOKENS), on the CPU time.perf_counter."""
    if x.device.type == "cuda":
        return time_cuda(fn, x, reps, flush, graph=tokens <= GRAPH_MAX_TOKENS)
    return _time_cpu(fn, x, reps)


def time_replay_overhead(table: "LatencyTable", device: torch.device, reps: int, flush: torch.Tensor | None,
                         dtype: torch.dtype) -> None:
    """Time the table's replay overhead (`replay_overhead_ms`) once, on CUDA, where it is not yet timed: its
    graph-timed figures carry it (`LatencyTable.in_model_ms`)."""
    if device.type == "cuda" and table.replay_overhead_ms == 0.0:
        table.replay_overhead_ms = replay_overhead_ms(device, reps, flush, dtype)
        table.graph_max_tokens = GRAPH_MAX_TOKENS


@functools.cache
def capture_stream(device: int) -> torch.cuda.Stream:
    """The side stream `cuda_graph` warms up and captures on, one per device for the process: what a kernel
    allocates per stream on its first call (split-K's zeroed workspace, `triton_linear._workspace`) is then made by the
    eager warm-up, not inside a capture, where its memset would join the graph and every replay of it."""
    return torch.cuda.Stream(device)


def cuda_graph(run: Callable[[], Any]) -> Callable[[], None] | None:
    """`run` captured in a CUDA graph (after a warm-up on the same side stream, `capture_stream`), as its replay;
    None if it cannot be captured."""
    try:
        s = capture_stream(torch.cuda.current_device())
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            run()
        g.replay()
        return g.replay
    except Exception:  # noqa: BLE001 - a path that cannot be captured is timed eagerly
        torch.cuda.synchronize()
        return None


def time_cuda(fn: Callable, x: torch.Tensor, reps: int, flush: torch.Tensor, graph: bool = True) -> float:
    """Median ms of fn(x) over `reps` runs, each after an L2 flush, with CUDA events (graph replay if possible)."""
    for _ in range(3):
        fn(x)
    run = lambda: fn(x)  # noqa: E731
    replay = cuda_graph(run) if graph else None
    return time_events(replay or run, reps, flush)


def time_events(run: Callable[[], Any], reps: int, flush: torch.Tensor) -> float:
    """Median ms of `reps` calls of run(), each after an L2 flush (`flush_l2`), with CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush_l2(flush)
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def l2_flush_buffer(device: str | torch.device) -> torch.Tensor | None:
    """The buffer `flush_l2` reads to evict the L2 before each timing (L2_FLUSH_BYTES on `device`); None off
    CUDA, where timings do not flush."""
    dev = torch.device(device)
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=dev) if dev.type == "cuda" else None


def flush_l2(flush: torch.Tensor) -> None:
    """Evict the L2 by reading `flush` (L2_FLUSH_BYTES), leaving clean lines behind, as a model's weights do."""
    flush.sum()


def replay_overhead_ms(device: str | torch.device, reps: int = 50, flush: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None, chain: int = 16, trials: int = 5) -> float:
    """The fixed cost of one timed graph replay after an L2 flush (`time_cuda`), which every graph-timed entry
    carries and a whole-model graph pays once: the replay of one layer (a 1-token 2048x2048 linear) less what
    each further layer of a chain of `chain` adds, each with its own weight (8 MiB each, so every one is read
    from memory as in a model); the median of `trials` such estimates. Single estimates moved by up to 1 us
    between runs on an H200 (2.2-3.2 us), and 113 layers turn 1 us into 6% of a 1B Llama's decode. 0.0 off
    CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0.0
    flush = flush if flush is not None else l2_flush_buffer(dev)
    dtype = dtype or default_dtype(dev)
    weights = [torch.randn(2048, 2048, device=dev, dtype=dtype) for _ in range(chain)]
    x = torch.randn(1, 2048, device=dev, dtype=dtype)
    layers = [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights]
    estimates = []
    for _ in range(trials):
        one, further = chain_ms(layers, x, reps, flush)
        estimates.append(one - further)
    return max(statistics.median(estimates), 0.0)


def chain_ms(layers: list[Callable[[torch.Tensor], Any]], x: torch.Tensor, reps: int,
             flush: torch.Tensor) -> tuple[float, float]:
    """(ms of a timed replay of layers[0] alone, ms each further layer adds to one graph of them all): the replay
    of the chain (`time_cuda`, one L2 flush before it) less the replay of layers[0], over len(layers) - 1. Layers
    that each hold their own weight read it from memory, as a model's layers do; the second figure is then what a
    layer costs inside a model's graph, without the fixed cost of a replay."""
    one = time_cuda(layers[0], x, reps, flush)
    chain = time_cuda(lambda x: [f(x) for f in layers], x, reps, flush)
    return one, (chain - one) / (len(layers) - 1)


def _rel_error_to(y: torch.Tensor, ref: torch.Tensor) -> float:
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
    """(name -> fn, name -> reason skipped, tiles) for every path that runs `qt` under `choice` on `device`; on CUDA
    the registry backend an emitted QuantizedLinear selects is among them (under its registry name), and
    tiles(m) gives our fused kernel at the other tiles it tries for m token rows (`gpu_backends.tile_fns`)."""
    if choice.abits is not None:
        from . import gpu_activation_quant as gaq
        return (*gaq.candidates(qt, choice, dtype, device), _no_tiles)
    if choice.kernel is not None:  # the layer is held for that kernel: it runs nothing else
        held = selected_backend(qt, dtype, device, choice.kernel)
        return {held.name: _registry_fn(held, qt, device)}, {}, _no_tiles
    if device.type == "cuda":
        from .gpu_backends import gpu_candidates, tile_fns
        gw = repack_for_gpu(qt, "cuda")
        fns, skipped = gpu_candidates(qt, dtype, gw)
        selected = selected_backend(qt, dtype, device)
        if selected is not None and selected.name not in fns:
            fns[selected.name] = _registry_fn(selected, qt, device)
        return fns, skipped, lambda m: tile_fns(gw, m, dtype)
    return _cpu_candidates(qt, dtype), {}, _no_tiles


def _no_tiles(m: int) -> dict[str, Callable]:
    return {}


def measure(layers: Iterable, choices: Iterable[Choice | str], tokens: Iterable[int] = (1, 16, 512),
            device: str | torch.device = "cuda", dtype: torch.dtype | None = None, reps: int | None = None,
            cache_dir: str | Path | None = None, seed: int = 0, tiles: bool = True) -> LatencyTable:
    """Time every distinct (layer shape, choice, tokens); see the module docstring. tiles=False times our fused
    kernel at its default tile only (a faster table; emitted models then run the default tiles)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available; use device='cpu'")
    dtype = dtype or default_dtype(dev)
    reps = reps or (50 if dev.type == "cuda" else 5)
    choices = [Choice.parse(c) if isinstance(c, str) else c for c in choices]
    path = cache_path(cache_dir, dev) if cache_dir is not None else None
    table = LatencyTable.load(path) if path is not None and path.exists() else LatencyTable(device_name(dev), versions())
    flush = l2_flush_buffer(dev)
    gen = torch.Generator().manual_seed(seed)
    time_replay_overhead(table, dev, reps, flush, dtype)
    for choice in choices:
        reason = unsupported_reason(choice, dev)
        if reason is not None:
            table.skipped[choice.label] = reason
            continue
        for layer in timed_layers(layers):
            kind, shape = layer.key_kind, layer.shape
            if choice.kernel_reason(layer.kind, shape) is not None:  # no such layer (`Problem` leaves the choice out)
                continue
            wants_selected = layer.conv is None and _records_selected(choice, layer.kind)
            todo = [t for t in tokens if (e := table.entries.get(entry_key(shape, choice, t, kind))) is None
                    or (wants_selected and e.selected is None)]
            if not todo:
                continue
            qt = quantize(torch.randn(*shape, generator=gen), choice.spec_for(layer.kind, shape[1]),
                          clip_search=False)
            if layer.conv is not None:  # the QuantizedConv an emitted model holds, on inputs of the traced geometry
                module, ref, per_sample = _conv_path(layer, qt, dtype, dev)
                fns, skipped, tile_paths, selected, weight_only = {"quantized_conv": module}, {}, _no_tiles, None, None
            else:  # convs run activation-quantized choices weight-only
                runs = choice if layer.kind in ACT_QUANT_KINDS else replace(choice, abits=None, act_format="int")
                fns, skipped, tile_paths = candidates(qt, runs, dtype, dev)
                tile_paths = tile_paths if tiles else _no_tiles
                selected = selected_backend(qt, dtype, dev, choice.kernel) if wants_selected else None
                # the rounded-x W<b>A8 paths run the weight-only kernel: it is measured and installed first
                weight_only = (candidates(qt, Choice(qt.spec.bits, None, None), dtype, dev)
                               if tiles and {"a8_rounded_x", "f8_rounded_x"} & set(fns) else None)
                w64 = qt.dequantize(torch.float64).t()
                ref, per_sample = (lambda x: x.double().cpu() @ w64), (shape[1],)
            act_quantized = choice.abits is not None and layer.kind in ACT_QUANT_KINDS
            tol = ACT_QUANT_TOLERANCE if act_quantized else TOLERANCE[dtype]
            for t in todo:
                x = torch.randn(t, *per_sample, generator=gen).to(dev, dtype)
                expected = ref(x)
                paths = {**fns, **tile_paths(t)}
                last = paths.pop(selected.name) if selected is not None and selected.name in paths else None
                if weight_only is not None:
                    _install_weight_only(weight_only, qt, dtype, x, expected, reps, flush, t)
                ms, rejected = _time_paths(paths, x, expected, tol, reps, flush, t, dict(skipped))
                if selected is not None and dev.type == "cuda":
                    _use_measured(qt.spec, shape, t, ms)
                elif dev.type == "cuda" and (a8 := _fastest_a8(ms)) is not None:
                    a8_linear.use_measured(shape, choice.wbits, t, a8)
                if last is not None:  # after the winners are installed: the path an emitted model runs
                    ms.update(_time_paths({selected.name: last}, x, expected, tol, reps, flush, t, rejected)[0])
                if not ms:
                    raise RuntimeError(f"no correct path for {entry_key(shape, choice, t, kind)}: {rejected}")
                best = min(ms, key=ms.get)
                table.entries[entry_key(shape, choice, t, kind)] = LatencyEntry(
                    ms[best], best, ms, rejected, None if selected is None else selected.name)
            if path is not None:
                table.save(path)
    if path is not None:
        table.save(path)
    if dev.type == "cuda":
        table.use_dispatch()
    return table


def _time_paths(fns: dict[str, Callable], x: torch.Tensor, expected: torch.Tensor, tol: float, reps: int,
                flush: torch.Tensor | None, tokens: int, rejected: dict[str, str]) -> tuple[dict[str, float],
                                                                                       dict[str, str]]:
    """Median ms of each path within `tol` of `expected` (float64); the others go into `rejected` with why."""
    ms = {}
    for name, fn in fns.items():
        try:
            err = _rel_error_to(fn(x), expected)
        except Exception as e:  # noqa: BLE001 - a failing path is reported, not fatal
            rejected[name] = f"{type(e).__name__}: {e}"[:300]
            continue
        if err > tol:
            rejected[name] = f"relative error {err:.2e} over tolerance"
            continue
        ms[name] = time_layer(fn, x, reps, flush, tokens)
    return ms, rejected


def _fastest_ours(ms: dict[str, float]) -> str | None:
    """The fastest of our paths (`gpu_backends.is_ours`) among measured ones; None when none is ours."""
    from .gpu_backends import is_ours
    ours = [name for name in ms if is_ours(name)]
    return min(ours, key=ms.get) if ours else None


def _install_weight_only(weight_only: tuple, qt: QuantizedTensor, dtype: torch.dtype, x: torch.Tensor,
                         expected: torch.Tensor, reps: int, flush: torch.Tensor | None, tokens: int) -> None:
    """Time our weight-only paths and tiles on `qt` (`weight_only`: its `candidates` as a weight-only choice) and
    install the fastest (`_use_measured`): the kernel the rounded-x path of a W<b>A8 entry then runs, as the
    emitted layer will."""
    from .gpu_backends import is_ours
    fns, _, tile_paths = weight_only
    ours = {name: fn for name, fn in {**fns, **tile_paths(tokens)}.items() if is_ours(name)}
    _use_measured(qt.spec, qt.shape, tokens, _time_paths(ours, x, expected, TOLERANCE[dtype], reps, flush, tokens, {})[0])


def _fastest_a8(ms: dict[str, float]) -> str | None:
    """The fastest W<b>A8 path (`a8_linear.ALL_PATHS`) among measured ones; None when none is one."""
    a8 = [name for name in ms if name in a8_linear.ALL_PATHS]
    return min(a8, key=ms.get) if a8 else None


def _use_measured(spec: QuantSpec, shape: tuple[int, int], tokens: int, ms: dict[str, float]) -> None:
    """Install the fastest of our measured paths (`gpu_backends.use_measured`)."""
    from .gpu_backends import use_measured
    path = _fastest_ours(ms)
    if path is not None:
        use_measured(spec, shape, tokens, path)
