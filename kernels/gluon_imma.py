"""Decode on int8 tensor cores (Gluon): the dp4a decode's integer arithmetic, done by `mma.sync` m16n8k32.

`dp4a_linear` multiplies 4 codes by 4 activation bytes per `dp4a`, per thread and output column: at 2 bits that is
24-26 instructions per 16-code word, and session 18's profile found it short of resident warps. Here
one int8 mma multiplies the codes of 16 output columns x 32 input columns by 8 activation columns (a launch has
8, 16 or 32 such columns, `columns`):
- A (the weight): a field of a word (`dp4a_linear._fields`: 4 codes, one per byte) is already a register of the
  int8 A operand once the words are loaded in mma_v2's operand layout (`gluon_linear._word_layout`): a mask (and a
  shift for some fields) per 4 codes, no shared memory. At 2 and 3 bits the odd fields stay where they sit (code x
  4, no shift), and their activations go to columns of their own that the epilogue weights by 1/4.
- B (the activations): column c is one (token, field class, half block, digit) of x in 16-bit fixed point per K
  block (as the dp4a decode's: v = round(x 2^(S - e)), 2^e above the block's largest |x|), split into two signed
  bytes v = 256 hi + lo. `prepare_x` writes them already in the B operand's register order, the other columns'
  bytes zeroed, so each thread loads its B registers with vector loads and does no work on them. Groups of half
  a K block get a column per half, so they need no byte permutes.
Per block, the int32 sums of each column become float once: times 2^(e - S) (and 256 for a high digit, 1/4 for the
odd-field class), less zero point x sum of v (once per token and half), times the group's scale; a token's columns
are added at the end. 8-bit codes do not fit a signed byte: they go in as code - 128, and the zero point moves by
128. One launch takes up to 16 tokens (8 with half-block groups).
Needs Triton's Gluon and a CUDA device with mma.sync (compute capability 8.0 or newer) for the GEMV; `prepare_x`
is plain Triton (it also runs in the CPU interpreter). Its tiles (`triton_linear.Config` with imma) are among those
a latency table measures for decode, and a layer runs the one measured fastest; first run on a GPU in session 21
(docs/kernels_gpu.md, "Session 21").
"""
from __future__ import annotations

import torch

from . import dp4a_linear as dl
from . import triton_linear as tlin
from .gpu_layout import WORD_ROWS, GpuPackedWeight

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .gluon_linear import _column_of_row, _relabel, _store_tokens, _word_layout
    HAVE_GLUON = True
except ImportError:  # Triton without Gluon, or no Triton
    HAVE_GLUON = False

MIN_COLUMNS, MAX_COLUMNS = 8, 32  # the mma's n is 8; 64 columns spill registers (offline sm_90a compile)


def halves(gw: GpuPackedWeight) -> int:
    """Columns per token and digit for the half blocks: 2 when groups are half a K block, else 1."""
    return 2 if dl._regroup(gw) else 1


def max_tokens(gw: GpuPackedWeight) -> int:
    """Tokens one launch takes: MAX_COLUMNS / (2 digits x halves)."""
    return MAX_COLUMNS // (2 * halves(gw))


def classes(gw: GpuPackedWeight, m: int) -> int:
    """Field classes for m tokens: 2 (odd fields unshifted, code x 4, in columns of their own) for 2 and 3 bits
    when that needs no more than the 8 columns of one mma, else 1."""
    return 2 if gw.widths[0] == 2 and 4 * halves(gw) * m <= MIN_COLUMNS else 1


def columns(gw: GpuPackedWeight, m: int) -> int:
    """Activation columns of a launch for m tokens: a power of 2, at least the mma's 8."""
    return max(MIN_COLUMNS, 1 << (2 * halves(gw) * classes(gw, m) * m - 1).bit_length())


def unsupported_reason(gw: GpuPackedWeight, m: int, block_n: int, num_warps: int,
                       device: torch.device) -> str | None:
    """Why the int8 tensor-core decode cannot run m tokens of this weight with this tile on `device` (None: it
    can)."""
    if not (HAVE_GLUON and tlin.gluon_available(device)):
        return ("the int8 tensor-core decode needs Triton >= 3.6 (Gluon) and a CUDA device of compute capability 8.0 "
                "or newer (Gluon does not run in the CPU interpreter)")
    if not dl.supported(gw):
        return f"the dp4a decode does not run group {gw.group} at {gw.bits} bits (dp4a_linear.supported)"
    if not 1 <= m <= max_tokens(gw):
        return f"{m} tokens: this weight's groups leave room for 1..{max_tokens(gw)} tokens per launch"
    tiles = block_n // (16 * num_warps)
    if block_n % (16 * num_warps) or tiles < 1 or tiles & (tiles - 1):
        return f"block_n={block_n}: 16 x num_warps ({16 * num_warps}) times a power of 2"
    return None


if HAVE_TRITON:
    @triton.jit
    def _prep_kernel(x, xb, xs, xz, K, NB, stride_xm, PER: tl.constexpr, CPB: tl.constexpr, HALVES: tl.constexpr,
                     CLASSES: tl.constexpr, S: tl.constexpr, E_LO: tl.constexpr, E_HI: tl.constexpr):
        """One K block of one token: `dp4a_linear._fixed_point`, then every byte of the B operand (`_x_buffers`)."""
        blk = tl.program_id(0)
        m = tl.program_id(1)
        b = blk + tl.arange(0, 1)
        fixed, i, down, half0, half1 = dl._fixed_point(x, b, m, K, stride_xm, PER, S, E_LO, E_HI)
        lo = fixed & 255  # v = 256 hi + lo with both signed bytes: lo's bits are v's low byte
        hi = (fixed + 128) >> 8
        slot = i // 16
        j = i % 16  # word row 8 s + 4 p + t
        f = slot % CPB
        lane = slot // CPB
        cls = f % CLASSES
        half = (lane // 2) % HALVES
        ncols: tl.constexpr = 2 * HALVES * CLASSES
        word = (j % 4 * CPB + f) * 4 + (j // 8) * 2 + (j // 4) % 2
        for c in tl.static_range(CLASSES * HALVES):  # column pair (class c // HALVES, half c % HALVES)
            own = (cls == c // HALVES) & (half == c % HALVES)
            base = ((m * NB + blk) * ncols + 2 * c) * 16 * CPB
            byte = xb.to(tl.pointer_type(tl.int8)) + (base + word) * 4 + lane
            tl.store(byte, tl.where(own, lo, 0).to(tl.int8))
            tl.store(byte + 64 * CPB, tl.where(own, hi, 0).to(tl.int8))
        tl.store(xs + m * NB + b, down)
        tl.store(xz + (m * NB + b) * 2, half0.to(tl.float32) * down)
        tl.store(xz + (m * NB + b) * 2 + 1, half1.to(tl.float32) * down)


def _x_buffers(m: int, gw: GpuPackedWeight, device: torch.device, ncls: int) -> tuple[torch.Tensor, ...]:
    """Uninitialised B operand int32 [M, blocks, columns per token, 4 (t), CPB (field), 2 (s), 2 (p)] (word
    (t, f, s, p) of a column is field f of word row 8 s + 4 p + t of the block: B registers of lane t, field f,
    K step s), 2^(e - S) float32 [M, blocks], sums of v per half block float32 [M, blocks, 2]."""
    nb = gw.planes[0].shape[0] // WORD_ROWS
    return (torch.empty(m, nb, 2 * halves(gw) * ncls, 4, 8 // gw.widths[0], 2, 2, dtype=torch.int32, device=device),
            torch.empty(m, nb, dtype=torch.float32, device=device),
            torch.empty(m, nb, 2, dtype=torch.float32, device=device))


def prepare_x(x2: torch.Tensor, gw: GpuPackedWeight, ncls: int = 1) -> tuple[torch.Tensor, ...]:
    """x [M, K] (float16 / bfloat16, unit stride along K) as the int8 tensor-core decode reads it (`_x_buffers`),
    by one program per K block and token; `ncls` field classes (`classes`)."""
    m, k = x2.shape
    xb, xs, xz = _x_buffers(m, gw, x2.device, ncls)
    _prep_kernel[(xs.shape[1], m)](x2, xb, xs, xz, k, xs.shape[1], x2.stride(0), PER=gw.per, CPB=xb.shape[4],
                                   HALVES=halves(gw), CLASSES=ncls, S=dl.FRACTION_BITS, E_LO=dl.E_MIN,
                                   E_HI=dl.E_MAX, num_warps=1)
    return xb, xs, xz


if HAVE_GLUON:
    @gluon.constexpr_function
    def _b_layout(NC, CPB, WARPS):
        """Layout of the B words [NC columns, 16 CPB (t, f, s, p)] as loaded: each thread's 4 CPB words of a column
        are consecutive (vector loads); registers: those, then columns 8, 16, ...; lanes: t, then columns 1, 2, 4;
        every warp holds all of it."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1 << b] for b in range((4 * CPB).bit_length() - 1)]
            + [[8 << b, 0] for b in range((NC // 8).bit_length() - 1)],
            lane_bases=[[0, 4 * CPB], [0, 8 * CPB], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[0, 0]] * (WARPS.bit_length() - 1), block_bases=[], shape=[NC, 16 * CPB])

    @gluon.jit
    def _load_block(w0_ptrs, w1_ptrs, b_ptrs, nmask, valid, W1: gl.constexpr, EVEN_N: gl.constexpr,
                    GUARD: gl.constexpr):
        """A K block's words (both planes; the first again when there is no second) and B words, as loaded. With
        GUARD, nothing is loaded where `valid` is false (a prefetch past the K-slice). Masked-off values are left
        undefined: a column past N only feeds its own row of the mma, which is never stored."""
        if GUARD:
            bmask = valid
            wmask = nmask[:, None] & valid
        else:
            bmask = None
            wmask = None if EVEN_N else nmask[:, None]
        w0 = gl.load(w0_ptrs, mask=wmask)
        if W1 > 0:
            w1 = gl.load(w1_ptrs, mask=wmask)
        else:
            w1 = w0
        return w0, w1, gl.load(b_ptrs, mask=bmask)

    @gluon.jit
    def _as_bytes(e):
        """int32 [...] -> int8 [..., 2, 2]: the 4 bytes of each word (one register, no work)."""
        e4 = gl.join(gl.join(e, e), gl.join(e, e))
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [e4], dtype=gl.int8, is_pure=True, pack=4)

    @gluon.jit
    def _b_operands(bw, w_l: gl.constexpr, NC: gl.constexpr, CPB: gl.constexpr):
        """B words [NC, 16 CPB] -> per field the int8 [32 x 2 K steps, NC] operand (row 4 (8 s + 4 p + t) + byte).
        Each field's [16, NC] words go to w_l (the int32 B operand layout, the same registers) before `_as_bytes`,
        so that the bytes of one word become one register."""
        w = gl.permute(gl.reshape(bw, [NC, 4, CPB, 2, 2]), (3, 4, 1, 0, 2))  # [s, p, t, column, field]
        w = gl.reshape(w, [16, NC, CPB])
        if CPB == 1:
            fields = (gl.reshape(w, [16, NC]),)
        elif CPB == 2:
            fields = gl.split(w)
        else:
            even, odd = gl.split(gl.reshape(w, [16, NC, 2, 2]))  # field 2a + b: split b, then a
            f0, f2 = gl.split(even)
            f1, f3 = gl.split(odd)
            fields = (f0, f1, f2, f3)
        out = ()
        for f in gl.static_range(CPB):
            e = gl.convert_layout(fields[f], w_l, assert_trivial=True)
            out = out + (gl.reshape(gl.permute(_as_bytes(e), (0, 2, 3, 1)), [64, NC]),)
        return out

    @gluon.jit
    def _gemv_imma_kernel(xb, xs, xz, p0, p1, s, z, out, ws, cnt, M, N, K, KW, NB, stride_sg, stride_sn, inv_g,
                          rows_per_split, SPLIT, stride_om, PER: gl.constexpr, W0: gl.constexpr, W1: gl.constexpr,
                          ZERO: gl.constexpr, HAS_Z: gl.constexpr, ATOMIC: gl.constexpr, HALVES: gl.constexpr,
                          CLASSES: gl.constexpr, NC: gl.constexpr, EVEN_N: gl.constexpr, PREFETCH: gl.constexpr,
                          BN: gl.constexpr, WARPS: gl.constexpr):
        CPB: gl.constexpr = 8 // W0
        NCT: gl.constexpr = 2 * HALVES * CLASSES  # columns per token
        TOK: gl.constexpr = NC // NCT
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
        w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=1)
        wb_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=1)
        v_l: gl.constexpr = _word_layout(BN, WARPS)
        x_l: gl.constexpr = _b_layout(NC, CPB, WARPS)
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, v_l))
        nmask = n < N
        j16 = gl.arange(0, 16, layout=gl.SliceLayout(0, v_l))
        bc = gl.arange(0, NC, layout=gl.SliceLayout(1, x_l))
        # columns of absent tokens read token 0's (finite integers, weighted by 0 below): no masked loads
        btok = gl.where(bc // NCT < M, bc // NCT, 0)
        b_ptrs = xb + ((btok * NB * NCT + bc % NCT)[:, None] * (16 * CPB)
                       + gl.arange(0, 16 * CPB, layout=gl.SliceLayout(0, x_l))[None, :])

        oc = gl.arange(0, NC, layout=gl.SliceLayout(0, mma))
        otok = oc // NCT
        tmask = otok < M
        digit = oc % 2
        ohalf = (oc // 2) % HALVES
        ocls = oc // (2 * HALVES) % CLASSES
        weight = gl.where(digit == 1, 256.0, 1.0) * gl.where(ocls == 1, 0.25, 1.0)
        first = (digit == 0) & (ocls == 0)  # the column that takes the zero point off, once per token and half
        on = pid_n * BN + _column_of_row(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), BN, WARPS)
        onmask = on < N
        total = gl.zeros([BN, NC], gl.float32, layout=mma)
        r_lo = pid_k * rows_per_split
        r_hi = gl.minimum(r_lo + rows_per_split, KW)
        offs = (r_lo + j16)[None, :] * N + n[:, None]  # pointers advance with the loop (no per-block address math)
        w0_ptrs = p0 + offs
        w1_ptrs = p1 + offs
        b_ptrs += (r_lo // 16) * (NCT * 16 * CPB)
        if PREFETCH:
            raw0, raw1, raw_b = _load_block(w0_ptrs, w1_ptrs, b_ptrs, nmask, r_lo < r_hi, W1, EVEN_N, True)
        for r0 in range(r_lo, r_hi, 16):
            if PREFETCH:  # this block's words were loaded last iteration
                w0, w1, bw = raw0, raw1, raw_b
            else:
                w0, w1, bw = _load_block(w0_ptrs, w1_ptrs, b_ptrs, nmask, True, W1, EVEN_N, False)
            w0_ptrs += 16 * N
            w1_ptrs += 16 * N
            b_ptrs += NCT * 16 * CPB
            if PREFETCH:  # the next block's go out now
                raw0, raw1, raw_b = _load_block(w0_ptrs, w1_ptrs, b_ptrs, nmask, r0 + 16 < r_hi, W1, EVEN_N, True)
            words = gl.convert_layout(_relabel(w0, BN, WARPS), w_l).to(gl.int32)
            if W1 > 0:
                spread = dl._spread(gl.convert_layout(_relabel(w1, BN, WARPS), w_l).to(gl.int32), W1 * CPB)
            else:
                spread = words
            blk = r0 // 16
            b_ops = _b_operands(bw, wb_l, NC, CPB)
            acc = gl.zeros([BN, NC], gl.int32, layout=mma)
            for f in gl.static_range(CPB):
                codes = dl._fields(words, spread, f, W0, W1, W0 * (f % CLASSES))
                if W0 == 8:
                    codes = codes ^ -2139062144  # 0x80808080: code - 128 in each byte
                a = gl.convert_layout(gl.reshape(_as_bytes(codes), [BN, 64]), a_l, assert_trivial=True)
                acc = mma_v2(a, gl.convert_layout(b_ops[f], b_l, assert_trivial=True), acc)
            down = gl.load(xs + otok * NB + blk, mask=tmask, other=0.0)
            if HALVES == 2:
                xsum = gl.load(xz + (otok * NB + blk) * 2 + ohalf, mask=tmask & first, other=0.0)
            else:
                xsum = (gl.load(xz + (otok * NB + blk) * 2, mask=tmask & first, other=0.0)
                        + gl.load(xz + (otok * NB + blk) * 2 + 1, mask=tmask & first, other=0.0))
            if HALVES == 2:
                c0 = r0 * PER + ohalf * (8 * PER)
                grp = ((c0.to(gl.float32) + 0.5) * inv_g).to(gl.int32)  # c0 // G, exact for K < 2^22
                sc, zero = tlin._scale_zero(s, z, grp[None, :] * stride_sg + on[:, None] * stride_sn,
                                            onmask[:, None] & (c0 < K)[None, :], ZERO, HAS_Z)
            else:
                grp = ((r0 * PER).to(gl.float32) + 0.5) * inv_g
                sc, zero = tlin._scale_zero(s, z, grp.to(gl.int32) * stride_sg + on * stride_sn, onmask, ZERO, HAS_Z)
                sc = sc[:, None]
                zero = zero[:, None]
            if W0 == 8:
                zero = zero - 128.0
            total += (acc.to(gl.float32) * (weight * down)[None, :] - zero * xsum[None, :]) * sc
        _store_tokens(total, otok, on, onmask, out, ws, cnt + pid_n, M, N, SPLIT, stride_om, TOK, ATOMIC)


def linear(x2: torch.Tensor, gw: GpuPackedWeight, block_n: int, split_k: int, num_warps: int,
           prefetch: bool = False) -> torch.Tensor:
    """y = x2 @ W^T for x2 [M, K] (float16 / bfloat16, unit stride along K; M up to `max_tokens(gw)`): `prepare_x`,
    then one program per (column tile, K-slice) for all M tokens; split-K sums go through `triton_linear`'s
    workspace. With `prefetch`, each iteration loads the next K block's words before it works on its own (the
    registers this costs are cheap here: 56-102 without)."""
    m, k = x2.shape
    reason = unsupported_reason(gw, m, block_n, num_warps, x2.device)
    if reason is not None:
        raise ValueError(reason)
    n = gw.shape[0]
    kw = gw.planes[0].shape[0]
    rows_per_split, split = tlin.k_slices(kw, split_k)
    ncls = classes(gw, m)
    xb, xs, xz = prepare_x(x2, gw, ncls)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (-(-n // block_n), split)
    ws, cnt = tlin._workspace(x2.device, m * n, grid[0]) if split > 1 else (out, out)
    tensors, consts = tlin._args(gw)
    _gemv_imma_kernel[grid](xb, xs, xz, tensors["p0"], tensors["p1"], tensors["s"], tensors["z"], out, ws, cnt, m, n,
                            k, kw, xs.shape[1], tensors["stride_sg"], tensors["stride_sn"], 1.0 / gw.group,
                            rows_per_split, split, out.stride(0), ATOMIC=split > 1, HALVES=halves(gw), CLASSES=ncls,
                            NC=columns(gw, m), EVEN_N=n % block_n == 0, PREFETCH=prefetch, BN=block_n,
                            WARPS=num_warps, num_warps=num_warps, **consts)
    return out
