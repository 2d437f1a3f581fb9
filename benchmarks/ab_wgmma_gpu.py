"""A/B of the wgmma prefill in one run: the kernel of another commit (copied first to kernels/gluon_wgmma_old.py,
e.g. `git show main:kernels/gluon_wgmma.py > kernels/gluon_wgmma_old.py`) against this tree's, on the same weights
and x, each checked against float64 three times with its output poisoned with NaN first (dropped above 5e-3
relative error) and timed with the L2 flushed before each call. Prints the best tile of each side per case and
writes ab_wgmma.json to --out after each case (a run cut short keeps what it measured).
    python benchmarks/ab_wgmma_gpu.py --out $OUT --plan '[[8192, 8192, 512, [4, 3], ["256:4:3", "256:8:4"]]]'
A plan entry: [N, K, tokens, [bits], [tile block_m:num_warps:stages[:split_k], ...]].
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import gluon_wgmma  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import l2_flush_buffer, time_cuda  # noqa: E402
from bench_kernels_gpu import poisoned, rel_err  # noqa: E402  (this directory is on sys.path when run as a script)

PLAN = [[8192, 8192, 512, [4, 3, 2, 8], ["256:4:3", "256:8:4"]],
        [28672, 8192, 512, [4, 8], ["256:4:3:2", "256:8:4:2"]],
        [8192, 8192, 320, [4], ["256:4:3"]],
        [4096, 14336, 512, [4], ["256:4:3:2", "256:8:4:2"]],
        [14336, 4096, 512, [6, 5], ["256:4:3"]],
        [4096, 4096, 512, [4], ["256:4:3:2"]],
        [8192, 8192, 128, [4], ["128:8:4:2"]]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--plan", default=json.dumps(PLAN))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from kernels import gluon_wgmma_old
    sides = {"old": gluon_wgmma_old.linear, "new": gluon_wgmma.linear}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flush = l2_flush_buffer("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}", flush=True)
    rows = []
    for n, k, m, bits_list, tiles in json.loads(args.plan):
        w = torch.randn(n, k, device="cuda", generator=gen)
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        w_bf16 = w.to(torch.bfloat16)
        bf16 = time_cuda(lambda x: F.linear(x, w_bf16), x, args.reps, flush) * 1e3
        for bits in bits_list:
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            ref = x.double() @ qt.dequantize(torch.float64).t()
            us, best = {}, {}
            for tile in tiles:
                t = tuple(int(v) for v in (tile + ":1").split(":")[:4])
                for side, linear in sides.items():
                    fn = lambda x, linear=linear, t=t: linear(x, gw, *t)  # noqa: E731
                    label = f"{side} m{t[0]}w{t[1]}p{t[2]}" + (f"s{t[3]}" if t[3] > 1 else "")
                    try:
                        err = max(rel_err(poisoned(fn, x, ref.numel()), ref) for _ in range(3))
                    except Exception as ex:  # noqa: BLE001 - reported
                        us[label] = f"{type(ex).__name__}: {str(ex)[:200]}"
                        continue
                    if err > 5e-3:
                        us[label] = f"rel err {err:.2e}"
                        continue
                    us[label] = time_cuda(fn, x, args.reps, flush) * 1e3
                    if us[label] < best.get(side, (float("inf"),))[0]:
                        best[side] = (us[label], label.split()[1])
            print(f"{n}x{k} {bits}-bit {m} tokens: bf16 {bf16:.1f} us; " + "; ".join(
                f"{side} {b[0]:.1f} ({b[1]}, {bf16 / b[0]:.2f}x bf16)" for side, b in best.items()), flush=True)
            print("    " + ", ".join(f"{lbl} {v:.1f}" if isinstance(v, float) else f"{lbl}: {v}"
                                     for lbl, v in us.items()), flush=True)
            rows.append(dict(shape=[n, k], tokens=m, bits=bits, bf16_us=bf16, us=us))
            (out / "ab_wgmma.json").write_text(json.dumps(dict(device=dev, torch=torch.__version__, rows=rows),
                                                          indent=1))


if __name__ == "__main__":
    main()
