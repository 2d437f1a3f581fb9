"""Run the decode kernels once each between cudaProfilerStart/Stop, for Nsight Compute to profile, at --tokens
rows (1 by default). Each tile is checked against float64 first (and compiled outside the profiled range). Config
labels ending in H are the wgmma prefill (e.g. 3:m256n64s1w4p3H at --tokens 512, `-k regex:wgmma`). Session 16's
profile (docs/gpu_runs/ncu_decode_session16_h200.txt) came from the command below; `-k regex:gemv` also matches the
int8 tensor-core decode (`_gemv_imma_kernel`, Config labels ending in I, e.g. 2:m1n128s16w4p1I)

    ncu --profile-from-start off -k regex:gemv --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats \
        --section MemoryWorkloadAnalysis --section LaunchStats --metrics sass__inst_executed_per_opcode,\
    smsp__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,smsp__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active \
        --print-metric-instances values python3 benchmarks/profile_decode_gpu.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import flush_l2, l2_flush_buffer  # noqa: E402
from bench_kernels_gpu import rel_err  # noqa: E402  (this directory is on sys.path when run as a script)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--tiles", default="4:m1n512s38w4p1,4:m1n256s10w4p1TG,2:m1n128s10w4p1TG,8:m1n256s10w2p1",
                    help="bits:Config label, comma-separated")
    ap.add_argument("--tokens", type=int, default=1)
    a = ap.parse_args()
    n, k = map(int, a.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen)
    x = torch.randn(a.tokens, k, device="cuda", generator=gen).bfloat16()
    flush = l2_flush_buffer("cuda")
    runs = []
    for item in a.tiles.split(","):
        bits, label = item.split(":")
        qt = quantize(w, QuantSpec(int(bits), 128, True, "bfloat16"), clip_search=False)
        gw = repack_for_gpu(qt, "cuda")
        cfg = tlin.Config.parse(label)
        ref = x.double() @ qt.dequantize(torch.float64).t()
        err = rel_err(tlin.linear(x, gw, cfg), ref)
        print(f"{bits}-bit {label}: rel err {err:.2e}", flush=True)
        runs.append((gw, cfg))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for gw, cfg in runs:
        flush_l2(flush)
        tlin.linear(x, gw, cfg)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
