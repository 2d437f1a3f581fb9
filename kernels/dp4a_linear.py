"""One-token decode on integer dot products (`Config(dp4a=True)`): 4 codes x 4 activation bytes per instruction.

The float GEMV (`triton_linear._gemv_kernel`) spends a LOP3 and an FMA on every code, and is bound by issue slots,
not by bytes. Here the codes stay integers: `dp4a` multiplies the 4 byte fields of one register by 4 activation
bytes and adds them into an int32, so the integer work per code drops to a mask and half a `dp4a` per digit.

Activations: `prepare_x` (one small kernel) writes x as 16-bit fixed point per K block of the GPU layout (16 word
rows, `GpuPackedWeight.block` input columns): v = round(x * 2^(S - e)) with 2^e above the block's largest |x| and S
= 14, split into a signed high byte and an unsigned low byte ("digits"), each packed 4 to a word in the order the
weight's byte fields come out. The error is at most half a step, 2^(e - 15), under 2^-14 of the block's largest |x|
and 64 times finer than bfloat16's own resolution at that element; elements within 2^6 of the block's largest are
exact. It also writes each block's 2^(e - S) and the sum of its v per half block (the zero point comes off through
it).

Weights: field f of every byte of a plane-0 word is one mask (and a shift): codes of slots f, c + f, 2c + f,
3c + f (c codes per byte). A second plane (3 = 2+1, 5 = 4+1, 6 = 4+2) is spread so that its fields sit in the
same bytes, then OR-ed above (exact codes < 2^(w0 + w1) per byte). When a group is half a block (2/3-bit at group
128, 4/5/6-bit at 64), two fields are regrouped by byte permutes (PRMT) so that each word's 4 codes share one
group. Per block and column: an int32 per digit (and half), turned into float once, times 2^(e - S), minus
zero * (sum of v), times the group's scale. Under Triton's CPU interpreter (no inline PTX) `dp4a` and PRMT run as
plain integer operations.
"""
from __future__ import annotations

import torch

from . import triton_linear as tlin
from .gpu_layout import WORD_ROWS, GpuPackedWeight

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAVE_TRITON = False

FRACTION_BITS = 14  # S: |v| <= 2^14, so the high digit fits a signed byte
E_MIN, E_MAX = -100, 129  # block exponents are clamped here (2^(S - e) and 2^(e - S) stay normal floats)


def supported(gw: GpuPackedWeight) -> bool:
    """Whether the dp4a decode runs this weight: groups of whole K blocks (per-channel included), or of half
    blocks where a byte holds 2 or more codes (not 8-bit)."""
    return gw.group % gw.block == 0 or (gw.widths[0] <= 4 and gw.group % (gw.block // 2) == 0)


def _regroup(gw: GpuPackedWeight) -> bool:
    return gw.group % gw.block != 0


if HAVE_TRITON:
    @triton.constexpr_function
    def _byte_mask(width: int, at: int) -> int:
        """A field of `width` bits at bit `at` of each of the 4 bytes (as a signed int32 constant)."""
        m = (((1 << width) - 1) << at) * 0x01010101
        return m - (1 << 32) if m >= 1 << 31 else m

    @triton.jit
    def _shift(v, right: tl.constexpr):
        """v >> right (left when negative)."""
        if right > 0:
            return v >> right
        elif right < 0:
            return v << (-right)
        else:
            return v

    @triton.jit
    def _spread(b, C: tl.constexpr):
        """Second-plane word b (int32 from int16 / int8): its C-bit chunk k (the fields of plane 0's byte k) moved
        to byte k."""
        t = (b & ((1 << 2 * C) - 1)) | ((b << (16 - 2 * C)) & (((1 << 2 * C) - 1) << 16))
        return (t | (t << (8 - C))) & _byte_mask(C, 0)

    @triton.jit
    def _fields(w, s1, f: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, AT: tl.constexpr):
        """Field f of each byte of plane-0 words w (the codes of slots f, c + f, 2c + f, 3c + f), with the second
        plane's field f of the spread words s1 above it (W1 > 0), at bit AT of each byte (code x 2^AT: a shift
        fewer when the field already sits there)."""
        if W0 == 8:
            e = w
        else:
            e = _shift(w, f * W0 - AT) & _byte_mask(W0, AT)
        if W1 > 0:
            e = e | (_shift(s1, f * W1 - W0 - AT) & _byte_mask(W1, W0 + AT))
        return e

    @triton.jit
    def _prmt(a, b, sel: tl.constexpr, ASM: tl.constexpr):
        """Bytes of (a, b) picked by selector 0x5410 ([a0, a1, b0, b1]) or 0x7632 ([a2, a3, b2, b3])."""
        if ASM:
            return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {sel};", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        elif sel == 0x5410:
            return (a & 0xFFFF) | (b << 16)
        else:
            return ((a >> 16) & 0xFFFF) | (b & -65536)

    @triton.jit
    def _dp4a(codes, xw, acc, SIGNED: tl.constexpr, ASM: tl.constexpr):
        """acc + sum over the 4 bytes of codes (unsigned) * xw (signed bytes if SIGNED, else unsigned)."""
        xb = (acc & 0) + xw  # x broadcast to acc's shape (no layout needed: also callable from Gluon)
        if ASM:
            if SIGNED:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [codes, xb, acc],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, $2, $3;", "=r,r,r,r", [codes, xb, acc],
                                                 dtype=tl.int32, is_pure=True, pack=1)
        else:
            lane = 8 * tl.arange(0, 4)
            c = (codes[:, None] >> lane[None, :]) & 255
            if SIGNED:
                d = (xb[:, None] << (24 - lane)[None, :]) >> 24
            else:
                d = (xb[:, None] >> lane[None, :]) & 255
            return acc + tl.sum(c * d, axis=1)

    @triton.jit
    def _load_row(p, row, N, cols, nmask, EVEN_N: tl.constexpr):
        """Words of one word row at the tile's columns, as int32."""
        if EVEN_N:
            return tl.load(p + row * N + cols).to(tl.int32)
        else:
            return tl.load(p + row * N + cols, mask=nmask, other=0).to(tl.int32)

    @triton.jit
    def _max_and_sum(a0, b0, a1, b1):
        return tl.maximum(a0, a1), b0 + b1

    @triton.jit
    def _sums(a0, b0, a1, b1):
        return a0 + a1, b0 + b1

    @triton.jit
    def _fixed_point(x, b, m, K, stride_xm, PER: tl.constexpr, S: tl.constexpr, E_LO: tl.constexpr,
                     E_HI: tl.constexpr):
        """K blocks b (a vector) of token m as v = round(x 2^(S - e)): (v int32 [len(b), 16 PER]
        with the block's input columns in order (slot i // 16, word row i % 16), i, 2^(e - S) (NaN when the
        block holds NaN / Inf), sum of v per half block (two vectors))."""
        i = tl.arange(0, 16 * PER)[None, :]
        col = b[:, None] * 16 * PER + i
        v = tl.load(x + m * stride_xm + col, mask=col < K, other=0.0).to(tl.float32)
        amax, poison = tl.reduce((tl.abs(v), v * 0.0), 1, _max_and_sum)  # poison: NaN if x has NaN / Inf
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 255) - 126  # amax < 2^e
        e = tl.minimum(tl.maximum(e, E_LO), E_HI)
        up = ((127 + S - e) << 23).to(tl.float32, bitcast=True)
        down = ((127 + e - S) << 23).to(tl.float32, bitcast=True)
        down = down + poison  # NaN / Inf in x give NaN out
        fixed = tl.floor(v * up[:, None] + 0.5)
        fixed = tl.where(fixed == fixed, fixed, 0.0).to(tl.int32)
        first = i < 8 * PER
        half0, half1 = tl.reduce((tl.where(first, fixed, 0), tl.where(first, 0, fixed)), 1, _sums)
        return fixed, i, down, half0, half1

    @triton.jit
    def _prep_kernel(x, xq, xs, xz, K, KW, NB, stride_xm, PER: tl.constexpr, CPB: tl.constexpr,
                     REGROUP: tl.constexpr, S: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr):
        """One K block of one token: digits [16 word rows, CPB words, 2] (each element stores its two bytes),
        2^(e - S), sum of v per half."""
        m = tl.program_id(1)
        b = tl.program_id(0) + tl.arange(0, 1)
        fixed, i, down, half0, half1 = _fixed_point(x, b, m, K, stride_xm, PER, S, E_LO, E_HI)
        slot = i // 16
        if REGROUP:  # slot CPB (2 (q % 2) + lane % 2) + 2 (q // 2) + lane // 2 sits in byte `lane` of word q
            hi_u, lo_v = slot // CPB, slot % CPB
            q = 2 * (lo_v // 2) + hi_u // 2
            lane = 2 * (lo_v % 2) + hi_u % 2
        else:  # slot CPB lane + q sits in byte `lane` of word q
            q = slot % CPB
            lane = slot // CPB
        word = (m * KW + b[:, None] * 16 + i % 16) * CPB + q
        byte = xq.to(tl.pointer_type(tl.int8)) + word * 8 + lane
        tl.store(byte, (fixed & 255).to(tl.int8))
        tl.store(byte + 4, (fixed >> 8).to(tl.int8))
        tl.store(xs + m * NB + b, down)
        tl.store(xz + (m * NB + b) * 2, half0.to(tl.float32) * down)
        tl.store(xz + (m * NB + b) * 2 + 1, half1.to(tl.float32) * down)

    @triton.jit
    def _block_sums(words, spread, xrow, lo0, hi0, lo1, hi1, CPB: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                    REGROUP: tl.constexpr, ASM: tl.constexpr):
        """A K block's digit sums added to the accumulators: low digit (lo*) and high digit (hi*), of the block
        (lo0, hi0) or of its two halves (REGROUP: *0 and *1). `words` / `spread`: its 16 word rows of plane 0 and the
        spread plane 1; `xrow`: its digit words from `prepare_x`. Each field is summed over the 16 rows for the low
        digit, then again for the high one, which keeps the rows' loads ahead of their first use."""
        if REGROUP:
            for p in tl.static_range(CPB // 2):
                firsts = ()
                seconds = ()
                for j in tl.static_range(16):
                    ea = _fields(words[j], spread[j], 2 * p, W0, W1, 0)
                    eb = _fields(words[j], spread[j], 2 * p + 1, W0, W1, 0)
                    firsts = firsts + (_prmt(ea, eb, 0x5410, ASM),)
                    seconds = seconds + (_prmt(ea, eb, 0x7632, ASM),)
                    lo0 = _dp4a(firsts[j], tl.load(xrow + 2 * CPB * j + 4 * p), lo0, False, ASM)
                    lo1 = _dp4a(seconds[j], tl.load(xrow + 2 * CPB * j + 4 * p + 2), lo1, False, ASM)
                for j in tl.static_range(16):
                    hi0 = _dp4a(firsts[j], tl.load(xrow + 2 * CPB * j + 4 * p + 1), hi0, True, ASM)
                    hi1 = _dp4a(seconds[j], tl.load(xrow + 2 * CPB * j + 4 * p + 3), hi1, True, ASM)
        else:
            for f in tl.static_range(CPB):
                codes = ()
                for j in tl.static_range(16):
                    codes = codes + (_fields(words[j], spread[j], f, W0, W1, 0),)
                    lo0 = _dp4a(codes[j], tl.load(xrow + 2 * CPB * j + 2 * f), lo0, False, ASM)
                for j in tl.static_range(16):
                    hi0 = _dp4a(codes[j], tl.load(xrow + 2 * CPB * j + 2 * f + 1), hi0, True, ASM)
        return lo0, hi0, lo1, hi1

    @triton.jit
    def _add_block(acc, lo0, hi0, lo1, hi1, r0, m, s, z, xs, xz, cols, nmask, K, NB, G, stride_sg, stride_sn,
                   PER: tl.constexpr, ZERO: tl.constexpr, HAS_Z: tl.constexpr, REGROUP: tl.constexpr):
        """acc + the K block at word row r0, in float: its digit sums times 2^(e - S), less zero point x sum of v,
        times the group's scale (per half block when REGROUP)."""
        blk = r0 // 16
        down = tl.load(xs + m * NB + blk)
        c0 = r0 * PER
        if REGROUP:
            c1 = c0 + 8 * PER
            sc0, zero0 = tlin._scale_zero(s, z, (c0 // G) * stride_sg + cols * stride_sn, nmask, ZERO, HAS_Z)
            sc1, zero1 = tlin._scale_zero(s, z, (c1 // G) * stride_sg + cols * stride_sn, nmask & (c1 < K), ZERO,
                                          HAS_Z)
            t0 = (hi0.to(tl.float32) * 256.0 + lo0.to(tl.float32)) * down - zero0 * tl.load(xz + (m * NB + blk) * 2)
            t1 = (hi1.to(tl.float32) * 256.0 + lo1.to(tl.float32)) * down - zero1 * tl.load(
                xz + (m * NB + blk) * 2 + 1)
            acc += t0 * sc0 + t1 * sc1
        else:
            sc, zero = tlin._scale_zero(s, z, (c0 // G) * stride_sg + cols * stride_sn, nmask, ZERO, HAS_Z)
            xsum = tl.load(xz + (m * NB + blk) * 2) + tl.load(xz + (m * NB + blk) * 2 + 1)
            acc += ((hi0.to(tl.float32) * 256.0 + lo0.to(tl.float32)) * down - zero * xsum) * sc
        return acc

    @triton.jit(do_not_specialize=["K", "KW", "NB", "G", "rows_per_split", "SPLIT", "zero_word"])
    def _gemv_dp4a_kernel(xq, xs, xz, p0, p1, s, z, out, ws, cnt, N, K, KW, NB, G, stride_sg, stride_sn,
                          rows_per_split, SPLIT, stride_om, zero_word, PER: tl.constexpr, W0: tl.constexpr,
                          W1: tl.constexpr, ZERO: tl.constexpr, HAS_Z: tl.constexpr, ATOMIC: tl.constexpr,
                          REGROUP: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        CPB: tl.constexpr = 8 // W0
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        acc = tl.zeros([BN], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            lo0 = tl.zeros([BN], dtype=tl.int32)
            hi0 = tl.zeros([BN], dtype=tl.int32)
            lo1 = tl.zeros([BN], dtype=tl.int32)
            hi1 = tl.zeros([BN], dtype=tl.int32)
            words = ()
            spread = ()
            for j in tl.static_range(16):
                words = words + (_load_row(p0, r0 + j, N, cols, nmask, EVEN_N),)
                if W1 > 0:
                    spread = spread + (_spread(_load_row(p1, r0 + j, N, cols, nmask, EVEN_N), W1 * CPB),)
                else:
                    spread = words
            if CPB == 1 or (REGROUP and CPB == 2):
                # one pass over the rows: ptxas would sink each load to its row's use (one load in flight per
                # thread); folding all 16 rows into the first accumulator times a run-time zero makes every row
                # needed up front (2/4-bit with whole-block groups make several passes, which keeps them hoisted)
                folded = words[0]
                for j in tl.static_range(1, 16):
                    folded = folded ^ words[j]
                lo0 = folded & zero_word
            lo0, hi0, lo1, hi1 = _block_sums(words, spread, xq + ((m * KW + r0) * CPB) * 2, lo0, hi0, lo1, hi1, CPB, W0,
                                             W1, REGROUP, ASM)
            acc = _add_block(acc, lo0, hi0, lo1, hi1, r0, m, s, z, xs, xz, cols, nmask, K, NB, G, stride_sg, stride_sn,
                             PER, ZERO, HAS_Z, REGROUP)
        tlin._finish(acc, out + m * stride_om + cols, ws + m * N + cols, nmask, cnt + m * tl.num_programs(0) + pid_n,
                SPLIT, ATOMIC)


def _x_buffers(x2: torch.Tensor, gw: GpuPackedWeight) -> tuple[torch.Tensor, ...]:
    """Uninitialised digits int32 [M, KW, c, 2], 2^(e - S) float32 [M, blocks], sums of v per half block float32
    [M, blocks, 2]."""
    m = x2.shape[0]
    kw = gw.planes[0].shape[0]
    nb = kw // WORD_ROWS
    return (torch.empty(m, kw, 8 // gw.widths[0], 2, dtype=torch.int32, device=x2.device),
            torch.empty(m, nb, dtype=torch.float32, device=x2.device),
            torch.empty(m, nb, 2, dtype=torch.float32, device=x2.device))


def prepare_x(x2: torch.Tensor, gw: GpuPackedWeight) -> tuple[torch.Tensor, ...]:
    """x [M, K] (float16 / bfloat16, unit stride along K) as the dp4a decode reads it (`_x_buffers`), by one
    program per K block and token."""
    m, k = x2.shape
    xq, xs, xz = _x_buffers(x2, gw)
    kw, nb = xq.shape[1], xs.shape[1]
    _prep_kernel[(nb, m)](x2, xq, xs, xz, k, kw, nb, x2.stride(0), PER=gw.per, CPB=xq.shape[2], REGROUP=_regroup(gw),
                          S=FRACTION_BITS, E_LO=E_MIN, E_HI=E_MAX, num_warps=1)
    return xq, xs, xz


def linear(x2: torch.Tensor, gw: GpuPackedWeight, cfg: "tlin.Config") -> torch.Tensor:
    """y = x2 @ W^T for x2 [M, K] (float16 / bfloat16, unit stride along K): `prepare_x`, then one program per
    (column tile, K-slice, token); split-K sums go through `triton_linear`'s workspace."""
    m, k = x2.shape
    n = gw.shape[0]
    kw = gw.planes[0].shape[0]
    rows_per_split, split = tlin.k_slices(kw, cfg.split_k)
    xq, xs, xz = prepare_x(x2, gw)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(n, cfg.block_n), split, m)
    ws, cnt = tlin._workspace(x2.device, m * n, m * grid[0]) if split > 1 else (out, out)
    tensors, consts = tlin._args(gw)
    _gemv_dp4a_kernel[grid](xq, xs, xz, out=out, ws=ws, cnt=cnt, N=n, K=k, KW=kw, NB=kw // WORD_ROWS, G=gw.group,
                            rows_per_split=rows_per_split, SPLIT=split, stride_om=out.stride(0), zero_word=0,
                            ATOMIC=split > 1, REGROUP=_regroup(gw), EVEN_N=n % cfg.block_n == 0, ASM=tlin.ASM,
                            BN=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **tensors, **consts)
    return out
