"""CPU time of each quantized-linear backend vs float F.linear, per bit width.

    python benchmarks/bench_kernels_cpu.py [--dtype float32 bfloat16] [--min-time 0.5]

Prints a markdown table per activation dtype: shape, spec, backend, median time per call (bias-free
layer, torch.utils.benchmark), the ratio to F.linear on the float weight in the same dtype (lower is
faster) and whether the dispatch picks that backend by default.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import BACKENDS, QuantSpec, quantize_module, select_backend  # noqa: E402

SHAPES = [(1, 1024, 1024), (64, 4096, 1024)]  # (M rows of x, N out features, K in features)
SPECS = [QuantSpec(b, 128) for b in (2, 3, 4, 5, 6)] + [QuantSpec(4, None), QuantSpec(8, None), QuantSpec(8, 128)]


def median_seconds(fn, min_time: float) -> float:
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def bench(dtype: torch.dtype, min_time: float) -> None:
    print(f"\n### activations {str(dtype).removeprefix('torch.')}\n")
    print("| M | N x K | spec | backend | time (us) | vs F.linear | picked |")
    print("|---|---|---|---|---|---|---|")
    for m, n, k in SHAPES:
        layer = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(m, k, dtype=dtype)
        w = layer.weight.detach().to(dtype)
        base = median_seconds(lambda: F.linear(x, w), min_time)
        print(f"| {m} | {n} x {k} | float | F.linear | {base * 1e6:.0f} | 1.00 | |")
        for spec in SPECS:
            label = f"w{spec.bits}{'gc' if spec.group_size is None else f'g{spec.group_size}'}"
            picked = select_backend(spec, (n, k), x.device, dtype).name
            for name, backend in BACKENDS.items():
                if not backend.supports(spec, (n, k), x.device, dtype):
                    continue
                q = quantize_module(layer, spec, clip_search=False, backend=name)
                q(x)  # settle the backend's layout
                t = median_seconds(lambda: q(x), min_time)
                print(f"| {m} | {n} x {k} | {label} | {name} | {t * 1e6:.0f} | {t / base:.2f} | {'yes' if name == picked else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    with torch.inference_mode():
        for name in args.dtype:
            bench(getattr(torch, name), args.min_time)


if __name__ == "__main__":
    main()
