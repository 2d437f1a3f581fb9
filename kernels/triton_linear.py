"""Triton weight-only b-bit linear (b in 2, 3, 4, 5, 6, 8) on the bit-plane block layout of `gpu_layout`.

Every kernel walks K one block at a time: it loads the block's 16 word rows x BN columns of each plane once
(coalesced 16-byte loads), then for each slot i (16 consecutive input columns) turns codes into floats with the
"magic number" trick: each code is masked in place under a float exponent (one LOP3 a code, written as inline PTX
because ptxas splits the plain AND + OR into two; byte codes take one PRMT):
- `_gemv_kernel` (decode, M <= GEMV_MAX_M): per code one LOP3 and one FMA of x with 2^e + code; the 2^e offsets
  (and the zero point) come off once per group through the sum of x (`_field`); one scale multiply per group;
  reduced inside each thread (the tile keeps the load's layout: no shuffles); split-K;
- `_gemv_mma_kernel` (decode, 1..4 bfloat16 tokens, 2..6-bit): tensor cores, the weight as the dot's register
  operand, one LOP3 per pair of codes; groups summed apart in columns of x^T (on CUDA, 2/3/5-bit at 1-2 tokens
  and 3-bit up to 4 run its Gluon port, `gluon_linear`, which loads the words straight into the MMA registers);
- `_gemm_kernel` (decode batches): per slot a K=16 tensor-core dot of x[:, 16 columns] and the slot's
  dequantized [16, BN] tile; split-K;
- `_gemm_wide_kernel` (prefill): the block's codes unpacked as [16, PER, BN], reordered to [16 PER, BN] and fed
  to one tensor-core dot (wgmma on Hopper) per block;
- `_dequant_kernel`: the float weight [K, N] for the dequantize + cuBLAS path.
Split-K partial sums go through a per-stream fp32 workspace with atomics; the last K-slice of a tile writes
the output and re-zeroes its part (no memset, no copy kernel). Group widths that are not a multiple of
32 have no fused kernel: `linear` says so once and uses dequantize + matmul. Under Triton's CPU interpreter
(no inline PTX) the same bit operations run as plain AND / OR.
"""
from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch

from .choice import QuantSpec
from .gpu_layout import WORD_ROWS, GpuPackedWeight

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAVE_TRITON = False

GEMV_MAX_M = 1
MMA_MAX_M = 4  # tensor-core decode up to 4 tokens (bfloat16, 2..6-bit; measured on an H100)
# inline PTX, except under Triton's CPU interpreter (which, like Triton, is chosen when the process starts)
ASM = os.environ.get("TRITON_INTERPRET") != "1"
# split-K GEMM tiles on a part block of rows run unpipelined (see `linear`); benchmarks/stress_split_k_gpu.py
# switches it off to check the race it works around
PART_BLOCK_UNPIPELINED = True
FIELD_LOW_BIT = 15  # the GEMV reads every code at bit >= 15, so its 2^e offsets stay <= 2^(8 + plane shift)


@dataclass(frozen=True)
class Config:
    """Tile shape of one launch (K always advances one block of 16 word rows); split_k: K-slices on the grid."""

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    wide: bool = False  # prefill kernel with one dot per K block (split_k must be 1)
    mma: bool = False  # decode on tensor cores (`_gemv_mma_kernel`, 2..6-bit, up to block_m tokens)
    gluon: bool = False  # with mma: the Gluon kernel (`gluon_linear.gemv_mma_gluon`; CUDA only, not in the interpreter)
    dp4a: bool = False  # decode on integer dot products (`dp4a_linear`; block_m 1, groups of whole or half K blocks)
    imma: bool = False  # decode on int8 tensor cores (`gluon_imma`, up to block_m tokens; num_stages 2: prefetch)
    wgmma: bool = False  # prefill on Hopper wgmma (`gluon_wgmma`; block_n = 16 x num_warps, num_stages: TMA ring)

    @property
    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}s{self.split_k}w{self.num_warps}p{self.num_stages}"
                + "W" * self.wide + "T" * self.mma + "G" * self.gluon + "D" * self.dp4a + "I" * self.imma
                + "H" * self.wgmma)

    @classmethod
    def parse(cls, label: str) -> "Config":
        """The config whose `label` this is (latency tables name the tile they measured by its label)."""
        match = _LABEL.fullmatch(label)
        if match is None:
            raise ValueError(f"{label!r} is not a Config label (e.g. 'm1n128s10w4p1TG': block_m, block_n, "
                             "split_k, num_warps, num_stages, then W wide, T mma, G gluon, D dp4a, I imma, H wgmma)")
        bm, bn, split, warps, stages = (int(g) for g in match.groups()[:5])
        return cls(bm, bn, split, warps, stages, *(bool(g) for g in match.groups()[5:]))


_LABEL = re.compile(r"m(\d+)n(\d+)s(\d+)w(\d+)p(\d+)(W?)(T?)(G?)(D?)(I?)(H?)")


if HAVE_TRITON:
    @triton.constexpr_function
    def _view_shift(i: int, width: int) -> int:
        """Right shift (negative: left) of the word that puts field i (bits i * width ...) at bit
        FIELD_LOW_BIT + (i % n) * width; n neighbouring fields share a shifted view of the word."""
        n = (23 - width - FIELD_LOW_BIT) // width + 1
        return (i // n) * n * width - FIELD_LOW_BIT

    @triton.constexpr_function
    def _field_offset(i: int, width: int, scale_bits: int) -> float:
        """The 2^e that `_field` adds to field i (byte fields sit at bit 8)."""
        t = 8 if width == 8 else i * width - _view_shift(i, width)
        return 2.0 ** (23 - t + scale_bits)

    @triton.constexpr_function
    def _slot_offset(i: int, w0: int, w1: int, zero: float, has_zeros: bool) -> float:
        """What the GEMV takes off x * (sum of slot i's `_field`s): their 2^e, and the zero point when it is
        a constant (symmetric)."""
        return (_field_offset(i, w0, 0) + (_field_offset(i, w1, w0) if w1 else 0.0)
                + (0.0 if has_zeros else zero))

    @triton.constexpr_function
    def _prmt_byte_asm(i: int) -> str:
        """PTX taking byte i of $1 into bits 8..15 of $2 (whose other bytes hold the magic exponent)."""
        return f"prmt.b32 $0, $1, $2, 0x76{i}4;"

    @triton.constexpr_function
    def _half_view(width: int) -> int:
        """Neighbouring fields of a 16-bit half that share one shifted view: as many as fit in bfloat16's 7
        mantissa bits."""
        return (7 - width) // width + 1

    @triton.constexpr_function
    def _half_pos(f: int, width: int) -> int:
        """Bit of field f (within each 16-bit half of a word) after its view shift."""
        return (f % _half_view(width)) * width

    @triton.constexpr_function
    def _shift_asm(reg: str, src: str, right: int) -> str:
        """PTX moving `src` right by `right` bits (left when negative) into `reg`."""
        if right > 0:
            return f"shr.b32 {reg}, {src}, {right};"
        return f"shl.b32 {reg}, {src}, {-right};" if right < 0 else f"mov.b32 {reg}, {src};"

    @triton.constexpr_function
    def _pair_asm(f: int, width: int, width1: int) -> str:
        """PTX turning field f of both 16-bit halves of word $2 into the bfloat16 pair $0 (128 + code * 2^p each):
        one shift per view, one LOP3 per pair of codes ($1, the same word, is not read). With a second plane
        (width1 > 0), its field f of both halves of the spread word $4 (`_spread`) goes just above the first
        plane's: one more shift and LOP3 (a | (b & c)); the code, < 2^(width + width1), stays exact since
        p + width + width1 <= 7."""
        m = ((1 << width) - 1) << _half_pos(f, width)
        head = "{.reg .b32 t, u; " + _shift_asm("t", "$2", f * width - _half_pos(f, width))
        if not width1:
            return head + f" lop3.b32 $0, t, {m | (m << 16)}, {0x43004300}, 0xEA;" + "}"
        m1 = ((1 << width1) - 1) << (_half_pos(f, width) + width)
        return (head + f" lop3.b32 t, t, {m | (m << 16)}, {0x43004300}, 0xEA; "
                + _shift_asm("u", "$4", f * width1 - _half_pos(f, width) - width)
                + f" lop3.b32 $0, t, u, {m1 | (m1 << 16)}, 0xF8;" + "}")

    @triton.jit
    def _pair_codes(ww, uu, f: tl.constexpr, W: tl.constexpr, W1: tl.constexpr, ASM: tl.constexpr):
        """[..., 2]: bfloat16 128 + code * 2^p of field f of the low and high 16-bit half of words ww (each word
        twice, [..., 2]; exact; p = `_half_pos`), the second plane's field f of the spread words uu (`_spread`,
        also twice; unused when W1 == 0) above it. One LOP3 (two with a second plane) makes both: one register
        of the dot operand."""
        if ASM:
            if W1 > 0:
                v = tl.inline_asm_elementwise(_pair_asm(f, W, W1), "=r,r,r,r,r", [ww, uu], dtype=tl.bfloat16,
                                              is_pure=True, pack=2)
            else:
                v = tl.inline_asm_elementwise(_pair_asm(f, W, 0), "=r,r,r", [ww], dtype=tl.bfloat16, is_pure=True,
                                              pack=2)
        else:  # float32: the CPU interpreter's dot mishandles bfloat16
            half = tl.arange(0, 2) * 16
            code = (ww >> (half + f * W)) & ((1 << W) - 1)
            if W1 > 0:
                code = code | (((uu >> (half + f * W1)) & ((1 << W1) - 1)) << W)
            v = (code * (1 << _half_pos(f, W)) + 128).to(tl.float32)
        return v

    @triton.jit
    def _spread(b, HB: tl.constexpr):
        """Second-plane words b (int32 from int16 / int8) with their fields for the high half of the first plane's
        word (bits HB..2 HB - 1) moved to bit 16, so that field f of either half is at the same place in both."""
        return (b & ((1 << HB) - 1)) | ((b << (16 - HB)) & (((1 << HB) - 1) << 16))

    @triton.jit
    def _lop3(w, mask: tl.constexpr, other, ASM: tl.constexpr):
        """(w & mask) | other as one LOP3: ptxas turns the plain form into two (one immediate per LOP3)."""
        o = other + tl.zeros(w.shape, tl.int32)
        if ASM:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [w, tl.full(w.shape, mask, tl.int32), o], dtype=tl.int32, is_pure=True,
                                             pack=1)
        return (w & mask) | o

    @triton.jit
    def _field(w, i: tl.constexpr, W: tl.constexpr, E: tl.constexpr, ASM: tl.constexpr, byte_magic):
        """2^e + code * 2^E (float32, exact) for field i of words w, e = 23 - t + E <= 8 + E (`_field_offset`).

        The word is shifted (`_view_shift`, one shift per view) so that the field lies at bit t >= FIELD_LOW_BIT,
        then masked in place under exponent 150 - t + E: a single LOP3 per code. A small e keeps the FMA of
        x with 2^e + code exact enough that the offset can come off once per group. Byte fields take one PRMT
        into bits 8..15 under `byte_magic` (142 << 23, a run-time argument: as an immediate, ptxas would put the
        selector in a register that every PRMT overwrites)."""
        if W == 8:
            if ASM:
                m = byte_magic + tl.zeros(w.shape, tl.int32)
                u = tl.inline_asm_elementwise(_prmt_byte_asm(i), "=r,r,r", [w, m], dtype=tl.int32, is_pure=True, pack=1)
            else:
                u = (((w >> (8 * i)) & 255) << 8) | byte_magic
            return u.to(tl.float32, bitcast=True)
        d: tl.constexpr = _view_shift(i, W)
        t: tl.constexpr = i * W - d
        if d > 0:
            v = w >> d
        elif d < 0:
            v = w << (-d)
        else:
            v = w
        return _lop3(v, ((1 << W) - 1) << t, (150 - t + E) << 23, ASM).to(tl.float32, bitcast=True)

    @triton.jit
    def _slot(a, ahi, b, i: tl.constexpr, bias, W0: tl.constexpr, W1: tl.constexpr, ASM: tl.constexpr):
        """code - bias (exact, float32) of slot i of words a (plane 0; ahi = a >> 16) and b (plane 1).

        The code is masked in place, not shifted down: with its lowest bit at bit t of a float whose exponent is
        150 - t, the float is 2^(23 - t) + code, so bitcast((word & (mask << t)) | (150 - t) << 23) and one
        subtraction of 2^(23 - t) + bias give code - bias. Plane 1's field is shifted next to plane 0's. Codes
        reaching past bit 22 are read from ahi at t = 16 bits lower (one shift per word, not per code)."""
        s0: tl.constexpr = i * W0
        if W0 == 8:
            # byte fields: a shift and a mask become one byte permute (PRMT) with the magic exponent
            v = (((a >> s0) & 255) | 0x4B000000).to(tl.float32, bitcast=True)
            return v - (8388608.0 + bias)
        t0: tl.constexpr = s0 if s0 + W0 + W1 <= 23 else s0 - 16
        if s0 + W0 + W1 <= 23:
            u = _lop3(a, ((1 << W0) - 1) << t0, (150 - t0) << 23, ASM)
        else:
            u = _lop3(ahi, ((1 << W0) - 1) << t0, (150 - t0) << 23, ASM)
        if W1 > 0:
            d: tl.constexpr = t0 + W0 - i * W1
            if d >= 0:
                u = _lop3(b << d, ((1 << W1) - 1) << (t0 + W0), u, ASM)
            else:
                u = _lop3(b >> (-d), ((1 << W1) - 1) << (t0 + W0), u, ASM)
        return u.to(tl.float32, bitcast=True) - ((1 << (23 - t0)) * 1.0 + bias)

    @triton.jit
    def _load_block(p0, p1, r0, cols, nmask, N, KW, W1: tl.constexpr):
        """Word rows r0..r0+15 x cols of both planes (plane 1 as int32; unused when W1 == 0), and plane 0 >> 16."""
        rows = r0 + tl.arange(0, 16)
        offs = rows[:, None] * N + cols[None, :]
        mask = (rows < KW)[:, None] & nmask[None, :]
        a = tl.load(p0 + offs, mask=mask, other=0)
        if W1 > 0:
            # 4 columns per thread like plane 0 (narrower loads), so both tiles share one register layout
            offs1 = rows[:, None] * N + tl.max_contiguous(cols, 4)[None, :]
            b = tl.load(p1 + offs1, mask=mask, other=0).to(tl.int32)
        else:
            b = a
        return a, a >> 16, b

    @triton.jit
    def _scale_zero(s, z, offs, mask, ZERO: tl.constexpr, HAS_Z: tl.constexpr):
        """Scales and zero points (float32) at offsets `offs` (scale 0 where masked: the K padding)."""
        sc = tl.load(s + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zero = tl.load(z + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            zero = tl.where(mask, ZERO, ZERO)  # shaped like the scales (Gluon too)
        return sc, zero

    @triton.jit
    def _group_scale(s, z, col0, K, G, cols, nmask, stride_sg, stride_sn, ZERO: tl.constexpr, HAS_Z: tl.constexpr):
        """Scale and zero point [BN] of the group holding input column col0."""
        offs = (col0 // G) * stride_sg + cols * stride_sn
        return _scale_zero(s, z, offs, nmask & (tl.full(cols.shape, col0, tl.int32) < K), ZERO, HAS_Z)

    @triton.jit
    def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid`, GROUP_M row tiles at a time (neighbours share weight tiles in L2)."""
        n_m = tl.cdiv(M, BM)
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _finish(acc, out_ptrs, ws_ptrs, mask, cnt_ptr, SPLIT, ATOMIC: tl.constexpr):
        """Store the tile, or (split-K) add it to the fp32 workspace; the last K-slice of the tile to arrive
        writes the sum to `out` and zeroes its workspace and counter again, so no memset or copy kernel runs."""
        if ATOMIC:
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
                tl.store(ws_ptrs, tl.where(mask, 0.0, 0.0), mask=mask)  # zeros shaped like mask (Gluon too)
                tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
        else:
            tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["K", "KW", "G", "rows_per_split", "SPLIT"])
    def _gemv_kernel(x, p0, p1, s, z, out, ws, cnt, N, K, KW, G, stride_sg, stride_sn, rows_per_split, SPLIT, stride_xm,
                     stride_om, byte_magic, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                     HAS_Z: tl.constexpr, ATOMIC: tl.constexpr, SPS: tl.constexpr, EVEN_K: tl.constexpr,
                     ASM: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        j = tl.arange(0, 16)
        acc = tl.zeros([BN], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            a, ahi, b = _load_block(p0, p1, r0, cols, nmask, N, KW, W1)
            part = tl.zeros([16, BN], dtype=tl.float32)
            xoff = tl.zeros([16], dtype=tl.float32)
            xsum = tl.zeros([16], dtype=tl.float32)
            for i in tl.static_range(PER):
                col0 = r0 * PER + i * 16
                if EVEN_K:
                    xi = tl.load(x + m * stride_xm + tl.multiple_of(col0, 16) + j).to(tl.float32)
                else:
                    xi = tl.load(x + m * stride_xm + col0 + j, mask=col0 + j < K, other=0.0).to(tl.float32)
                if SPS > 0:
                    # one scale per SPS slots: sum x * (2^e + code) over them (a LOP3 and an FMA a code), take off
                    # sum x * (2^e + zero) (x-side work shared by the thread's columns), then scale once
                    if i % SPS == 0:
                        sc, zero = _group_scale(s, z, col0, K, G, cols, nmask, stride_sg, stride_sn, ZERO, HAS_Z)
                    part += xi[:, None] * _field(a, i, W0, 0, ASM, byte_magic)
                    if W1 > 0:
                        part += xi[:, None] * _field(b, i, W1, W0, ASM, byte_magic)
                    xoff += xi * _slot_offset(i, W0, W1, ZERO, HAS_Z)
                    if HAS_Z:
                        xsum += xi
                    if i % SPS == SPS - 1:
                        tot = tl.sum(part, axis=0) - tl.sum(xoff, axis=0)
                        if HAS_Z:
                            tot -= zero * tl.sum(xsum, axis=0)
                        acc += tot * sc
                        part = tl.zeros([16, BN], dtype=tl.float32)
                        xoff = tl.zeros([16], dtype=tl.float32)
                        xsum = tl.zeros([16], dtype=tl.float32)
                else:
                    sc, zero = _group_scale(s, z, col0, K, G, cols, nmask, stride_sg, stride_sn, ZERO, HAS_Z)
                    part += (xi[:, None] * sc[None, :]) * _slot(a, ahi, b, i, zero[None, :], W0, W1, ASM)
            if SPS == 0:
                acc += tl.sum(part, axis=0)
        _finish(acc, out + m * stride_om + cols, ws + m * N + cols, nmask, cnt + m * tl.num_programs(0) + pid_n,
                SPLIT, ATOMIC)

    @triton.jit
    def _block_operand(ww, uu, W: tl.constexpr, W1: tl.constexpr, F: tl.constexpr, ASM: tl.constexpr):
        """The block's weight operand [BN, 32 F] from its words ww [BN, 16, 2] (twice; second plane spread in uu):
        field f of row j's half h at k = 32 f + 2 j + h, joined in registers (no data moves: each field's pairs
        are the dot operand's)."""
        a01 = tl.join(_pair_codes(ww, uu, 0, W, W1, ASM), _pair_codes(ww, uu, 1, W, W1, ASM))
        a23 = tl.join(_pair_codes(ww, uu, 2, W, W1, ASM), _pair_codes(ww, uu, 3, W, W1, ASM))
        a = tl.join(a01, a23)
        if F == 4:
            a = tl.permute(a, (0, 4, 3, 1, 2))
        else:
            a45 = tl.join(_pair_codes(ww, uu, 4, W, W1, ASM), _pair_codes(ww, uu, 5, W, W1, ASM))
            a67 = tl.join(_pair_codes(ww, uu, 6, W, W1, ASM), _pair_codes(ww, uu, 7, W, W1, ASM))
            a = tl.permute(tl.join(a, tl.join(a45, a67)), (0, 5, 4, 3, 1, 2))
        return tl.reshape(a, (a.shape[0], 32 * F))

    @triton.jit(do_not_specialize=["M", "K", "KW", "G", "rows_per_split", "SPLIT"])
    def _gemv_mma_kernel(x, p0, p1, s, z, out, ws, cnt, M, N, K, KW, G, stride_sg, stride_sn, rows_per_split, SPLIT,
                         stride_xm, stride_om, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                         HAS_Z: tl.constexpr, ATOMIC: tl.constexpr, RUN: tl.constexpr, EVEN_K: tl.constexpr,
                         ASM: tl.constexpr, BN: tl.constexpr, NC: tl.constexpr):
        """Decode on tensor cores, 2..6 bits: out^T = W x^T with the weight as the dot's register operand, one
        dot per K block. Each word [BN, 16] is joined with itself, so that one LOP3 on it makes the bfloat16 pair
        128 + code * 2^p of its two 16-bit halves (`_pair_codes`): one register of the operand (k = 2 row + half).
        A second plane (3 = 2+1, 5 = 4+1, 6 = 4+2) is spread to the same halves and OR-ed above the first.
        x^T has a column per (token, half, run of RUN fields sharing a group): it holds x * 2^-p where the
        operand's k belongs to it, else 0, so every column sums one group. The 128 * 2^-p offsets (and the
        zero point) come off the block's sum through the column sums of x^T; then one scale multiply."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HALF: tl.constexpr = PER // 2
        NR: tl.constexpr = HALF // RUN
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < N
        j16 = tl.arange(0, 16)
        rows = tl.arange(0, 32 * HALF)
        f = rows // 32
        j = (rows % 32) // 2
        h = rows % 2
        col = tl.arange(0, NC)
        tok = col // (2 * NR)
        hc = col % 2
        rc = (col // 2) % NR
        shift = tl.exp2(-((f % _half_view(W0)) * W0).to(tl.float32))  # 2^-p (`_half_pos`) of each row
        xmask = (h[:, None] == hc[None, :]) & ((f // RUN)[:, None] == rc[None, :]) & (tok < M)[None, :]
        total = tl.zeros([BN, NC], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            words = tl.load(p0 + (r0 + j16)[None, :] * N + n[:, None], mask=nmask[:, None], other=0)
            if W1 > 0:
                spread = _spread(tl.load(p1 + (r0 + j16)[None, :] * N + n[:, None], mask=nmask[:, None],
                                         other=0).to(tl.int32), HALF * W1)
            else:
                spread = words
            c = r0 * PER + 16 * (h * HALF + f) + j
            if EVEN_K:
                xt = tl.load(x + tok[None, :] * stride_xm + c[:, None], mask=xmask, other=0.0).to(tl.float32)
            else:
                xt = tl.load(x + tok[None, :] * stride_xm + c[:, None], mask=xmask & (c < K)[:, None],
                             other=0.0).to(tl.float32)
            b = xt * shift[:, None]
            operand = _block_operand(tl.join(words, words), tl.join(spread, spread), W0, W1, HALF, ASM)
            acc = tl.dot(operand, b.to(tl.bfloat16 if ASM else tl.float32))
            g0 = r0 * PER + 16 * (hc * HALF + rc * RUN)  # each column's first input column
            sc, zero = _scale_zero(s, z, (g0 // G)[None, :] * stride_sg + n[:, None] * stride_sn,
                                   nmask[:, None] & (g0 < K)[None, :], ZERO, HAS_Z)
            if HAS_Z:
                part = acc - tl.sum(b * 128.0, axis=0)[None, :] - zero * tl.sum(xt, axis=0)[None, :]
            else:
                part = acc - tl.sum(b * 128.0 + xt * ZERO, axis=0)[None, :]
            total += part * sc
        res = tl.sum(tl.reshape(total, (BN, NC // (2 * NR), 2 * NR)), axis=2)
        t = tl.arange(0, NC // (2 * NR))
        omask = nmask[:, None] & (t < M)[None, :]
        _finish(res, out + t[None, :] * stride_om + n[:, None], ws + t[None, :] * N + n[:, None], omask, cnt + pid_n,
                SPLIT, ATOMIC)

    @triton.jit(do_not_specialize=["M", "K", "KW", "G", "rows_per_split", "SPLIT"])
    def _gemm_kernel(x, p0, p1, s, z, out, ws, cnt, M, N, K, KW, G, stride_sg, stride_sn, rows_per_split, SPLIT,
                     stride_xm, stride_om, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                     HAS_Z: tl.constexpr, ATOMIC: tl.constexpr, SPS: tl.constexpr, EVEN_K: tl.constexpr,
                     ASM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m, pid_n = _tile(pid, M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        j = tl.arange(0, 16)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            a, ahi, b = _load_block(p0, p1, r0, cols, nmask, N, KW, W1)
            for i in tl.static_range(PER):
                col0 = r0 * PER + i * 16
                if SPS == 0 or i % SPS == 0:
                    sc, zero = _group_scale(s, z, col0, K, G, cols, nmask, stride_sg, stride_sn, ZERO, HAS_Z)
                ks = tl.multiple_of(col0, 16) + j
                if EVEN_K:
                    xt = tl.load(x + rm[:, None] * stride_xm + ks[None, :], mask=rm[:, None] < M, other=0.0)
                else:
                    xt = tl.load(x + rm[:, None] * stride_xm + ks[None, :],
                                 mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
                w = _slot(a, ahi, b, i, zero[None, :], W0, W1, ASM) * sc[None, :]
                acc = tl.dot(xt, w.to(xt.dtype), acc)
        omask = (rm[:, None] < M) & nmask[None, :]
        _finish(acc, out + rm[:, None] * stride_om + cols[None, :], ws + rm[:, None] * N + cols[None, :], omask,
                cnt + pid, SPLIT, ATOMIC)

    @triton.jit(do_not_specialize=["M", "K", "KW", "G"])
    def _gemm_wide_kernel(x, p0, p1, s, z, out, M, N, K, KW, G, stride_sg, stride_sn, stride_xm, stride_om,
                          PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                          HAS_Z: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          GROUP_M: tl.constexpr):
        """Prefill: one tensor-core dot per K block ([BM, 16 PER] x [16 PER, BN]); the block's [16, PER, BN] codes
        are unpacked with per-slot shifts, scaled per (slot, column) and reordered to [16 PER, BN]."""
        pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        slot = tl.arange(0, PER)
        kk = tl.arange(0, 16 * PER)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for r0 in range(0, KW, 16):
            a, ahi, b = _load_block(p0, p1, r0, cols, nmask, N, KW, W1)
            u = (a[:, None, :] >> (slot * W0)[None, :, None]) & ((1 << W0) - 1)
            if W1 > 0:
                u = u | (((b[:, None, :] >> (slot * W1)[None, :, None]) & ((1 << W1) - 1)) << W0)
            col0 = r0 * PER + 16 * slot
            sc, zero = _scale_zero(s, z, (col0 // G)[:, None] * stride_sg + cols[None, :] * stride_sn,
                                   (col0 < K)[:, None] & nmask[None, :], ZERO, HAS_Z)
            w = ((u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zero[None, :, :])) * sc[None, :, :]
            w = tl.reshape(tl.permute(w.to(x.dtype.element_ty), (1, 0, 2)), (16 * PER, BN))
            ks = r0 * PER + kk
            if EVEN_K:
                xt = tl.load(x + rm[:, None] * stride_xm + ks[None, :], mask=rm[:, None] < M, other=0.0)
            else:
                xt = tl.load(x + rm[:, None] * stride_xm + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K),
                             other=0.0)
            acc = tl.dot(xt, w, acc)
        tl.store(out + rm[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=(rm[:, None] < M) & nmask[None, :])

    @triton.jit(do_not_specialize=["K", "KW", "G"])
    def _dequant_kernel(p0, p1, s, z, out, N, K, KW, G, stride_sg, stride_sn, PER: tl.constexpr, W0: tl.constexpr,
                        W1: tl.constexpr, ZERO: tl.constexpr, HAS_Z: tl.constexpr, ASM: tl.constexpr,
                        BN: tl.constexpr):
        r0 = tl.program_id(0) * 16
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = cols < N
        j = tl.arange(0, 16)
        a, ahi, b = _load_block(p0, p1, r0, cols, nmask, N, KW, W1)
        for i in tl.static_range(PER):
            ks = r0 * PER + i * 16 + j
            # the group of every element (a 16-column slot may straddle groups of any width)
            mask = (ks < K)[:, None] & nmask[None, :]
            sc, zero = _scale_zero(s, z, (ks // G)[:, None] * stride_sg + cols[None, :] * stride_sn, mask, ZERO, HAS_Z)
            w = _slot(a, ahi, b, i, zero, W0, W1, ASM) * sc
            tl.store(out + ks[:, None] * N + cols[None, :], w.to(out.dtype.element_ty), mask=mask)


def fused_supported(gw: GpuPackedWeight) -> bool:
    """Whether the fused kernels run this weight: the group width must be a multiple of 32 columns."""
    return gw.group % 32 == 0


def mma_supported(gw: GpuPackedWeight) -> bool:
    """Whether `_gemv_mma_kernel` runs this weight: 2..6 bits (8-bit codes are not exact in a bfloat16 operand),
    fused-supported groups."""
    return gw.bits != 8 and fused_supported(gw)


def fused_supported_spec(spec: QuantSpec, shape: tuple[int, int]) -> bool:
    """`fused_supported` before repacking (per-channel weights always qualify)."""
    return spec.group_size is None or spec.group_width(shape[1]) % 32 == 0


_GEMV_TILES = {2: (512, 4, 16), 3: (128, 4, 8), 4: (256, 2, 8), 5: (256, 2, 8), 6: (512, 4, 16), 8: (512, 4, 8)}
# tensor-core decode (bfloat16): (columns per program, warps, programs per SM that set the K-split), each within
# 9% of the best tile at 1 and 4 tokens on 8192x8192 and 28672x8192 on an H200 (docs/kernels_gpu.md); at 1 token
# only where it beat the CUDA-core GEMV there (4-bit: 0.86-0.94x of it, 6-bit: 0.91-0.99x)
_MMA_TILES = {2: (128, 2, 4), 3: (128, 4, 8), 4: (128, 2, 4), 5: (128, 4, 8), 6: (128, 4, 8)}
_MMA_ONE_TOKEN_BITS = (2, 3, 5)
# the same decode in Gluon (`gluon_linear`) up to this many tokens per bit width, one tile for all: where it beat
# the Triton kernel on the four LLM shapes on an H200 (2-bit 1.01-1.07x, 3-bit 1.06-1.33x, 5-bit 1.07-1.41x;
# at 4 tokens 2- and 5-bit were 0.93-1.01x, and 4/6-bit slower: docs/kernels_gpu.md, "Session 13")
_GLUON_MAX_M = {2: 2, 3: 4, 5: 2}
_GLUON_TILE = (128, 4, 8)
# integer-dot decode (`dp4a_linear`): the winners of sweeps on LLM shapes of an H200, 1 token (2..8-bit, group
# 128; docs/kernels_gpu.md, "Session 17" and "Session 18"): (columns per program, warps, programs per SM that set
# the K-split)
_DP4A_TILES = ((256, 2, 8), (512, 2, 4), (512, 4, 4), (512, 4, 8), (512, 4, 16), (512, 8, 4), (128, 2, 8),
               (128, 2, 32))
# token counts up to which `tile_candidates` offers the decode tiles (above: the Hopper wgmma prefill's)
TUNED_MAX_M = 16
_GEMV_ALTERNATIVES = ((128, 4, 8), (256, 2, 8), (256, 4, 16), (512, 4, 8), (512, 4, 16))
# (columns, warps, waves, stages; 2 = prefetch): the int8 tensor-core decode's winners at 1, 4 and 16 tokens on
# 28672x8192 and 8192x8192 (H200, session 21)
_IMMA_TILES = ((128, 2, 4, 2), (128, 4, 6, 2), (64, 2, 6, 2), (64, 2, 12, 1), (32, 1, 16, 2), (32, 1, 4, 1))


@functools.cache
def gluon_available(device: torch.device) -> bool:
    """Whether the Gluon decode kernel runs on `device`: Triton 3.6 or newer (the Gluon API it was written and
    checked for; Gluon is experimental and changes between releases), inline PTX (not the CPU interpreter) and a
    CUDA device with mma.sync (compute capability 8.0 or newer)."""
    if not (HAVE_TRITON and ASM and device.type == "cuda"):
        return False
    if tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) < (3, 6):
        return False
    from .gluon_linear import HAVE_GLUON
    return HAVE_GLUON and torch.cuda.get_device_capability(device) >= (8, 0)


def default_config(m: int, gw: GpuPackedWeight, dtype: torch.dtype = torch.bfloat16) -> Config:
    """Tile shape for m token rows of `dtype` (the latency table times the result against the other paths)."""
    n = gw.shape[0]
    blocks = gw.planes[0].shape[0] // WORD_ROWS
    if (dtype == torch.bfloat16 and m <= MMA_MAX_M and mma_supported(gw)
            and (m > 1 or gw.bits in _MMA_ONE_TOKEN_BITS)):
        gluon = m <= _GLUON_MAX_M.get(gw.bits, 0) and gluon_available(gw.scales.device)
        bn, warps, waves = _GLUON_TILE if gluon else _MMA_TILES[gw.bits]
        return Config(1 << (m - 1).bit_length(), bn, split_for(-(-n // bn), blocks, waves=waves), warps, 1, mma=True,
                      gluon=gluon)
    if m <= GEMV_MAX_M:
        # winners of a tile sweep over the five LLM shapes on an H100 (docs/kernels_gpu.md), each within 1% of
        # the best on every shape: (columns per program, warps, programs per SM that set the K-split)
        bn, warps, waves = _GEMV_TILES[gw.bits]
        return Config(1, bn, split_for(-(-n // bn), blocks, waves=waves), warps, 1)
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        return Config(bm, 64, split_for(-(-n // 64) * -(-m // bm), blocks, waves=2), 4, 3)
    return Config(128, 128, 1, 8, 3 if gw.per <= 8 else 2, wide=True)  # 2/3-bit: 256-column x tiles per stage


def tile_candidates(m: int, gw: GpuPackedWeight, dtype: torch.dtype = torch.bfloat16) -> list[Config]:
    """The tiles a latency table times for m token rows: `default_config` first, then, for decode (m <=
    TUNED_MAX_M), the near-winners of the tile sweeps that set the defaults (CUDA-core GEMV, integer-dot GEMV,
    Triton and Gluon tensor-core decode, int8 tensor-core decode, split-K GEMM) over a few K-splits; above it,
    the Hopper wgmma prefill's tiles (`gluon_wgmma.TILES`) where the device and weight allow, each also with the
    tiles of its last, part-filled round of CTAs in two K slices (`gluon_wgmma.linear`). The sweeps ran on four LLM
    shapes of one H100 and one H200; other shapes (a 1B model's 512x2048) and devices get the tile measured best
    for them."""
    default = default_config(m, gw, dtype)
    if m > TUNED_MAX_M:
        from . import gluon_wgmma
        device = gw.scales.device
        return list(dict.fromkeys([default] + [
            Config(bm, 16 * warps, split, warps, stages, wgmma=True) for bm, warps, stages in gluon_wgmma.TILES
            for split in gluon_wgmma.SPLITS
            if gluon_wgmma.unsupported_reason(gw, dtype, device, bm, warps, split) is None]))
    n, blocks = gw.shape[0], gw.planes[0].shape[0] // WORD_ROWS

    def tile(bm: int, bn: int, warps: int, waves: int, stages: int = 1, mma: bool = False,
             gluon: bool = False) -> Config:
        return Config(bm, bn, split_for(-(-n // bn) * -(-m // bm), blocks, waves=waves), warps, stages, mma=mma,
                      gluon=gluon)

    tiles = [default]
    if m <= GEMV_MAX_M:
        tiles += [tile(1, bn, warps, waves) for bn, warps, waves in _GEMV_ALTERNATIVES]
        from .dp4a_linear import supported
        if supported(gw):
            tiles += [Config(1, bn, split_for(-(-n // bn), blocks, waves=waves), warps, 1, dp4a=True)
                      for bn, warps, waves in _DP4A_TILES]
    else:
        tiles += [tile(16, bn, 4, waves, stages) for bn, waves, stages in ((64, 2, 3), (64, 4, 4), (128, 2, 3))]
    from .gluon_imma import unsupported_reason
    tiles += [Config(m, bn, split_for(-(-n // bn), blocks, waves=waves), warps, stages, imma=True)
              for bn, warps, waves, stages in _IMMA_TILES
              if unsupported_reason(gw, m, bn, warps, gw.scales.device) is None]
    if dtype == torch.bfloat16 and m <= MMA_MAX_M and mma_supported(gw):
        bm = 1 << (m - 1).bit_length()
        bn, warps, waves = _MMA_TILES[gw.bits]
        tiles += [tile(bm, bn, warps, waves, mma=True), tile(bm, bn, warps, 2 * waves, mma=True)]
        if gluon_available(gw.scales.device):
            tiles += [tile(bm, bn, 4, waves, mma=True, gluon=True) for bn, waves in ((128, 4), (128, 8), (128, 16),
                                                                                       (256, 8))]
    return list(dict.fromkeys(tiles))


def config_error(cfg: Config, m: int, gw: GpuPackedWeight, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `linear` cannot run m rows of `dtype` on `device` with `cfg` (None: it can). The tensor-core decode
    tiles have conditions: 2..6 bits, bfloat16, at most block_m rows; Gluon also needs a device that runs it. The
    dp4a decode needs block_m 1 and groups of whole or half K blocks (`dp4a_linear.supported`); the int8
    tensor-core decode, also a device that runs Gluon and at most block_m tokens (`gluon_imma.unsupported_reason`)."""
    if cfg.wgmma:
        from .gluon_wgmma import unsupported_reason
        if cfg.dp4a or cfg.mma or cfg.wide or cfg.gluon or cfg.imma or cfg.block_n != 16 * cfg.num_warps:
            return (f"config {cfg.label} (wgmma) is its own prefill: no D, T, W, G or I, and block_n = 16 x "
                    "num_warps")
        reason = unsupported_reason(gw, dtype, device, cfg.block_m, cfg.num_warps, cfg.split_k)
        return None if reason is None else f"config {cfg.label}: {reason}"
    if cfg.imma:
        from .gluon_imma import unsupported_reason
        if cfg.dp4a or cfg.mma or cfg.wide or cfg.gluon or m > cfg.block_m:
            return (f"config {cfg.label} (imma) is its own decode: no D, T, W or G, and at most block_m tokens; "
                    f"got {m} rows")
        reason = unsupported_reason(gw, cfg.block_m, cfg.block_n, cfg.num_warps, device)
        return None if reason is None else f"config {cfg.label}: {reason}"
    if cfg.dp4a:
        from .dp4a_linear import supported
        if cfg.block_m != 1 or cfg.mma or cfg.wide or not supported(gw):
            return (f"config {cfg.label} (dp4a) needs block_m 1 and groups of whole K blocks ({gw.block} columns), "
                    f"or of half blocks below 8 bits; got block_m {cfg.block_m}, {gw.bits}-bit, group {gw.group}")
        return None
    if not cfg.mma:
        return None
    if not mma_supported(gw) or m > cfg.block_m or cfg.block_m & (cfg.block_m - 1) or dtype != torch.bfloat16:
        return (f"config {cfg.label} runs 2..6-bit weights and up to block_m (a power of 2) bfloat16 token rows; "
                f"got {gw.bits}-bit, {m} rows of {dtype}")
    if cfg.gluon:
        if not gluon_available(device):
            return (f"config {cfg.label} needs Triton >= 3.6 (Gluon) and a CUDA device of compute capability 8.0 or "
                    "newer (Gluon does not run in the CPU interpreter)")
        tiles = cfg.block_n // (16 * cfg.num_warps)
        if cfg.block_n % (16 * cfg.num_warps) or tiles < 1 or tiles & (tiles - 1):
            return f"config {cfg.label}: the Gluon kernel needs block_n = 16 * num_warps * a power of 2"
    return None


def k_slices(kw: int, split_k: int) -> tuple[int, int]:
    """(word rows per K-slice, a whole number of K blocks; slices) for `kw` word rows cut about `split_k` ways."""
    rows = -(-(-(-kw // split_k)) // WORD_ROWS) * WORD_ROWS
    return rows, -(-kw // rows)


def split_for(programs: int, blocks: int, waves: int = 4, sms: int = 132) -> int:
    """K-slices giving about `waves` programs per SM, at least one K block per slice."""
    return max(1, min(-(-waves * sms // programs), blocks))


def _args(gw: GpuPackedWeight):
    widths = gw.widths
    p1 = gw.planes[1] if len(widths) > 1 else gw.planes[0]
    z = gw.zeros if gw.zeros is not None else gw.scales
    if gw.zeros is not None and gw.zeros.stride() != gw.scales.stride():
        raise ValueError("scales and zeros must have the same strides")
    return dict(p0=gw.planes[0], p1=p1, s=gw.scales, z=z, stride_sg=gw.scales.stride(0),
                stride_sn=gw.scales.stride(1)), dict(
        PER=gw.per, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0,
        ZERO=float(1 << (gw.bits - 1)), HAS_Z=gw.zeros is not None)


def _slots_per_scale(gw: GpuPackedWeight) -> int:
    """Slots (16 input columns) sharing one scale load: a whole block when groups span blocks, a group when
    groups tile a block; 0 when groups and blocks do not nest (a scale per slot)."""
    if gw.group % gw.block == 0:
        return gw.per
    return gw.group // WORD_ROWS if gw.block % gw.group == 0 and gw.group % WORD_ROWS == 0 else 0


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial sums and int32 arrival counters for split-K, one pair per (device, stream): every
    split-K launch leaves them zeroed again, so launches on one stream reuse them without a memset."""
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < counters:
        # generous first sizes (4 MiB): growing while a CUDA graph is captured puts a memset into that graph
        ws = torch.zeros(max(floats, 1 << 20, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(counters, 1 << 16, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACES[key] = ws, cnt
    return ws, cnt


def dequantize(gw: GpuPackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight transposed, [K, N] in `dtype`, computed on the GPU."""
    n, k = gw.shape
    kw = gw.planes[0].shape[0]
    out = torch.empty(k, n, dtype=dtype, device=gw.scales.device)
    tensors, consts = _args(gw)
    grid = (kw // WORD_ROWS, triton.cdiv(n, 128))
    _dequant_kernel[grid](out=out, N=n, K=k, KW=kw, G=gw.group, ASM=ASM, BN=128, **tensors, **consts)
    return out


_warned: set[str] = set()


def _fallback(x2: torch.Tensor, gw: GpuPackedWeight, why: str) -> torch.Tensor:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"triton_linear: {why}; using dequantize + matmul for this weight", stacklevel=3)
    return x2 @ dequantize(gw, x2.dtype)


def linear(x: torch.Tensor, gw: GpuPackedWeight, config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T for x [..., K] (float16 / bfloat16, CUDA) and a GPU-layout weight W [N, K]."""
    n, k = gw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x.dtype={x.dtype} is not supported; use float16 or bfloat16")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not fused_supported(gw):
        return _fallback(x2, gw, f"group width {gw.group} is not a multiple of 32").view(*lead, n)
    cfg = config or default_config(m, gw, x.dtype)
    error = config_error(cfg, m, gw, x.dtype, x.device)
    if error is not None:
        raise ValueError(error)
    if cfg.dp4a:
        from . import dp4a_linear
        return dp4a_linear.linear(x2, gw, cfg).view(*lead, n)
    if cfg.imma:
        from . import gluon_imma
        return gluon_imma.linear(x2, gw, cfg.block_n, cfg.split_k, cfg.num_warps, cfg.num_stages > 1).view(*lead, n)
    if cfg.wgmma:
        from . import gluon_wgmma
        return gluon_wgmma.linear(x2, gw, cfg.block_m, cfg.num_warps, cfg.num_stages, cfg.split_k).view(*lead, n)
    kw = gw.planes[0].shape[0]
    rows_per_split, split = k_slices(kw, cfg.split_k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tensors, consts = _args(gw)
    common = dict(N=n, K=k, KW=kw, G=gw.group, rows_per_split=rows_per_split, SPLIT=split, stride_xm=x2.stride(0),
                  stride_om=out.stride(0), ATOMIC=split > 1, SPS=_slots_per_scale(gw), EVEN_K=k % gw.block == 0,
                  ASM=ASM, BN=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tensors, **consts)
    if cfg.mma:
        grid = (triton.cdiv(n, cfg.block_n), split)
        ws, cnt = _workspace(x.device, m * n, grid[0]) if split > 1 else (out, out)
        run = math.gcd(gw.per // 2, gw.group // 16)  # fields of a half sharing one group
        mma_args = {a: v for a, v in common.items() if a != "SPS"}
        nc = 2 * cfg.block_m * (gw.per // 2 // run)
        if cfg.gluon:
            from .gluon_linear import gemv_mma_gluon  # Gluon: CUDA only (no CPU interpreter)
            del mma_args["ASM"]
            gemv_mma_gluon[grid](x2, out=out, ws=ws, cnt=cnt, M=m, RUN=run, NC=nc, NCP=max(8, nc),
                                 TOK=cfg.block_m, WARPS=cfg.num_warps, **mma_args)
        else:
            _gemv_mma_kernel[grid](x2, out=out, ws=ws, cnt=cnt, M=m, RUN=run, NC=nc, **mma_args)
    elif m <= GEMV_MAX_M and cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        ws, cnt = _workspace(x.device, m * n, m * grid[0]) if split > 1 else (out, out)
        _gemv_kernel[grid](x2, out=out, ws=ws, cnt=cnt, byte_magic=142 << 23, **common)
    elif cfg.wide and split == 1:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _gemm_wide_kernel[grid](x2, out=out, M=m, N=n, K=k, KW=kw, G=gw.group, stride_xm=x2.stride(0),
                                stride_om=out.stride(0), EVEN_K=common["EVEN_K"], BM=cfg.block_m, BN=cfg.block_n,
                                GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tensors, **consts)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        ws, cnt = _workspace(x.device, m * n, grid[0]) if split > 1 else (out, out)
        if split > 1 and m % cfg.block_m and PART_BLOCK_UNPIPELINED:
            # pipelined, split-K and fewer rows than the block: on an H200 (triton 3.6) about 1 call in 4 summed
            # a tile wrong (relative error 2-5e-2 at 28672x8192, 4 tokens); unpipelined, or with whole blocks,
            # none in 16-40 calls each (session 21). Cause not found: that case runs unpipelined.
            common["num_stages"] = 1
        _gemm_kernel[grid](x2, out=out, ws=ws, cnt=cnt, M=m, BM=cfg.block_m, GROUP_M=8, **common)
    return out.view(*lead, n)


def dequant_matmul(x: torch.Tensor, gw: GpuPackedWeight) -> torch.Tensor:
    """Dequantize on the GPU, then cuBLAS: the prefill fallback."""
    return (x.reshape(-1, gw.shape[1]) @ dequantize(gw, x.dtype)).view(*x.shape[:-1], gw.shape[0])
