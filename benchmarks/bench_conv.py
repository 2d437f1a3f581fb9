"""What the latency table says about convolutions: each conv of a ResNet-50-like stage measured by
`kernels.latency.measure` as the QuantizedConv an emitted model holds (pointwise over few rows: the linear
kernels; else dequantize + conv, a storage-only saving), next to the float conv timed the same way (L2 flushed,
graph replay on CUDA). Prints one row per (layer, samples), with the backend the module reports it ran ("dequant":
dequantize + conv, or for a 1x1 conv on the CPU in float32 the linear "dequant" backend), and writes conv.json
under --out.

    python3 benchmarks/bench_conv.py --device cuda --out out/conv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize_module  # noqa: E402
from kernels.latency import (_time_cpu, default_dtype, device_name, entry_key, l2_flush_buffer,  # noqa: E402
                             latency_calls, measure, time_cuda)
from profilers import build_layer_graph  # noqa: E402

CHOICES = ["w4", "w8"]


def stage(width: int = 64, size: int = 56) -> tuple[nn.Module, torch.Tensor]:
    """A bottleneck of ResNet-50's first stage plus a strided 3x3: 1x1 reduce, 3x3, 1x1 expand, 3x3 stride 2."""
    net = nn.Sequential(nn.Conv2d(4 * width, width, 1, bias=False), nn.ReLU(),
                        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(width, 4 * width, 1, bias=False), nn.ReLU(),
                        nn.Conv2d(4 * width, 4 * width, 3, stride=2, padding=1, bias=False))
    return net, torch.randn(1, 4 * width, size, size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="out/conv")
    ap.add_argument("--samples", default="1,8,32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--size", type=int, default=56, help="input height and width")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = default_dtype(dev)
    samples = [int(s) for s in a.samples.split(",")]
    net, x = stage(size=a.size)
    graph = build_layer_graph(net, x)
    table = measure(graph, CHOICES, tokens=samples, device=dev, reps=a.reps)
    net = net.to(dev, dtype)
    flush = l2_flush_buffer(dev)
    rows = []
    name = device_name(dev)
    print(f"{name}, {dtype}; us per forward of one layer, median of {a.reps}")
    print(f"{'layer':<48} {'samples':>7} {'float':>9} " + " ".join(f"{c:>9}" for c in CHOICES) + "  path")
    for layer in graph.layers:
        module = dict(net.named_modules())[layer.name]
        for t in samples:
            xs = torch.randn(t, *layer.conv[0]["in_shape"], device=dev, dtype=dtype)
            with torch.no_grad():
                float_ms = (time_cuda(module, xs, a.reps, flush) if dev.type == "cuda"
                            else _time_cpu(module, xs, a.reps))
            shape, ((kind, _),) = (layer.out_features, layer.in_features), latency_calls(layer)
            ms = {c: table.entries[entry_key(shape, c, t, kind)].ms for c in CHOICES}
            quantized = quantize_module(module, QuantSpec(4, 128), clip_search=False)
            with torch.no_grad():
                quantized(xs)
            path = f"{'1x1' if quantized.pointwise else 'conv'} {quantized.backend}"
            rows.append({"layer": kind, "samples": t, "float_ms": float_ms, **{f"{c}_ms": v for c, v in ms.items()},
                         "path": path})
            print(f"{kind:<48} {t:>7} {float_ms * 1e3:>9.1f} " + " ".join(f"{ms[c] * 1e3:>9.1f}" for c in CHOICES)
                  + f"  {path}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conv.json").write_text(json.dumps({"device": name, "dtype": str(dtype), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
