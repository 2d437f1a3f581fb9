"""Offline instruction counts (sm_90a SASS, no GPU needed): the tensor-core decode kernel
(`triton_linear._gemv_mma_kernel`, 1 token, symmetric, group 128) against a Gluon sketch of the same loop that
loads the words straight into mma_v2's A-operand registers (`DotOperandLayout(0, mma, k_width=1)` for int32 pairs
is the bf16 operand's layout, checked with `convert_layout(..., assert_trivial=True)`), so the weights never pass
through shared memory. The sketch is for planning the next kernel: it leaves out split-K, edge masks, zero points,
two-plane widths, and subtracts the x-side offsets once per program instead of once per block. It is not run.

    python3 benchmarks/probe_gluon_decode.py   # needs triton >= 3.6 (Gluon) and its bundled cuobjdump
"""
from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import triton_linear as tlin  # noqa: E402


@gluon.jit
def _pairs(ww, f: gl.constexpr, W: gl.constexpr):
    return gl.inline_asm_elementwise(tlin._pair_asm(f, W, 0), "=r,r,r", [ww], dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def gl_decode(x, p0, s, out, M, N, K, KW, G, stride_sg, stride_sn, rows_per_split, stride_xm,
              PER: gl.constexpr, W0: gl.constexpr, ZERO: gl.constexpr, RUN: gl.constexpr, BN: gl.constexpr,
              NC: gl.constexpr, NCR: gl.constexpr, WARPS: gl.constexpr):
    HALF: gl.constexpr = PER // 2
    NR: gl.constexpr = HALF // RUN
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=1)
    x_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, NCR], threads_per_warp=[32, 1], warps_per_cta=[WARPS, 1],
                                         order=[1, 0])
    sh_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, w_l))
    j16 = gl.arange(0, 16, layout=gl.SliceLayout(0, w_l))
    rows = gl.arange(0, 32 * HALF, layout=gl.SliceLayout(1, x_l))
    f = rows // 32
    jj = (rows % 32) // 2
    h = rows % 2
    col = gl.arange(0, NCR, layout=gl.SliceLayout(0, x_l))
    tok = col // (2 * NR)
    hc = col % 2
    rc = (col // 2) % NR
    shift = gl.exp2(-((f % ((7 - W0) // W0 + 1)) * W0).to(gl.float32))
    xmask = (h[:, None] == hc[None, :]) & ((f // RUN)[:, None] == rc[None, :]) & (tok < M)[None, :]
    on = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    oc = gl.arange(0, NC, layout=gl.SliceLayout(0, mma))
    z_l: gl.constexpr = gl.BlockedLayout([1, NC], [32, 1], [WARPS, 1], [1, 0])
    bs = gl.allocate_shared_memory(gl.bfloat16, [32 * HALF, NC], sh_l, gl.zeros([32 * HALF, NC], gl.bfloat16, z_l))
    total = gl.zeros([BN, NC], gl.float32, layout=mma)
    offs = gl.zeros([NCR], gl.float32, layout=gl.SliceLayout(0, x_l))
    r_lo = pid_k * rows_per_split
    r_hi = gl.minimum(r_lo + rows_per_split, KW)
    for r0 in range(r_lo, r_hi, 16):
        words = gl.load(p0 + (r0 + j16)[None, :] * N + n[:, None])
        ww = gl.join(words, words)
        c = r0 * PER + 16 * (h * HALF + f) + jj
        xt = gl.load(x + tok[None, :] * stride_xm + c[:, None], mask=xmask, other=0.0).to(gl.float32)
        b = xt * shift[:, None]
        off = gl.sum(b * 128.0 + xt * ZERO, axis=0)
        gl.thread_barrier()
        bs.slice(0, NCR, dim=1).store(b.to(gl.bfloat16))
        gl.thread_barrier()
        acc = gl.zeros([BN, NC], gl.float32, layout=mma)
        for fi in gl.static_range(HALF):
            a = gl.convert_layout(gl.reshape(_pairs(ww, fi, W0), [BN, 32]), a_l, assert_trivial=True)
            acc = mma_v2(a, bs.slice(32 * fi, 32, dim=0).load(b_l), acc)
        g0 = r0 * PER + 16 * (oc % 2 * HALF + (oc // 2) % NR * RUN)
        sc = gl.load(s + (g0 // G)[None, :] * stride_sg + on[:, None] * stride_sn).to(gl.float32)
        total += acc * sc
        offs += off
    res = gl.sum(total, axis=1)[:, None] + gl.zeros([BN, NC], gl.float32, layout=mma)
    gl.store(out + oc[None, :] * 0 + on[:, None], res)
    gl.store(out + N + col, offs)



def sass(kernel, tmp: Path) -> tuple[int, collections.Counter, dict[str, int]]:
    """(SASS instruction count, opcode histogram, shared-memory traffic in the PTX) of a compiled kernel."""
    cubin = tmp / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ins = [line.split(";")[0].split("*/")[-1].strip() for line in text.splitlines()
           if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    ops = collections.Counter((i.split()[1] if i.startswith("@") else i.split()[0]).split(".")[0] for i in ins if i)
    ptx = kernel.asm["ptx"]
    return len(ins), ops, {k: ptx.count(k) for k in ("st.shared", "ldmatrix", "bar.sync")}


def compile_pair(bits: int, bn: int, warps: int):
    """The Triton kernel and the Gluon sketch for `bits`-bit weights, `bn` columns, `warps` warps."""
    per = 32 // bits
    run = math.gcd(per // 2, 128 // 16)
    ncr = 2 * (per // 2 // run)
    target = GPUTarget("cuda", 90, 32)
    common = dict(x="*bf16", p0="*i32", s="*bf16", out="*bf16")
    ints = ["M", "N", "K", "KW", "G", "stride_sg", "stride_sn", "rows_per_split", "stride_xm"]
    sig = dict(common, **{k: "i32" for k in ints})
    cons = dict(PER=per, W0=bits, ZERO=float(1 << (bits - 1)), RUN=run, BN=bn, NC=max(8, ncr), NCR=ncr, WARPS=warps)
    names = list(sig) + list(cons)
    div = {(names.index(d),): [["tt.divisibility", 16]] for d in ("x", "p0", "s", "out", "N", "stride_sg", "stride_xm")}
    glk = triton.compile(gluon._runtime.GluonASTSource(gl_decode, dict(sig, **{c: "constexpr" for c in cons}),
                                                       constexprs=cons, attrs=div),
                         target=target, options=dict(num_warps=warps))
    tsig = dict(x="*bf16", p0="*i32", p1="*i32", s="*bf16", z="*bf16", out="*bf16", ws="*fp32", cnt="*i32",
                **{k: "i32" for k in ("M", "N", "K", "KW", "G", "stride_sg", "stride_sn", "rows_per_split", "SPLIT",
                                      "stride_xm", "stride_om")})
    tcons = dict(PER=per, W0=bits, W1=0, ZERO=float(1 << (bits - 1)), HAS_Z=False, ATOMIC=True, RUN=run,
                 EVEN_K=True, ASM=True, BN=bn, NC=ncr)
    tnames = list(tsig) + list(tcons)
    tdiv = {(tnames.index(d),): [["tt.divisibility", 16]]
            for d in ("x", "p0", "p1", "s", "z", "out", "ws", "cnt", "N", "stride_sn", "stride_xm", "stride_om")}
    tk = triton.compile(ASTSource(tlin._gemv_mma_kernel, dict(tsig, **{c: "constexpr" for c in tcons}),
                                  constexprs=tcons, attrs=tdiv),
                        target=target, options=dict(num_warps=warps, num_stages=1))
    return tk, glk


def main() -> None:
    print("bits  columns  warps  codes/thread  Triton SASS (per code)  Gluon SASS (per code)  shared memory "
          "(Triton | Gluon)")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, bn, warps in [(2, 128, 2), (2, 256, 4), (4, 128, 2), (4, 256, 4)]:
            tk, glk = compile_pair(bits, bn, warps)
            codes = bn * 16 * (32 // bits) // (32 * warps)
            (nt, _, st), (ng, _, sg) = sass(tk, Path(tmp)), sass(glk, Path(tmp))
            print(f"{bits:>4}  {bn:>7}  {warps:>5}  {codes:>12}  {nt:>11} ({nt / codes:.2f})  "
                  f"{ng:>10} ({ng / codes:.2f})  {st} | {sg}")


if __name__ == "__main__":
    main()
