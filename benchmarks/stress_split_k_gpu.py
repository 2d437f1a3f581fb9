"""Split-K race check: each split-K tile of our decodes called many times against float64 (one GPU, one run).

Every split-K kernel ends in `triton_linear._finish` (or its Gluon twin): atomic adds of the tile into a
workspace, a CTA barrier, an acq_rel counter, and the last K-slice to arrive stores the sum. A call that sums a
tile wrong shows as a relative error far above the kernel's rounding. The tiles are those a latency table tries
(`tile_candidates`) with more than one K-slice, plus session 21's pipelined split-K GEMM tiles; with
--pipelined-part-blocks, `triton_linear`'s workaround (such tiles run unpipelined on a part block of rows) is
switched off, to see whether the race is still there. Writes split_k.json under --out.
    python benchmarks/stress_split_k_gpu.py --out $OUT [--calls 24] [--bits 4,8] [--tokens 1,4] [--pipelined-part-blocks]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402

# session 21's pipelined split-K GEMM tiles that summed a part block of rows wrong (4 tokens)
GEMM_TILES = (tlin.Config(16, 64, 2, 4, 4), tlin.Config(16, 128, 2, 4, 3), tlin.Config(16, 64, 3, 4, 2))


def run_variant(args: argparse.Namespace) -> dict:
    tlin.PART_BLOCK_UNPIPELINED = not args.pipelined_part_blocks
    gen = torch.Generator(device="cuda").manual_seed(25)
    w = torch.randn(28672, 8192, device="cuda", generator=gen)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
        gw = repack_for_gpu(qt, "cuda")
        w64 = qt.dequantize(torch.float64).t()
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, 8192, device="cuda", generator=gen).bfloat16()
            ref = x.double() @ w64
            tiles = [c for c in tlin.tile_candidates(m, gw) if c.split_k > 1]
            tiles += [c for c in GEMM_TILES if m > 1 and c not in tiles]
            for cfg in tiles:
                try:
                    errs = [float((tlin.linear(x, gw, cfg).double() - ref).norm() / ref.norm())
                            for _ in range(args.calls)]
                except Exception as e:  # noqa: BLE001 - a tile this device cannot run is reported
                    print(f"w{bits} M={m} {cfg.label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                floor = min(errs)
                wrong = sum(e > max(4 * floor, 1e-3) for e in errs)
                rows.append(dict(bits=bits, tokens=m, tile=cfg.label, calls=len(errs), wrong=wrong, min_err=floor,
                                 max_err=max(errs)))
                print(f"w{bits} M={m} {cfg.label}: {wrong}/{len(errs)} wrong (rel err {floor:.1e}..{max(errs):.1e})",
                      flush=True)
        del qt, gw, w64
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), pipelined_part_blocks=args.pipelined_part_blocks, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--pipelined-part-blocks", action="store_true",
                    help="switch off the workaround that runs split-K GEMM tiles on a part block of rows unpipelined")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split_k.json").write_text(json.dumps(run_variant(args), indent=1))


if __name__ == "__main__":
    main()
