"""CPU time of each quantized-linear backend vs float F.linear, per bit width.

    python benchmarks/bench_kernels_cpu.py [--dtype float32|bfloat16] [--min-time 0.5]

Prints a markdown table: shape, spec, backend, median time per call, and the ratio to F.linear on the
float weight (lower is faster; > 1 means slower than float).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import BACKENDS, QuantSpec, quantize_module  # noqa: E402

SHAPES = [(1, 1024, 1024), (64, 4096, 1024)]  # (M rows of x, N out features, K in features)
SPECS = [QuantSpec(b, 128) for b in (2, 3, 4, 5, 6)] + [QuantSpec(4, None), QuantSpec(8, None), QuantSpec(8, 128)]


def median_seconds(fn, min_time: float) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, activations {args.dtype}\n")
    print("| M | N x K | spec | backend | time (us) | vs F.linear |")
    print("|---|---|---|---|---|---|")
    for m, n, k in SHAPES:
        layer = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(m, k, dtype=dtype)
        w = layer.weight.detach().to(dtype)
        with torch.inference_mode():
            base = median_seconds(lambda: F.linear(x, w), args.min_time)
            print(f"| {m} | {n} x {k} | float | F.linear | {base * 1e6:.0f} | 1.00 |")
            for spec in SPECS:
                label = f"w{spec.bits}{'gc' if spec.group_size is None else f'g{spec.group_size}'}"
                for name, backend in BACKENDS.items():
                    if not backend.supports(spec, (n, k), x.device, dtype):
                        continue
                    q = quantize_module(layer, spec, clip_search=False, backend=name)
                    q(x)  # settle the backend's layout
                    t = median_seconds(lambda: q(x), args.min_time)
                    print(f"| {m} | {n} x {k} | {label} | {name} | {t * 1e6:.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
