"""CPU time of each quantized-linear backend vs float F.linear, per bit width; and of pointwise convolutions.

    python benchmarks/bench_kernels_cpu.py [--dtype float32 bfloat16] [--threads N] [--rounds 5]

Prints a markdown table per activation dtype: shape, spec, backend, time per call of a bias-free layer,
the ratio to F.linear on the float weight in the same dtype (lower is faster) and whether the dispatch
picks that backend by default. Each backend is timed in rounds alternating with the F.linear baseline
and the fastest round of each is kept, so load from other processes distorts the ratio less. The last table
times 1x1 convolutions of ResNet-50 bottleneck shapes (batch 1): the quantized layer (which runs them on the
linear backends) vs F.conv2d on the float weight, both in the activation dtype.
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


def round_seconds(fn, min_time: float) -> float:
    """Mean seconds per call over one timing block of about `min_time` seconds."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).mean


def paired_seconds(fn, base, rounds: int, min_time: float) -> tuple[float, float]:
    """Fastest round of `fn` and of `base`, measured alternately."""
    t, b = [], []
    for _ in range(rounds):
        t.append(round_seconds(fn, min_time))
        b.append(round_seconds(base, min_time))
    return min(t), min(b)


def bench(dtype: torch.dtype, rounds: int, min_time: float) -> None:
    print(f"\n### activations {str(dtype).removeprefix('torch.')}\n")
    print("| M | N x K | spec | backend | time (us) | F.linear (us) | vs F.linear | picked |")
    print("|---|---|---|---|---|---|---|---|")
    for m, n, k in SHAPES:
        layer = torch.nn.Linear(k, n, bias=False)
        x = torch.randn(m, k, dtype=dtype)
        w = layer.weight.detach().to(dtype)
        for spec in SPECS:
            label = f"w{spec.bits}{'gc' if spec.group_size is None else f'g{spec.group_size}'}"
            picked = select_backend(spec, (n, k), x.device, dtype).name
            for name, backend in BACKENDS.items():
                if not backend.supports(spec, (n, k), x.device, dtype):
                    continue
                q = quantize_module(layer, spec, clip_search=False, backend=name)
                q(x)  # settle the backend's layout
                t, base = paired_seconds(lambda: q(x), lambda: F.linear(x, w), rounds, min_time)
                print(f"| {m} | {n} x {k} | {label} | {name} | {t * 1e6:.0f} | {base * 1e6:.0f} | {t / base:.2f} | "
                      f"{'yes' if name == picked else ''} |", flush=True)


CONVS = [(256, 1024, 28), (1024, 256, 14), (512, 2048, 7)]  # (in channels, out channels, height = width)


def bench_pointwise(dtype: torch.dtype, rounds: int, min_time: float) -> None:
    print(f"\n### 1x1 convolutions, activations {str(dtype).removeprefix('torch.')}\n")
    print("| in -> out | H x W | spec | backend | time (us) | F.conv2d (us) | vs F.conv2d |")
    print("|---|---|---|---|---|---|---|")
    for cin, cout, hw in CONVS:
        conv = torch.nn.Conv2d(cin, cout, 1, bias=False)
        x = torch.randn(1, cin, hw, hw, dtype=dtype)
        w = conv.weight.detach().to(dtype)
        for spec in (QuantSpec(8, None), QuantSpec(4, 32)):
            q = quantize_module(conv, spec, clip_search=False)
            q(x)  # settle the backend's layout
            t, base = paired_seconds(lambda: q(x), lambda: F.conv2d(x, w), rounds, min_time)
            print(f"| {cin} -> {cout} | {hw} x {hw} | w{spec.bits}{'gc' if spec.group_size is None else 'g32'} | "
                  f"{q.backend} | {t * 1e6:.0f} | {base * 1e6:.0f} | {t / base:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per backend (fastest kept)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per timing round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    with torch.inference_mode():
        for name in args.dtype:
            bench(getattr(torch, name), args.rounds, args.min_time)
        for name in args.dtype:
            bench_pointwise(getattr(torch, name), args.rounds, args.min_time)


if __name__ == "__main__":
    main()
