"""Compile the one-token decode kernels (and the wgmma prefill) for sm_90a without a GPU and read their SASS.

For each (kernel, bits, tile): registers, stack (spills), and the instructions of the K loop (the innermost
backward branch of the SASS) per plane-0 word a thread handles in one K block, with the loop's most frequent
opcodes. For the wgmma prefill (`--kernels wgmma`, each tile of `gluon_wgmma.TILES`): registers, stack, the
`HGMMA`s and `WARPGROUP.DEPBAR`s, and every instruction that writes a register an unfinished `HGMMA` reads as
its A operand (`inflight_operand_writes`; session 30's race was one such register copy), and the register
copies of loaded words in the K loop (`loaded_word_copies`; each waits for its load). The counts are static:
a statement about the code ptxas emits, not a timing. Needs Triton (with its bundled ptxas and cuobjdump) and,
for the Gluon kernels, Triton's Gluon; no CUDA device.
    python benchmarks/compile_decode_offline.py [--bits 2,4] [--kernels dp4a,imma,imma_prefetch,wgmma] [--tokens 16]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import dp4a_linear as dl  # noqa: E402
from kernels import gluon_imma, gluon_wgmma  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import GpuPackedWeight, repack_for_gpu  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# (bits -> (columns, warps)) at group 128: the dp4a tiles session 18 measured fastest at 28672x8192, and the int8
# tensor-core decode at 2 row tiles per warp
DP4A_TILES = {2: (512, 4), 3: (256, 4), 4: (512, 2), 5: (256, 2), 6: (512, 4), 8: (256, 2)}
IMMA_TILES = {b: (128, 4) for b in DP4A_TILES}
POINTER = {torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32"}


def _weight(bits: int) -> GpuPackedWeight:
    """A small group-128 weight in the GPU layout: the kernels' constants come from it as `linear` takes them."""
    return repack_for_gpu(quantize(torch.randn(16, 512), QuantSpec(bits, 128), clip_search=False))


def _operands(gw: GpuPackedWeight) -> tuple[dict, dict]:
    """Signature entries of the weight's pointers, and the weight's constants (`triton_linear._args`)."""
    _, consts = tlin._args(gw)
    return dict(p0="*i32", p1=POINTER[gw.planes[-1].dtype], s="*bf16", z="*bf16"), consts


def _compile(fn, sig: dict, consts: dict, warps: int, gluon: bool, options: dict | None = None):
    for key in consts:
        sig[key] = "constexpr"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in ("N", "stride_sg", "stride_om", "stride_wm")}
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        src = GluonASTSource(fn, sig, consts, attrs)
    else:
        src = ASTSource(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_stages": 1, "num_warps": warps, **(options or {})})


def dp4a(gw: GpuPackedWeight, tokens: int):
    bn, warps = DP4A_TILES[gw.bits]
    ptrs, consts = _operands(gw)
    sig = dict(xq="*i32", xs="*fp32", xz="*fp32", **ptrs, out="*bf16", ws="*fp32", cnt="*i32", N="i32",
               K="i32", KW="i32", NB="i32", G="i32", stride_sg="i32", stride_sn="i32", rows_per_split="i32",
               SPLIT="i32", stride_om="i32", zero_word="i32")
    consts.update(stride_sn=1, ATOMIC=True, REGROUP=dl._regroup(gw), EVEN_N=True, ASM=True, BN=bn)
    return _compile(dl._gemv_dp4a_kernel, sig, consts, warps, False), f"n{bn}w{warps}", bn // (32 * warps) * 16


def imma(gw: GpuPackedWeight, tokens: int, prefetch: bool = False):
    bn, warps = IMMA_TILES[gw.bits]
    if tokens > gluon_imma.max_tokens(gw):
        raise SystemExit(f"{tokens} tokens at {gw.bits} bits: a launch takes at most {gluon_imma.max_tokens(gw)}")
    ptrs, consts = _operands(gw)
    sig = dict(xb="*i32", xs="*fp32", xz="*fp32", **ptrs, out="*bf16", ws="*fp32", cnt="*i32", M="i32", N="i32",
               K="i32", KW="i32", NB="i32", stride_sg="i32", stride_sn="i32", inv_g="fp32", rows_per_split="i32",
               SPLIT="i32", stride_om="i32")
    consts.update(stride_sn=1, ATOMIC=True, HALVES=gluon_imma.halves(gw), CLASSES=gluon_imma.classes(gw, tokens),
                  NC=gluon_imma.columns(gw, tokens), EVEN_N=True, PREFETCH=prefetch, BN=bn, WARPS=warps)
    return _compile(gluon_imma._gemv_imma_kernel, sig, consts, warps, True), f"n{bn}w{warps}", bn * 16 // (32 * warps)


def wgmma(gw: GpuPackedWeight, tile: tuple[int, int, int], split_k: int = 1):
    """The wgmma prefill for bfloat16 x at `tile` (block_m, num_warps, stages) and split_k, compiled as
    `gluon_wgmma.linear` launches it."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type
    block_m, warps, stages = tile
    x = torch.zeros(block_m, gw.shape[1], dtype=torch.bfloat16)
    desc = TensorDescriptor(x, list(x.shape), [x.shape[1], 1], [block_m, gluon_wgmma.STEP],
                            gl.NVMMASharedLayout.get_default_for([block_m, gluon_wgmma.STEP], gl.bfloat16))
    ptrs, consts = _operands(gw)
    sig = dict(x_desc=mangle_type(desc), **ptrs, out="*bf16", ws="*fp32", cnt="*i32", M="i32", N="i32", K="i32",
               KW="i32", stride_sg="i32", stride_sn="i32", stride_om="i32", stride_wm="i32",
               split_steps="i32", whole_n="i32")
    launch = gluon_wgmma.launch_constants(gw, torch.bfloat16, block_m, warps, stages, split_k)
    options = {key: launch.pop(key) for key in ("num_warps", "maxnreg") if key in launch}
    if launch["RING1"]:  # plane 1 is passed as int32 words
        sig["p1"] = "*i32"
    consts.update(stride_sn=1, **launch)
    return _compile(gluon_wgmma._wgmma_prefill_kernel, sig, consts, warps, True, options)


def _instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without its encoding) of every SASS instruction."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,5})\*/\s+([^;]*);", sass)]


def inflight_operand_writes(sass: str) -> list[str]:
    """Instructions that write a register of an `HGMMA`'s A operand before a `WARPGROUP.DEPBAR` retires that
    `HGMMA`, on any path through the SASS (branches and the loop's back edge followed): "DEPBAR.LE gsb0, 0x0"
    retires every group, "0x1" the groups before the newest. Empty when the A registers stay put."""
    ins = _instructions(sass)
    at = {addr: i for i, (addr, _) in enumerate(ins)}
    found = []
    for i, (addr, text) in enumerate(ins):
        operand = re.match(r"HGMMA\.\S+ R\d+, R(\d+),", text)
        if operand is None:
            continue
        regs = {f"R{int(operand.group(1)) + r}" for r in range(4)}
        todo, seen = [(i + 1, False)], set()
        while todo:  # (instruction, whether a newer wgmma group was committed since)
            j, newer = todo.pop()
            if (j, newer) in seen or j >= len(ins):
                continue
            seen.add((j, newer))
            text2 = ins[j][1]
            if "DEPBAR.LE gsb0, 0x0" in text2 or ("DEPBAR.LE gsb0, 0x1" in text2 and newer):
                continue
            newer = newer or (text2.startswith("HGMMA") and "gsb0" in text2)
            dest = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s+(R\d+)", text2)
            if dest and dest.group(2) in regs and not dest.group(1).startswith(("HGMMA", "ST", "RED", "ATOM")):
                found.append(f"{ins[j][0]:#06x} {text2} (A operand of the HGMMA at {addr:#06x})")
                continue
            branch = re.search(r"BRA (?:\S+ )?0x([0-9a-f]+)", text2)
            if branch and int(branch.group(1), 16) in at:
                todo.append((at[int(branch.group(1), 16)], newer))
                if not text2.startswith("@"):
                    continue
            if text2.startswith("EXIT"):
                continue
            todo.append((j + 1, newer))
    return found


def loaded_word_copies(sass: str) -> list[str]:
    """Register moves in the K loop (the backward branch around the most `HGMMA`s) whose source was last written
    by an `LDG`, looking back around the loop: a load copied between registers waits for it to arrive there, not
    where its value is used. Before session 34 every 8-bit tile had 8 a step (its words passed from a set loaded
    two blocks ahead to the next); the alternating register sets (`PAIRS`) have none. Branches back from the
    retry stubs ptxas places after the kernel's `EXIT` (barrier waits) span the epilogue too, so spans holding an
    `EXIT` are not loops (the K slices' epilogue loads its parts with `LDG`s)."""
    ins = _instructions(sass)
    loop: list[tuple[int, str]] = []
    for addr, text in ins:
        target = re.search(r"BRA (?:\S+ )?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [i for i in ins if int(target.group(1), 16) <= i[0] <= addr]
            if (sum("HGMMA" in t for _, t in body) > sum("HGMMA" in t for _, t in loop)
                    and not any(re.match(r"(?:@!?U?P\w+\s+)?EXIT", t) for _, t in body)):
                loop = body

    def dest(text: str) -> str | None:
        found = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s+(R\d+)", text)
        return found.group(2) if found and not found.group(1).startswith(("ST", "RED", "HGMMA")) else None
    found = []
    for k, (addr, text) in enumerate(loop):
        move = re.match(r"(?:@!?U?P\w+\s+)?(?:IMAD\.MOV\.U32\s+R\d+, RZ, RZ,|MOV\s+R\d+,)\s*(R\d+)$", text)
        if move is None:
            continue
        writer = next((t for d in range(1, len(loop)) if dest(t := loop[(k - d) % len(loop)][1]) == move.group(1)),
                      "")
        if re.match(r"(?:@!?U?P\w+\s+)?LDG", writer):
            found.append(f"{addr:#06x} {text} (loaded by {writer})")
    return found


def _sass(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump -res-usage, cuobjdump -sass) of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        return tuple(subprocess.run([BIN / "cuobjdump", flag, path], capture_output=True, text=True).stdout
                     for flag in ("-res-usage", "-sass"))


def _sass_loop(cubin: bytes) -> tuple[str, str, collections.Counter]:
    res, sass = _sass(cubin)
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(
        r"/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);", sass)]
    loop = collections.Counter()
    for addr, op, rest in ins:  # the last backward branch closes the K loop
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loop = collections.Counter(o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr)
    return re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1), loop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--kernels", default="dp4a,imma,imma_prefetch")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per launch of the int8 tensor-core decode")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90a; group 128 (half a K block at 2 and 3 bits); dp4a: 1 token, "
          f"int8 tensor cores: {args.tokens}")
    for bits in (int(b) for b in args.bits.split(",")):
        for name in args.kernels.split(","):
            if name == "wgmma":
                gw = _weight(bits)
                for tile in gluon_wgmma.TILES:
                    res, sass = _sass(wgmma(gw, tile).asm["cubin"])
                    writes = inflight_operand_writes(sass)
                    regs, stack = (re.search(rf"{key}:(\d+)", res).group(1) for key in ("REG", "STACK"))
                    consts = gluon_wgmma.launch_constants(gw, torch.bfloat16, *tile)
                    words = "a ring" if consts["RING"] else "two register sets" if consts["PAIRS"] else "registers"
                    print(f"{bits}-bit wgmma m{tile[0]}w{tile[1]}p{tile[2]}: {regs} registers, stack {stack}; "
                          f"{sass.count('HGMMA.')} HGMMA, {sass.count('WARPGROUP.DEPBAR')} DEPBAR; {len(writes)} "
                          f"writes to in-flight A registers; words through {words}, "
                          f"{len(loaded_word_copies(sass))} copies of loaded registers in the K loop", flush=True)
                    for w in writes:
                        print("   ", w)
                continue
            kernel, tile, words = {"dp4a": dp4a, "imma": imma, "imma_prefetch": partial(imma, prefetch=True)}[name](
                _weight(bits), args.tokens)
            regs, stack, loop = _sass_loop(kernel.asm["cubin"])
            total = sum(loop.values())
            print(f"{bits}-bit {name} {tile}: {regs} registers, stack {stack}; K loop {total} instructions for "
                  f"{words} words a thread = {total / words:.1f} per word; "
                  + ", ".join(f"{op} {c}" for op, c in loop.most_common(6)), flush=True)


if __name__ == "__main__":
    main()
