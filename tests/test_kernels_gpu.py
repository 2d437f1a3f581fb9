"""GPU kernels vs a float64 reference (dequantized weight in float64 @ x in float64).

Runs on CUDA with Triton; on a CPU it runs only under TRITON_INTERPRET=1 (Triton's interpreter, tiny shapes).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import QuantSpec, quantize
from kernels.gpu_layout import repack_for_gpu
from kernels import dp4a_linear, gluon_imma, gluon_wgmma
from kernels import triton_linear as tlin

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not tlin.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)",
                allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (2, 3, 4, 5, 6, 8)
# (N, K, group): odd sizes, short last groups, per-channel, groups of 32 and 64
SHAPES = [(64, 128, 128), (67, 203, 32), (45, 96, None), (130, 300, 64), (96, 160, 100)] if INTERPRET else [
    (64, 128, 128), (67, 203, 32), (45, 96, None), (130, 300, 64), (1000, 1030, 128), (257, 2080, None),
    (512, 4104, 64), (96, 160, 100)]
TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}
FP8_INTERPRETER = "Triton 3.6's interpreter rounds float32 -> e4m3 wrongly just below a power of two (7.89 -> 4)"


def _case(n: int, k: int, group: int | None, bits: int, symmetric: bool, dtype: torch.dtype, gen: torch.Generator):
    w = torch.randn(n, k, generator=gen)
    qt = quantize(w, QuantSpec(bits, group, symmetric, "float16" if dtype == torch.float16 else "bfloat16"),
                  clip_search=False)
    return qt, repack_for_gpu(qt, DEV)


def _shape_cases(bits: int, extra: list[tuple[int, int, int | None]], gen: torch.Generator):
    """(K, dtype, qt, gw) for SHAPES + extra: float16 and bfloat16 in turn, every third asymmetric."""
    for i, (n, k, group) in enumerate(SHAPES + extra):
        dtype = (torch.float16, torch.bfloat16)[i % 2]
        yield (k, dtype, *_case(n, k, group, bits, i % 3 == 0, dtype, gen))


def _check(y: torch.Tensor, x: torch.Tensor, qt, dtype: torch.dtype) -> None:
    ref = x.double().cpu() @ qt.dequantize(torch.float64).t()
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), "output has NaN/Inf (unwritten poisoned elements?)"
    err = (y.double().cpu() - ref).norm() / ref.norm()
    assert err < TOL[dtype], f"relative error {err:.2e}"


def _poisoned(tlin_fn):
    """Run with the caching allocator's next blocks filled with NaN so unwritten outputs show."""
    torch.empty(1 << 22, device=DEV).fill_(float("nan"))
    return tlin_fn()


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_matches_float64(bits: int, symmetric: bool, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and (bits not in (3, 4, 8) or not symmetric):
        pytest.skip("float16 is checked on 3, 4 and 8 bits, symmetric (the unpack is dtype-independent)")
    gen = torch.Generator().manual_seed(1000 * bits + symmetric)
    ms = (1, 5, 16, 70) if INTERPRET else (1, 2, 3, 7, 33, 64, 300)  # 2, 3: the tensor-core decode's padded tokens
    if INTERPRET and dtype == torch.bfloat16:
        ms = (1,)  # the interpreter mis-converts float32 -> bfloat16 dot operands (checked on triton 3.9)
    for n, k, group in SHAPES:
        qt, gw = _case(n, k, group, bits, symmetric, dtype, gen)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
            _check(_poisoned(lambda: tlin.linear(x, gw)), x, qt, dtype)
        if DEV == "cuda" or dtype == torch.float16:
            x = torch.randn(3, k, generator=gen).to(dtype).to(DEV)
            _check(_poisoned(lambda: tlin.dequant_matmul(x, gw)), x, qt, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_every_config_family(bits: int) -> None:
    """Explicit configs: split-K with atomics (run twice: the workspace must come back zeroed), several block sizes,
    the GEMV, the split-K GEMM and the prefill (wide) kernel."""
    gen = torch.Generator().manual_seed(bits)
    n, k, group = (96, 512, 128) if INTERPRET else (1000, 4096, 128)
    qt, gw = _case(n, k, group, bits, True, torch.float16, gen)
    configs = [tlin.Config(1, 32, 3), tlin.Config(1, 64, 1), tlin.Config(1, 256, 5, 2), tlin.Config(1, 512, 2),
               tlin.Config(16, 32, 4), tlin.Config(16, 64, 1), tlin.Config(64, 64, 2), tlin.Config(128, 128, 1, 8, 3),
               tlin.Config(32, 32, 1, 4, 1, wide=True), tlin.Config(128, 128, 1, 8, 2, wide=True)]
    for cfg in configs:
        m = 1 if cfg.block_m == 1 else 9
        for _ in range(2):
            x = torch.randn(m, k, generator=gen).half().to(DEV)
            _check(_poisoned(lambda: tlin.linear(x, gw, cfg)), x, qt, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gluon", [False, True], ids=["triton", "gluon"])
def test_tensor_core_decode(bits: int, symmetric: bool, gluon: bool) -> None:
    """`Config(mma=True)` (and its Gluon version): 1..block_m bfloat16 tokens on tensor cores; odd sizes, short last
    groups, groups of 32/64/128, per-channel; split-K run twice (the workspace must come back zeroed); activations
    far from zero (the 128 * 2^-p offsets come off through the column sums of x)."""
    if gluon and (INTERPRET or DEV != "cuda"):
        pytest.skip("Gluon kernels run on CUDA only (not in Triton's CPU interpreter)")
    gen = torch.Generator().manual_seed(70 + bits + symmetric)
    configs = [tlin.Config(1, 64 if gluon else 32, 3, 4, 1, mma=True, gluon=gluon),
               tlin.Config(4, 64, 1, 2, 1, mma=True, gluon=gluon), tlin.Config(4, 128, 2, 4, 1, mma=True, gluon=gluon)]
    for n, k, group in SHAPES[:4] if INTERPRET else SHAPES:
        if group is not None and group % 32:
            continue
        qt, gw = _case(n, k, group, bits, symmetric, torch.bfloat16, gen)
        for cfg in configs:
            for m in sorted({1, cfg.block_m - 1, cfg.block_m} - {0}):
                for shift in (0, 30):
                    x = (torch.randn(m, k, generator=gen) + shift).bfloat16().to(DEV)
                    y = _poisoned(lambda: tlin.linear(x, gw, cfg))
                    _check(y, x, qt, torch.bfloat16)
                    ref = x.double().cpu() @ qt.dequantize(torch.float64).t()
                    assert (y.double().cpu() - ref).norm() / ref.norm() < 6e-3  # bf16 output rounding, not 2e-2


# the dp4a tiles checked, one test each (odd widths compile for minutes a tile: one test per tile spreads them
# over xdist's workers): one in the interpreter, split-K 2 / 3 / 4 on CUDA
DP4A_TILES = [tlin.Config(1, 64, 2, dp4a=True)] + ([] if INTERPRET else [tlin.Config(1, 32, 3, 2, dp4a=True),
                                                                         tlin.Config(1, 512, 4, 4, dp4a=True)])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cfg", DP4A_TILES, ids=lambda c: c.label)
def test_dp4a_decode(bits: int, symmetric: bool, cfg: tlin.Config) -> None:
    """`Config(dp4a=True)`: decode on integer dot products, x as 16-bit fixed point per K block. Groups of whole
    blocks, of half blocks (regrouped by byte permutes) and per-channel; odd sizes; split-K launches in a row on
    one workspace (it must come back zeroed); float16 and bfloat16; activations far from zero and an outlier 2^10
    times the rest of its block; NaN in a token's x gives NaN in that token's output only. Groups it cannot run are
    refused."""
    gen = torch.Generator().manual_seed(90 + bits + symmetric)
    shapes = SHAPES[:3] + [(70, 300, 64), (70, 520, 128)] if INTERPRET else SHAPES + [(70, 520, 128), (48, 512, 256)]
    ran = 0
    for i, (n, k, group) in enumerate(shapes):
        for dtype in [(torch.float16, torch.bfloat16)[i % 2]] if INTERPRET else (torch.float16, torch.bfloat16):
            qt, gw = _case(n, k, group, bits, symmetric, dtype, gen)
            if not tlin.fused_supported(gw):
                continue  # dequantize + matmul, whatever the config (test_unsupported_group_falls_back_with_warning)
            if not dp4a_linear.supported(gw):
                with pytest.raises(ValueError, match="dp4a"):
                    tlin.linear(torch.zeros(1, k, dtype=dtype, device=DEV), gw, cfg)
                continue
            ran += 1
            # one call, a token a case: a NaN (in its own output only), near zero, 30 away, 30 away with an outlier
            x = (torch.randn(4, k, generator=gen) + torch.tensor([[0.0], [0.0], [30.0], [30.0]])).to(dtype).to(DEV)
            x[0, k // 2] = float("nan")
            x[3, min(3, k - 1)] = 1024.0
            y = _poisoned(lambda: tlin.linear(x, gw, cfg)).double().cpu()
            ref = x[1:].double().cpu() @ qt.dequantize(torch.float64).t()
            assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()
            assert ((y[1:] - ref).norm(dim=1) / ref.norm(dim=1)).max() < 4e-3  # the output's rounding, not the digits
    assert ran >= 3  # whole-block, half-block and per-channel groups at every width


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_imma_prepare_x_writes_the_b_operand(bits: int) -> None:
    """`gluon_imma.prepare_x`: x as two signed bytes per element (v = 256 hi + lo = round(x 2^(S - e)) per K block),
    each in its (field class, half block, digit) column at the B operand's register order, zero in the others; the
    block's 2^(e - S) and the sums of v per half. Reading the bytes back gives x within half a step (under 2^-14
    of the block's largest |x|), for 1, 2, 3 and the most tokens, whole-block, half-block and per-channel groups,
    both field classes."""
    gen = torch.Generator().manual_seed(200 + bits)
    for n, k, group in [(64, 520, 128), (32, 300, 64), (32, 200, None)]:
        gw = _case(n, k, group, bits, True, torch.bfloat16, gen)[1]
        if not dp4a_linear.supported(gw):
            continue
        for m in sorted({1, 2, 3, gluon_imma.max_tokens(gw)}):
            ncls = gluon_imma.classes(gw, m)
            x = (torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=gen)])
            x = x.bfloat16().to(DEV)
            xb, xs, xz = gluon_imma.prepare_x(x, gw, ncls)
            halves, cpb, nb, block = gluon_imma.halves(gw), 8 // gw.widths[0], xs.shape[1], gw.block
            digits = xb.cpu().view(torch.int8).reshape(m, nb, ncls, halves, 2, 4, cpb, 2, 2, 4).long()
            t, f, s, p, lane = torch.meshgrid(*(torch.arange(d) for d in (4, cpb, 2, 2, 4)), indexing="ij")
            own = ((f % ncls)[None, None] == torch.arange(ncls)[:, None, None, None, None, None, None]) & (
                ((lane // 2) % halves)[None, None] == torch.arange(halves)[None, :, None, None, None, None, None])
            own = own[None, None, :, :, None]  # [1, 1, class, half, 1 (digit), t, f, s, p, lane]
            assert (digits[~own.expand_as(digits)] == 0).all(), "a byte outside its own column"
            v = (digits * own).sum((2, 3))  # [m, nb, digit, t, f, s, p, lane]
            v = 256 * v[:, :, 1] + v[:, :, 0]
            col = 16 * (lane * cpb + f) + 8 * s + 4 * p + t
            fixed = torch.zeros(m, nb, block, dtype=torch.long)
            fixed[:, :, col.flatten()] = v.reshape(m, nb, -1)
            down = xs.cpu().double()
            back = (fixed.double() * down[:, :, None]).reshape(m, -1)[:, :k]
            half_step = (down[:, :, None] / 2).expand(-1, -1, block).reshape(m, -1)[:, :k]  # 2^(e - 15)
            assert ((back - x.cpu().double()).abs() <= half_step).all()
            blocks = torch.nn.functional.pad(x.cpu().double(), (0, nb * block - k)).reshape(m, nb, block)
            assert (down <= blocks.abs().amax(2) * 2.0 ** -13).all()  # 2^e < 2 |x|max: error < 2^-14 |x|max
            halves_sum = fixed.reshape(m, nb, 2, block // 2).sum(3).double() * down[:, :, None]
            assert torch.allclose(xz.cpu().double(), halves_sum, rtol=1e-6, atol=0)


def _imma_emulated(x: torch.Tensor, gw) -> torch.Tensor:
    """What `gluon_imma._gemv_imma_kernel` computes, at the tensor level in torch (float64 float step): per K block
    and field, A [N, 64] = the codes of input column 16 (4 byte + field) + word row (x 4 for the odd field class,
    - 128 at 8 bits) and B [64, columns] = `prepare_x`'s real bytes; their int product per column, times 2^(e - S),
    256 for a high digit, 1/4 for the odd class, less zero point x half sum, times the group's scale; a token's
    columns summed. Without the Gluon layouts, which the compile checks (`assert_trivial`)."""
    m, k = x.shape
    n = gw.shape[0]
    ncls = gluon_imma.classes(gw, m)
    xb, xs, xz = (t.cpu() for t in gluon_imma.prepare_x(x, gw, ncls))
    halves, cpb, nb, nc = gluon_imma.halves(gw), 8 // gw.widths[0], xs.shape[1], gluon_imma.columns(gw, m)
    nct = 2 * halves * ncls
    codes = torch.nn.functional.pad(gw.codes().cpu().long(), (0, nb * gw.block - k)) - (128 if gw.bits == 8 else 0)
    digits = xb.view(torch.int8).reshape(m, nb, nct, 4, cpb, 2, 2, 4).long()  # tok, blk, column, t, f, s, p, byte
    c = torch.arange(nc)
    tok, lc = c // nct, c % nct
    present = tok < m
    tok = tok.clamp(max=m - 1)
    half, first = (lc // 2) % halves, (lc % 2 == 0) & (lc // (2 * halves) == 0)
    weight = torch.where(lc % 2 == 1, 256.0, 1.0) * torch.where(lc // (2 * halves) == 1, 0.25, 1.0)
    j, byte = torch.arange(16)[:, None], torch.arange(4)[None, :]
    scales = gw.scales.cpu().double()
    zeros = gw.zeros.cpu().double() if gw.zeros is not None else torch.full_like(scales, 1 << (gw.bits - 1))
    zeros = zeros - (128 if gw.bits == 8 else 0)
    total = torch.zeros(n, nc, dtype=torch.float64)
    for b in range(nb):
        acc = torch.zeros(n, nc, dtype=torch.long)
        for f in range(cpb):
            a = codes[:, (b * gw.block + 16 * (byte * cpb + f) + j).flatten()] << (gw.widths[0] * (f % ncls))
            bmat = digits[tok, b, lc][:, j % 4, f, j // 8, (j // 4) % 2, byte].reshape(nc, 64).t() * present
            acc += a @ bmat
        start = b * gw.block + half * (gw.block // 2)
        down = xs[tok, b].double() * present
        xsum = (xz[tok, b, half] if halves == 2 else xz[tok, b].sum(-1)).double() * first * present
        grp = (start // gw.group).clamp(max=scales.shape[0] - 1)
        sc = scales[grp].t() * (start < k)
        total += (acc.double() * weight * down - zeros[grp].t() * xsum) * sc
    return torch.stack([total[:, (c // nct) == t].sum(1) for t in range(m)])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_imma_arithmetic_matches_float64(bits: int) -> None:
    """The int8 tensor-core decode's arithmetic (`_imma_emulated`: its field classes, half-block columns, 8-bit
    offset and zero points, on `prepare_x`'s real B operand) is float64's product of the weight and x as the digits
    hold it (rounded to 2^(e - 14) per K block), for 1, 2 and the most tokens, symmetric and asymmetric,
    whole-block, half-block and per-channel groups."""
    gen = torch.Generator().manual_seed(230 + bits)
    ran = 0
    for n, k, group, symmetric in [(64, 520, 128, False), (32, 300, 64, True), (24, 200, None, False),
                                   (16, 1000, 256, True)]:
        qt, gw = _case(n, k, group, bits, symmetric, torch.bfloat16, gen)
        if not dp4a_linear.supported(gw):
            continue
        ran += 1
        for m in sorted({1, 2, gluon_imma.max_tokens(gw)}):
            x = (torch.randn(m, k, generator=gen) + 2).bfloat16()
            x[-1, 3] = 512.0
            blocks = torch.nn.functional.pad(x.double(), (0, -k % gw.block)).reshape(m, -1, gw.block)
            step = torch.exp2((torch.frexp(blocks.abs().amax(-1, keepdim=True))[1] - 14).double())
            x_digits = (torch.floor(blocks / step + 0.5) * step).reshape(m, -1)[:, :k]  # 2^e above |x|max
            ref = x_digits @ qt.dequantize(torch.float64).t()
            err = (_imma_emulated(x.to(DEV), gw) - ref).norm() / ref.norm()
            assert err < 1e-12, f"{m} tokens, group {group}: relative error {err:.1e} against x in digits"
            exact = x.double() @ qt.dequantize(torch.float64).t()
            assert (ref - exact).norm() / exact.norm() < 2e-3  # the digits' rounding (an outlier in block 0)
    assert ran >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tile", [(128, 1, 4, False), (256, 3, 4, True), (32, 5, 1, False)],
                         ids=lambda t: "n{}s{}w{}{}".format(*t[:3], "p" if t[3] else ""))
def test_imma_decode(bits: int, tile: tuple[int, int, int, bool]) -> None:
    """`gluon_imma.linear`: the integer decode on int8 tensor cores, 1..16 tokens in one launch. Against float64 at
    odd N and K, whole-block, half-block and per-channel groups, split-K run twice, asymmetric and symmetric,
    float16 and bfloat16, an outlier, with and without the next block's prefetch; NaN in a token gives NaN in that
    token only; `Config(imma=True)` runs the same kernel through `triton_linear.linear` (bit for bit at up to 2
    K-slices). One test per tile (odd widths compile for minutes a tile). More tokens than the columns hold, and
    tiles that are not 16 x num_warps x a power of 2, are refused with the reason."""
    probe = _case(64, 128, 128, bits, True, torch.bfloat16, torch.Generator().manual_seed(0))[1]
    reason = gluon_imma.unsupported_reason(probe, 1, 128, 4, torch.device(DEV))
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(210 + bits)
    ran = 0
    for k, dtype, qt, gw in _shape_cases(bits, [(64, 8200, 128), (256, 520, 128)], gen):
        if not dp4a_linear.supported(gw):
            with pytest.raises(ValueError, match="dp4a"):
                gluon_imma.linear(torch.zeros(1, k, dtype=dtype, device=DEV), gw, 128, 1, 4)
            continue
        ran += 1
        for m in sorted({1, 2, gluon_imma.max_tokens(gw)}):
            for _ in range(2):
                x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
                x[-1, min(3, k - 1)] = 1024.0
                _check(_poisoned(lambda: gluon_imma.linear(x, gw, *tile)), x, qt, dtype)
        x = torch.randn(2, k, generator=gen).to(dtype).to(DEV)
        block_n, split, warps, prefetch = tile
        y = tlin.linear(x, gw, tlin.Config(2, block_n, split, warps, 2 if prefetch else 1, imma=True))
        _check(y, x, qt, dtype)
        if split <= 2:  # two K-slices' atomic adds onto zero give one sum in either order; more may round apart
            assert torch.equal(y, gluon_imma.linear(x, gw, *tile))
        x[0, k // 2] = float("nan")
        y = gluon_imma.linear(x, gw, *tile)
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
        with pytest.raises(ValueError, match="tokens"):
            gluon_imma.linear(torch.zeros(gluon_imma.max_tokens(gw) + 1, k, dtype=dtype, device=DEV), gw, *tile)
    assert ran >= 3
    with pytest.raises(ValueError, match="power of 2"):
        gluon_imma.linear(torch.zeros(1, 128, dtype=torch.bfloat16, device=DEV), probe, 96, 1, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("tile", [(128, 8, 4, 1), (256, 4, 3, 1), (64, 4, 2, 1), (128, 4, 4, 2),
                                  (256, 8, 4, 2)],
                         ids=lambda t: "m{}w{}p{}s{}".format(*t))
def test_wgmma_prefill(bits: int, tile: tuple[int, int, int, int]) -> None:
    """`gluon_wgmma.linear`: the Hopper prefill, weight dequantized in registers as wgmma's A operand. Against
    float64 at token counts around the tile (a part tile of tokens, more K steps than TMA stages), odd N, groups of
    32 / 64 / 128 and per-channel, asymmetric and symmetric, float16 and bfloat16, x not 16-byte aligned (copied);
    `Config(wgmma=True)` through `triton_linear.linear` runs the same kernel; a NaN in a token gives NaN in that
    token only; five calls in a row on an 8192x2048 weight are each right (tile[3]: K slices, summed in float32;
    with more column tiles than fill a round of CTAs, those of the complete rounds run whole and only the rest in
    slices). K not a multiple of 8 (TMA needs 16-byte rows) and groups that are not whole slots of 16 are refused
    with the reason."""
    probe = _case(64, 128, 128, bits, True, torch.bfloat16, torch.Generator().manual_seed(0))[1]
    reason = gluon_wgmma.unsupported_reason(probe, torch.bfloat16, torch.device(DEV), *tile[:2], tile[3])
    if reason is not None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(330 + bits)
    ran = 0
    for k, dtype, qt, gw in _shape_cases(bits, [(200, 8200, 128), (384, 1024, 32)], gen):
        x = torch.randn(tile[0] + 3, k, generator=gen).to(dtype).to(DEV)
        reason = gluon_wgmma.unsupported_reason(gw, dtype, x.device, *tile[:2], tile[3])
        if reason is not None:
            assert k % 8 or gw.group % 16, reason
            with pytest.raises(ValueError, match="16-byte|multiple of 16"):
                gluon_wgmma.linear(x, gw, *tile)
            continue
        ran += 1
        for m in (17, tile[0], tile[0] + 3):
            _check(_poisoned(lambda: gluon_wgmma.linear(x[:m], gw, *tile)), x[:m], qt, dtype)
        shifted = torch.empty(x.numel() + 1, dtype=dtype, device=DEV)[1:].view(x.shape)  # not 16-byte aligned
        shifted.copy_(x)
        _check(gluon_wgmma.linear(shifted, gw, *tile), x, qt, dtype)
        y = tlin.linear(x, gw, tlin.Config(tile[0], 16 * tile[1], tile[3], tile[1], tile[2], wgmma=True))
        assert torch.equal(y, gluon_wgmma.linear(x, gw, *tile))
        x[1, k // 2] = float("nan")
        y = gluon_wgmma.linear(x, gw, *tile)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2:]).all()
    assert ran >= 4
    # repeated calls on a layer-sized weight: session 30's first version raced there (some tiles wrong, most calls)
    qt, gw = _case(8192, 2048, 128, bits, True, torch.bfloat16, gen)
    x = torch.randn(2 * tile[0], 2048, generator=gen).to(torch.bfloat16).to(DEV)
    ref = x.double().cpu() @ qt.dequantize(torch.float64).t()
    for _ in range(5):  # a few wrong tiles showed as 2-3e-2 relative error; right is ~2e-3 (bfloat16 outputs)
        y = _poisoned(lambda: gluon_wgmma.linear(x, gw, *tile)).double().cpu()
        assert (y - ref).norm() / ref.norm() < 5e-3
    if tile[3] > 1:  # 2 x 1001 tiles: some whole, the last round's in slices
        qt, gw = _case(16 * tile[1] * 1001 - 5, 256, 128, bits, False, torch.bfloat16, gen)
        x = torch.randn(2 * tile[0], 256, generator=gen).to(torch.bfloat16).to(DEV)
        whole = gluon_wgmma.whole_tiles(2, 1001, gluon_wgmma.ctas_at_once(x, gw, *tile[:3]))
        assert 0 < whole < 1001
        y = _poisoned(lambda: gluon_wgmma.linear(x, gw, *tile))
        _check(y, x, qt, torch.bfloat16)
        assert torch.equal(y, gluon_wgmma.linear(x, gw, *tile))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_wgmma_prefill_keeps_inflight_operands_offline(bits: int) -> None:
    """Compiled for sm_90a without a GPU (Triton's ptxas), no instruction of the wgmma prefill writes a register
    that an unfinished `HGMMA` reads as its A operand, at any tile of `gluon_wgmma.TILES`. Session 30's first
    measured version had such a write (a register copy at the loop's back edge) at every tile and summed some
    output tiles wrong on an H100; this scan finds it there. Nor, where the words come through a shared-memory
    ring or the alternating register sets (`PAIRS`), does the K loop copy a loaded register (it would wait there
    for the load: every 8-bit tile did so 8 times a step before session 34). Compiled in a process of its own,
    without TRITON_INTERPRET: a jit function the interpreter ran as a plain call leaves triton.language patched for
    the rest of the process."""
    if not gluon_wgmma.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon (triton >= 3.6)")
    if not (Path(tlin.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's bundled cuobjdump is missing")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "compile_decode_offline.py"), "--kernels", "wgmma",
                          "--bits", str(bits)], capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr[-3000:]
    tiles = [line for line in run.stdout.splitlines() if f"{bits}-bit wgmma" in line]
    assert len(tiles) == len(gluon_wgmma.TILES), run.stdout
    for line in tiles:
        assert int(re.search(r"(\d+) HGMMA", line).group(1)) >= 4 and " 0 writes to in-flight" in line, run.stdout
        if "words through registers" not in line:  # a ring or the two alternating sets
            assert ", 0 copies of loaded registers" in line, run.stdout


@pytest.mark.parametrize("warps,per_word", [(4, 2), (4, 4), (8, 2), (8, 4)])
def test_wgmma_weight_rings_are_read_without_bank_conflicts(warps: int, per_word: int) -> None:
    """The wgmma prefill's shared-memory rings of weight words are copied in and read back without bank conflicts
    (Triton's count of excess wavefronts per shared-memory instruction, for the layouts the kernel uses), at both
    tile widths and both plane-1 field sizes (int16: 2 a word, int8: 4). Unswizzled, the plane-0 read took twice
    the wavefronts it needs and the transposed plane-1 read four times; ncu saw 28% (4-bit) to 35% (5-bit) of all
    shared wavefronts as excess at 512 tokens on an H100, and swizzling took 28672x8192 5-bit from 431 to 372 us
    (docs/kernels_gpu.md, "Session 40")."""
    if not gluon_wgmma.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon (triton >= 3.6)")
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl
    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)

    def conflicts(registers, shared, shape: list[int], bits: int) -> int:
        return builder.get_shared_bank_conflicts(registers._to_ir(builder), shared._to_ir(builder), shape, bits)

    bn = 16 * warps
    words = gluon_wgmma._a_word_layout(bn, warps)  # how each thread holds its words for the wgmma A operand
    unswizzled = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    assert conflicts(words, unswizzled, [bn, 16], 32) == 1
    assert conflicts(words, gluon_wgmma._ring_layout(), [bn, 16], 32) == 0  # plane 0: copied and read so
    ring1 = gluon_wgmma._ring1_layout(per_word, 4)
    assert conflicts(gluon_wgmma._copy_layout(bn // per_word, warps), ring1, [16, bn // per_word], 32) == 0
    fields = gluon_wgmma._ring1_layout(per_word, 4 // per_word)  # the same bytes as int16 / int8 fields
    assert fields.vec * 4 // per_word == ring1.vec * 4
    assert (fields.per_phase, fields.max_phase) == (ring1.per_phase, ring1.max_phase)
    transposed = gl.SwizzledSharedLayout(fields.vec, fields.per_phase, fields.max_phase, [0, 1])
    assert conflicts(words, gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), [bn, 16], 32 // per_word) == 3
    assert conflicts(words, transposed, [bn, 16], 32 // per_word) == 0


@pytest.mark.parametrize("warps,block_m", [(4, 256), (4, 128), (4, 64), (8, 256), (8, 128)])
def test_wgmma_split_parts_go_through_shared_memory_without_bank_conflicts(warps: int, block_m: int) -> None:
    """A K slice's float32 part is stored from the accumulator's layout into the dead x ring and read back 16 bytes
    of consecutive columns a thread, both without bank conflicts (Triton's count of excess wavefronts); the ring
    holds the part at every tile of `gluon_wgmma.TILES`, and a tile whose ring is too small is refused."""
    if not gluon_wgmma.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon (triton >= 3.6)")
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl
    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)
    bn = 16 * warps
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_m, 16])
    read = gl.BlockedLayout([4, 1], [bn // 4, 128 // bn], [1, warps], [0, 1])
    for layout, excess in ((gl.SwizzledSharedLayout(1, 1, 1, [0, 1]), 3), (gluon_wgmma._part_layout(), 0)):
        assert builder.get_shared_bank_conflicts(acc._to_ir(builder), layout._to_ir(builder), [bn, block_m],
                                                 32) == excess
        assert builder.get_shared_bank_conflicts(read._to_ir(builder), layout._to_ir(builder), [bn, block_m],
                                                 32) == 0
    for tile_m, tile_warps, stages in gluon_wgmma.TILES:  # x ring bytes >= the part's
        assert stages * tile_m * gluon_wgmma.STEP * 2 >= 16 * tile_warps * tile_m * 4
    _, gw = _case(128, 64, 64, 4, True, torch.bfloat16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="stages >= 4"):
        gluon_wgmma.linear(torch.zeros(8, 64, dtype=torch.bfloat16, device=DEV), gw, 256, 8, 2, split_k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_every_tile_a_latency_table_tries(bits: int) -> None:
    """Each tile `tile_candidates` offers (the default first; for decode CUDA-core, tensor-core and Gluon decode,
    split-K GEMM; for prefill the Hopper wgmma tiles where the device has them) computes the product, so
    whichever a table measures fastest is a correct one."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16  # bfloat16 (and its tensor-core tiles) on CUDA
    gen = torch.Generator().manual_seed(90 + bits)
    for n, k, group in [(67, 203, 32), (130, 300, 64)] if INTERPRET else [(1000, 1030, 128), (512, 4104, 64)]:
        qt, gw = _case(n, k, group, bits, False, dtype, gen)
        for m in (1, 3, 16, 40):
            tiles = tlin.tile_candidates(m, gw, dtype)
            assert tiles[0] == tlin.default_config(m, gw, dtype) and len(set(tiles)) == len(tiles)
            hopper = DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9 and k % 8 == 0
            assert len(tiles) > 1 if m <= tlin.TUNED_MAX_M or hopper else len(tiles) == 1
            assert all(cfg.wgmma for cfg in tiles[1:]) or m <= tlin.TUNED_MAX_M
            x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
            for cfg in tiles:
                assert tlin.Config.parse(cfg.label) == cfg
                _check(_poisoned(lambda: tlin.linear(x, gw, cfg)), x, qt, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="an LLM-sized weight, run 16 times per tile: CUDA only")
def test_split_k_gemm_with_a_part_block_of_rows_is_right_every_call() -> None:
    """The split-K GEMM at 4 token rows of a 16-row block, 28672x8192: session 21 saw a quarter of the pipelined
    calls sum a tile wrong; `linear` runs that case unpipelined. Each of 16 calls per tile matches float64."""
    gen = torch.Generator(device=DEV).manual_seed(21)
    w = torch.randn(28672, 8192, device=DEV, generator=gen)
    qt = quantize(w, QuantSpec(4, 128, True, "bfloat16"), clip_search=False)
    gw = repack_for_gpu(qt, DEV)
    x = torch.randn(4, 8192, device=DEV, generator=gen).bfloat16()
    ref = x.double() @ qt.dequantize(torch.float64).t().to(DEV)
    for cfg in (tlin.Config(16, 64, 2, 4, 4), tlin.Config(16, 128, 2, 4, 3), tlin.Config(16, 64, 3, 4, 2)):
        errs = [float((tlin.linear(x, gw, cfg).double() - ref).norm() / ref.norm()) for _ in range(16)]
        assert max(errs) < 6e-3, f"{cfg.label}: relative errors {errs}"


@pytest.mark.gpu
def test_a_latency_table_sets_the_path_and_tile_layers_run(monkeypatch) -> None:
    """`LatencyTable.use_dispatch` (which `measure` calls on CUDA) makes "triton" layers run the fastest of our
    measured paths (never a library's, whose weight layout a layer does not hold): at a measured token count with
    its tile, at others by the path and tile of the nearest count (the default tile where that one cannot run)."""
    from kernels import gpu_backends
    from kernels.latency import LatencyEntry, LatencyTable, entry_key
    monkeypatch.setattr(gpu_backends, "DISPATCH", {})
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    qt, gw = _case(130, 300, 128, 4, True, dtype, torch.Generator().manual_seed(5))  # what choice "w4" gives
    tile = tlin.tile_candidates(1, gw, dtype)[2]
    fused = f"triton_fused[{tile.label}]"
    table = LatencyTable("a device", {}, {
        entry_key((130, 300), "w4", 1): LatencyEntry(0.005, "tinygemm_int4", {
            "tinygemm_int4": 0.005, fused: 0.01, "triton_fused": 0.02, "triton": 0.01}, selected="triton"),
        entry_key((130, 300), "w4", 512): LatencyEntry(0.1, "triton_dequant_cublas", {
            "triton_fused": 0.2, "triton_dequant_cublas": 0.1, "triton": 0.1}, selected="triton")})
    table.use_dispatch()
    assert gpu_backends.pick(1, gw) == ("triton_fused", tile)
    runs_2 = tlin.config_error(tile, 2, gw, dtype, gw.scales.device) is None
    assert gpu_backends.pick(2, gw) == ("triton_fused", tile if runs_2 else None)
    assert gpu_backends.pick(400, gw) == ("triton_dequant_cublas", None)
    gemm = tlin.Config(64, 64, 1, 4, 2)  # a prefill tile that won at 64 tokens runs a 40-token prompt too
    gpu_backends.use_measured(qt.spec, (130, 300), 64, f"triton_fused[{gemm.label}]")
    assert gpu_backends.pick(40, gw) == ("triton_fused", gemm)
    x40 = torch.randn(40, 300).to(dtype).to(DEV)
    _check(_poisoned(lambda: gpu_backends.run_gpu_weight(x40, gw)), x40, qt, dtype)
    gluon = tlin.Config(4, 128, 4, 4, 1, mma=True, gluon=True)  # measured where Gluon runs: here only if it runs
    gpu_backends.use_measured(qt.spec, (130, 300), 3, f"triton_fused[{gluon.label}]")
    assert gpu_backends.pick(3, gw) == ("triton_fused", gluon if tlin.gluon_available(gw.scales.device) else None)
    x = torch.randn(1, 300).to(dtype).to(DEV)
    _check(_poisoned(lambda: gpu_backends.run_gpu_weight(x, gw)), x, qt, dtype)
    # a bfloat16 table's tensor-core tile, and a model that runs in float16 after all: the default tile, no error
    mma = tlin.Config(2, 128, 2, 2, 1, mma=True)
    gpu_backends.use_measured(qt.spec, (130, 300), 2, f"triton_fused[{mma.label}]")
    assert gpu_backends.pick(2, gw, torch.bfloat16) == ("triton_fused", mma)
    assert gpu_backends.pick(2, gw, torch.float16) == ("triton_fused", None)
    x16 = torch.randn(2, 300).half().to(DEV)
    _check(_poisoned(lambda: gpu_backends.run_gpu_weight(x16, gw)), x16, qt, torch.float16)
    with pytest.raises(ValueError, match="not one of ours"):
        gpu_backends.use_measured(qt.spec, (130, 300), 1, "tinygemm_int4")
    with pytest.raises(ValueError, match="not a Config label"):
        gpu_backends.use_measured(qt.spec, (130, 300), 1, "triton_fused[big]")


@pytest.mark.gpu
def test_tensor_core_decode_rejects_what_it_cannot_run() -> None:
    gen = torch.Generator().manual_seed(5)
    cfg = tlin.Config(4, 64, 1, 4, 1, mma=True)
    qt, gw8 = _case(64, 128, 128, 8, True, torch.bfloat16, gen)
    _, gw2 = _case(64, 128, 128, 2, True, torch.bfloat16, gen)
    x = torch.randn(2, 128, generator=gen).bfloat16().to(DEV)
    with pytest.raises(ValueError, match="2..6-bit"):
        tlin.linear(x, gw8, cfg)
    with pytest.raises(ValueError, match="float16"):
        tlin.linear(x.half(), gw2, cfg)
    with pytest.raises(ValueError, match="5 rows"):
        tlin.linear(torch.randn(5, 128, generator=gen).bfloat16().to(DEV), gw2, cfg)
    assert tlin.default_config(1, gw2, torch.bfloat16).mma and not tlin.default_config(1, gw2, torch.float16).mma
    assert not tlin.default_config(1, gw8, torch.bfloat16).mma and tlin.default_config(3, gw2).block_m == 4
    _, gw3 = _case(64, 128, 128, 3, True, torch.bfloat16, gen)
    _, gw4 = _case(64, 128, 128, 4, True, torch.bfloat16, gen)
    assert tlin.default_config(1, gw3).mma and not tlin.default_config(1, gw4).mma and tlin.default_config(2, gw4).mma
    gluon = tlin.gluon_available(gw2.scales.device)
    assert gluon == (DEV == "cuda" and not INTERPRET)
    assert [tlin.default_config(m, gw).gluon for gw, m in [(gw2, 1), (gw2, 2), (gw3, 4)]] == [gluon] * 3
    assert not any(tlin.default_config(m, gw).gluon for gw, m in [(gw2, 4), (gw4, 2)])
    with pytest.raises(ValueError, match="power of 2" if gluon else "Gluon"):
        tlin.linear(x, gw2, tlin.Config(4, 96, 1, 4, 1, mma=True, gluon=True))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_gemv_keeps_accuracy_for_activations_far_from_zero(bits: int) -> None:
    """The one-token kernel takes the magic-number offsets (and the zero point) off once per group through the
    sum of x; inputs with a large mean (all positive, as after a ReLU) must not cost accuracy."""
    gen = torch.Generator().manual_seed(50 + bits)
    for symmetric in (True, False):
        for n, k, group in [(96, 512, 128), (67, 203, 32), (45, 96, None)]:
            qt, gw = _case(n, k, group, bits, symmetric, torch.float16, gen)
            x = (torch.rand(1, k, generator=gen) * 4 + 30).half().to(DEV)
            _check(_poisoned(lambda: tlin.linear(x, gw)), x, qt, torch.float16)


@pytest.mark.gpu
def test_dequantize_is_exact() -> None:
    gen = torch.Generator().manual_seed(7)
    for bits in BITS:
        for n, k, group in [(67, 203, 32), (96, 160, 100), (33, 77, 24)]:  # groups that straddle 16-column slots too
            qt, gw = _case(n, k, group, bits, False, torch.float16, gen)
            w = tlin.dequantize(gw, torch.float32).t().cpu()
            assert torch.equal(w, qt.dequantize(torch.float32)), (bits, group)


@pytest.mark.gpu
def test_unsupported_group_falls_back_with_warning() -> None:
    gen = torch.Generator().manual_seed(3)
    qt, gw = _case(40, 250, 100, 4, True, torch.float16, gen)
    assert not tlin.fused_supported(gw)
    x = torch.randn(2, 250, generator=gen).half().to(DEV)
    tlin._warned.clear()
    with pytest.warns(UserWarning, match="not a multiple of 32"):
        y = tlin.linear(x, gw)
    _check(y, x, qt, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantized_paths(bits: int) -> None:
    """w<b>gca8: x quantized per token by one Triton kernel (rows padded with zeros to what the matmul takes),
    then int8 x int8 (the emitted layer's path: `torch._int_mm` with its int32 product scaled by a second kernel at
    8 bits, each of `a8_linear.PATHS["int"]` at 4 on CUDA; and, for the benchmark, `torch._int_mm` on byte-wide codes) or e4m3
    x e4m3 (`torch._scaled_mm`), against float64 at token counts around the padding (1, 16, 17, 100), a K of no
    power of two, x far from zero and strided; FP8 where K and N are multiples of 16."""
    from kernels import Choice, a8_linear
    from kernels import gpu_activation_quant as gaq
    gen = torch.Generator().manual_seed(11)
    choice = Choice(bits, 8, None)
    assert gaq.unsupported_reason(choice, torch.device(DEV)) is None
    assert "per-channel" in gaq.unsupported_reason(Choice(bits, 8), torch.device(DEV))
    assert "symmetric" in gaq.unsupported_reason(Choice(bits, 8, None, symmetric=False))
    own = ["int8_int_mm"] if bits == 8 else list(a8_linear.PATHS["int"]) if DEV == "cuda" else ["int8_packed"]
    for n, k in ((272, 512), (264, 1032)):  # the second: K and N not multiples of 16, so no FP8
        qt = quantize(torch.randn(n, k, generator=gen), choice.spec_for("linear", k), clip_search=False)
        assert list(gaq.candidates(qt, choice, torch.bfloat16, DEV)[0]) == own  # what a latency table times
        fns, skipped = gaq.candidates(qt, choice, torch.bfloat16, DEV, benchmark=True)
        assert set(own) <= set(fns) and "int8_int_mm" in fns, skipped
        assert ("fp8_scaled_mm" in fns) == (bits <= 4 and k == 512), skipped
        dtype = torch.float16 if INTERPRET else torch.bfloat16  # the interpreter's bfloat16 dots: see above
        for m in (1, 16, 17) if INTERPRET else (1, 16, 17, 100):
            x = (torch.randn(m, k + 8, generator=gen)[:, 4:k + 4] + 2).to(dtype).to(DEV)
            ref = x.double().cpu() @ qt.dequantize(torch.float64).t()
            for name, fn in fns.items():
                if name.startswith("fp8") and INTERPRET:
                    continue  # FP8_INTERPRETER
                y = fn(x)
                assert y.dtype == dtype and y.shape == ref.shape
                err = float((y.double().cpu() - ref).norm() / ref.norm())
                assert err < (6e-2 if name.startswith("fp8") else 2e-2), (name, m, err)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_w_b_a8_kernel_matches_float64(bits: int) -> None:
    """Each int8 W<b>A8 path (`a8_linear.PATHS`: the fused kernel, the codes unpacked + torch._int_mm, x rounded + the
    weight-only path) against float64 on x rounded as the layer rounds it (per token to int8): odd N and K (short
    last block), default and explicit fused tiles (split-K twice; 128 x 128 prefill tiles), poisoned outputs. The
    path `linear` runs is `default_path`'s by token count, or a latency table's measured winner (`use_measured`).
    8-bit weights run these where torch._int_mm cannot take the shape. The codes unpacked to e4m3 (up to 5 bits)
    equal the int8 ones."""
    from kernels import a8_linear
    from kernels.gpu_activation_quant import FP8_MAX_EXACT_BITS, round_activations, signed_codes
    gen = torch.Generator().manual_seed(500 + bits)
    shapes = ((64, 128), (67, 203)) if INTERPRET else ((64, 128), (67, 203), (1000, 1030), (257, 2080), (512, 4104))
    dtypes = (torch.float16,) if INTERPRET else (torch.float16, torch.bfloat16)
    for n, k in shapes:
        qt = quantize(torch.randn(n, k, generator=gen), QuantSpec(bits, None, True, "float16"), clip_search=False)
        gw = repack_for_gpu(qt, DEV)
        codes = _poisoned(lambda: a8_linear.unpack_codes(gw)).cpu()
        c = torch.arange(codes.shape[1])  # input column c sits at column `at` of its block (quantize_rows' order)
        at = c - c % (16 * gw.per) + (c % 16) * gw.per + (c % (16 * gw.per)) // 16
        assert torch.equal(codes[:, at][:, :k].to(torch.int16), signed_codes(qt))
        if bits <= FP8_MAX_EXACT_BITS:  # the e4m3 codes (made from their float16 bits) are the same values
            assert torch.equal(_poisoned(lambda: a8_linear.unpack_codes(gw, fp8=True)).float().cpu(), codes.float())
        assert ("a8_unpack_int_mm" in a8_linear.paths(gw)) == (n % 8 == 0)
        w64 = qt.dequantize(torch.float64).t()
        for m in (1, 17, 130) if INTERPRET else (1, 3, 16, 17, 64, 100, 300):
            for dtype in dtypes:
                x = (torch.randn(m, k, generator=gen) + 0.5).to(dtype)
                ref = round_activations(x.double(), 8) @ w64
                runs = {**a8_linear.paths(gw), "linear": lambda x: a8_linear.linear(x, gw)}
                configs = [tlin.Config(16, 32, 3, 4, 1), tlin.Config(16, 32, 3, 4, 1)]
                if not INTERPRET:
                    configs += [tlin.Config(128, 128, 1, 8, 3), tlin.Config(64, 128, 2, 4, 3)]
                runs.update({f"fused {c.label} #{i}": (lambda x, c=c: a8_linear.linear(x, gw, c))
                             for i, c in enumerate(configs)})
                for name, run in runs.items():
                    y = _poisoned(lambda: run(x.to(DEV)))
                    assert y.dtype == dtype and y.shape == ref.shape and torch.isfinite(y).all(), name
                    err = float((y.double().cpu() - ref).norm() / ref.norm())
                    assert err < TOL[dtype], (n, k, m, dtype, name, err)
    with pytest.raises(ValueError, match="symmetric per-channel"):
        a8_linear.linear(x.to(DEV), repack_for_gpu(quantize(torch.randn(n, k), QuantSpec(bits, 64)), DEV))


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason=FP8_INTERPRETER)
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_float8_activation_paths_match_float64(bits: int) -> None:
    """w<b>gcf8 (x per token in float8 e4m3, the b-bit codes exact in e4m3): each path of `a8_linear.PATHS["fp8"]`
    (the codes unpacked to e4m3 + torch._scaled_mm, x rounded to its e4m3 values + the weight-only path) and the
    default pick, against float64 on x rounded as the layer rounds it; the unpacked codes are exact."""
    from kernels import a8_linear
    from kernels.gpu_activation_quant import FP8_REQUIREMENT, fp8_available, round_activations, signed_codes
    if not fp8_available(torch.device(DEV)):
        pytest.skip(FP8_REQUIREMENT)
    gen = torch.Generator().manual_seed(700 + bits)
    for n, k in ((64, 128), (67, 203), (1024, 4104)):
        qt = quantize(torch.randn(n, k, generator=gen), QuantSpec(bits, None, True, "bfloat16"), clip_search=False)
        gw = repack_for_gpu(qt, DEV)
        codes = a8_linear.unpack_codes(gw, fp8=True).float().cpu()
        c = torch.arange(codes.shape[1])
        at = c - c % (16 * gw.per) + (c % 16) * gw.per + (c % (16 * gw.per)) // 16
        assert torch.equal(codes[:, at][:, :k], signed_codes(qt).float())
        assert ("f8_unpack_scaled_mm" in a8_linear.paths(gw, "fp8")) == (n % 16 == 0)
        w64 = qt.dequantize(torch.float64).t()
        for m, dtype in ((1, torch.bfloat16), (16, torch.float16), (17, torch.bfloat16), (300, torch.float16),
                         (300, torch.bfloat16)):
            x = (torch.randn(m, k, generator=gen) + 0.5).to(dtype)
            ref = round_activations(x.double(), 8, "fp8") @ w64
            runs = {**a8_linear.paths(gw, "fp8"), "linear": lambda x: a8_linear.linear(x, gw, act_format="fp8")}
            for name, run in runs.items():
                y = _poisoned(lambda: run(x.to(DEV)))
                assert y.dtype == dtype and y.shape == ref.shape and torch.isfinite(y).all(), name
                err = float((y.double().cpu() - ref).norm() / ref.norm())
                assert err < TOL[torch.bfloat16], (n, k, m, dtype, name, err)


@pytest.mark.gpu
def test_w_b_a8_layers_run_the_measured_path(monkeypatch) -> None:
    """Without a measurement `linear` runs `default_path` (rounded x + weight-only up to ROUNDED_X_MAX_M rows, the
    fused kernel, unpack + torch._int_mm from UNPACK_MIN_M where N % 8 == 0); a latency table's winner
    (`use_measured`, or `LatencyTable.use_dispatch` from a saved table) overrides it at its token count and the
    nearest ones."""
    from kernels import a8_linear
    from kernels.latency import LatencyEntry, LatencyTable, entry_key
    monkeypatch.setattr(a8_linear, "DISPATCH", {})
    gw = repack_for_gpu(quantize(torch.randn(64, 128), QuantSpec(4, None, True, "float16"), clip_search=False), DEV)
    odd = repack_for_gpu(quantize(torch.randn(60, 128), QuantSpec(4, None, True, "float16"), clip_search=False), DEV)
    assert [a8_linear.pick(m, gw) for m in (1, 16, 17, 127, 128)] == [
        "a8_rounded_x", "a8_rounded_x", "a8_fused", "a8_fused", "a8_unpack_int_mm"]
    assert a8_linear.pick(512, odd) == "a8_fused"  # torch._int_mm takes no N off a multiple of 8 on CUDA
    assert [a8_linear.pick(m, gw, "fp8") for m in (1, 127, 128)] == ["f8_rounded_x", "f8_rounded_x",
                                                                      "f8_unpack_scaled_mm"]
    ran = []
    for name in a8_linear.ALL_PATHS:
        monkeypatch.setitem(a8_linear._RUN, name, lambda x, gw, name=name: ran.append(name))
    table = LatencyTable("test", {}, {entry_key((64, 128), "w4gca8", t): LatencyEntry(0.01, p, {p: 0.01})
                                      for t, p in ((1, "a8_fused"), (512, "a8_rounded_x"))})
    table.use_dispatch()
    for m in (1, 5, 300, 512):
        a8_linear.linear(torch.zeros(m, 128, dtype=torch.float16, device=DEV), gw)
    assert ran == ["a8_fused", "a8_fused", "a8_rounded_x", "a8_rounded_x"]
    with pytest.raises(ValueError, match="not a W<b>A8 path"):
        a8_linear.use_measured((64, 128), 4, 1, "triton_fused")


@pytest.mark.gpu
@pytest.mark.parametrize("bits,backend", [(8, "int8_act"), (4, "int8_act_packed"), (3, "int8_act_packed")])
def test_a_w8a8_layer_runs_int8_on_the_device(bits: int, backend: str) -> None:
    """A QuantizedLinear forced onto "int8_act" / "int8_act_packed" (what `apply` does for a plan's w8gca8 /
    w<b>gca8 layers), in bfloat16: x quantized by our Triton kernel, int8 x int8, the product scaled, against
    float64 with the bias; rebuilt from its config and state dict it stays on that backend and gives the same
    output."""
    from kernels import quantize_module, quantized_module_from_state
    torch.manual_seed(0)
    q = quantize_module(torch.nn.Linear(264, 136), QuantSpec(bits, None, True, "bfloat16"), backend=backend)
    q = q.to(DEV).bfloat16()
    w64 = q.quantized_tensor().dequantize(torch.float64).cpu()
    for m in (1, 17, 130) if INTERPRET else (1, 17, 100, 300):
        x = torch.randn(m, 264).bfloat16().to(DEV)
        y = q(x)
        ref = x.double().cpu() @ w64.t() + q.bias.double().cpu()
        assert q.backend == backend and y.dtype == torch.bfloat16
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 2e-2
    again = quantized_module_from_state(q.config(), q.state_dict(), device=DEV).bfloat16()
    assert torch.equal(again(x), y) and again.backend == backend


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="torch's tinygemm runs on CUDA")
@pytest.mark.parametrize("n,k,group", [(64, 128, 128), (136, 192, 64), (512, 4096, 32), (1000, 1024, 256),
                                       (96, 64, None)])
def test_a_layer_held_for_tinygemm_runs_it_on_cuda(n: int, k: int, group: int | None) -> None:
    """A QuantizedLinear forced onto "tinygemm" (what `apply` does for a plan's "w4@tinygemm" layers), in bfloat16
    on CUDA: torch._weight_int4pack_mm on the codes in its packing and the scales beside zeros, against float64 with
    the bias, in the bytes the plan counts; its state dict holds the dense packing (the packing inverted), and a
    reload gives the same output; float16 inputs run its fallback (dequantize + matmul)."""
    from kernels import quantize_module, quantized_module_from_state, weight_nbytes
    torch.manual_seed(0)
    spec = QuantSpec(4, group, True, "bfloat16")
    q = quantize_module(torch.nn.Linear(k, n), spec, backend="tinygemm")
    dense = q.qweight.clone()
    q = q.to(DEV).bfloat16()
    w64 = q.quantized_tensor().dequantize(torch.float64).cpu()
    for m in (1, 5, 16, 77):
        x = torch.randn(m, k).bfloat16().to(DEV)
        y = q(x)
        ref = x.double().cpu() @ w64.t() + q.bias.double().cpu()
        assert q.backend == "tinygemm" and q.layout == "tinygemm_int4pack" and y.dtype == torch.bfloat16
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < TOL[torch.bfloat16]
    assert q.weight_nbytes() == weight_nbytes((n, k), spec, "tinygemm")
    state = q.state_dict()
    assert torch.equal(state["qweight"].cpu(), dense)
    again = quantized_module_from_state(q.config(), state, device=DEV).bfloat16()
    assert torch.equal(again(x), y) and again.backend == "tinygemm"
    yh = q(x.half())
    assert q.backend == "dequant" and q.weight_nbytes() == weight_nbytes((n, k), spec, "tinygemm")
    ref = x.half().double().cpu() @ w64.t() + q.bias.half().double().cpu()
    assert float((yh.double().cpu() - ref).norm() / ref.norm()) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="torch's tinygemm runs on CUDA")
def test_a_latency_table_times_tinygemm_for_its_choice() -> None:
    """A "w4@tinygemm" entry times the one path its layers run (and a shape tinygemm cannot hold gets none)."""
    from kernels.latency import entry_key, measure
    table = measure([(512, 1024), (100, 1024)], ["w4", "w4@tinygemm"], tokens=(1, 16), device="cuda", reps=5,
                    tiles=False)
    for t in (1, 16):
        entry = table.entries[entry_key((512, 1024), "w4@tinygemm", t)]
        assert entry.selected == "tinygemm" and set(entry.all_ms) == {"tinygemm"}
        assert entry_key((100, 1024), "w4@tinygemm", t) not in table.entries
        assert table.entries[entry_key((100, 1024), "w4", t)].selected == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_activation_quantization_kernel(fp8: bool) -> None:
    """`quantize_rows`: each token's absmax maps to the largest code (127, or 448 in e4m3), codes round to
    nearest, an all-zero token and the padding rows are zeros (the padding with scale 0)."""
    from kernels import gpu_activation_quant as gaq
    if fp8 and INTERPRET:
        pytest.skip(FP8_INTERPRETER)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3000, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 0.0]).view(-1, 1)).to(DEV)
    xq, sx = gaq.quantize_rows(x.bfloat16(), fp8=fp8, multiple=16, minimum=16)
    assert xq.shape == (16, 3000) and sx.shape == (16, 1)
    xd, s = x.bfloat16().double().cpu(), sx.double().cpu()
    qmax = gaq.E4M3_MAX if fp8 else gaq.INT8_MAX
    amax = xd.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(s[:5], amax.clamp_min(1e-12) / qmax, rtol=1e-6) and not s[5:].any()
    codes = xq.cpu().double()
    assert not codes[5:].any() and not codes[4].any()
    assert torch.equal(codes[:4].abs().amax(dim=1), torch.full((4,), qmax, dtype=torch.float64))
    exact = xd[:4] / s[:4]
    # half a step of the code grid (e4m3: 3 mantissa bits, subnormal below 2^-6), and x / s rounds in float32
    step = 2.0 ** (exact.abs().clamp_min(2.0 ** -6).log2().floor() - 3) if fp8 else torch.ones_like(exact)
    assert ((codes[:4] - exact).abs() <= step / 2 * (1 + 1e-4) + 1e-12).all()
    if not fp8:  # the W<b>A8 kernel's order: column 16 PER b + 16 i + j at 16 PER b + PER j + i, zeros to 3072
        xp, sp = gaq.quantize_rows(x.bfloat16(), fp8=False, multiple=1, minimum=1, per=8)
        c = torch.arange(3000)
        pos = c - c % 128 + (c % 16) * 8 + (c % 128) // 16
        padding = torch.ones(3072, dtype=torch.bool)
        padding[pos] = False
        assert xp.shape == (5, 3072) and torch.equal(sp.cpu(), sx[:5].cpu()) and not xp.cpu()[:, padding].any()
        assert torch.equal(xp.cpu()[:, pos], xq[:5].cpu())
        # x rounded to its int8 levels in x's dtype (the "a8_rounded_x" path's input): the codes times the scale;
        # in float16 here, as the interpreter truncates float32 -> bfloat16
        xh = x.half()
        qh, sh = gaq.quantize_rows(xh, fp8=False, multiple=1, minimum=1)
        rounded = gaq.round_rows(xh).cpu()
        assert rounded.dtype == torch.float16 and torch.equal(rounded, (qh.cpu().float() * sh.cpu()).half())
        # round_activations (the profilers' rounding) takes ties to even: at most one level apart, on ties only
        apart = (rounded.float() - gaq.round_activations(xh.cpu(), 8).float()).abs()
        assert (apart <= sh.cpu() * 1.001).all() and (apart > 0).float().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="registry backend dispatches on CUDA devices")
def test_registry_backend_on_cuda() -> None:
    from kernels.backends import select_backend
    from kernels.gpu_backends import TRITON, module_view
    gen = torch.Generator().manual_seed(5)
    qt = quantize(torch.randn(300, 640, generator=gen), QuantSpec(3, 128, False), clip_search=False)
    assert select_backend(qt.spec, qt.shape, torch.device("cuda"), torch.float16).name == "triton"
    qw = module_view(qt)
    for m in (1, 8, 300):
        x = torch.randn(m, 640, generator=gen).half().cuda()
        _check(TRITON.linear(x, qw), x, qt, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="registry backend dispatches on CUDA devices")
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 64, False), QuantSpec(8, None)], ids=str)
def test_pointwise_conv_runs_on_the_triton_backend(spec) -> None:
    """A 1x1 conv moved to CUDA dispatches like a linear (backend "triton") and matches the float64 conv of its
    dequantized weight; a 3x3 conv, and a 1x1 conv over more than PREFILL_DEQUANT_MIN_M rows, dequantize (by the
    Triton kernel) + conv. One module runs both paths in turn: its codes stay right in either layout."""
    from torch import nn
    from kernels.modules import quantize_module
    torch.manual_seed(0)
    for layer, x, backend in [(nn.Conv2d(96, 80, 1), torch.randn(2, 96, 5, 7), "triton"),
                              (nn.Conv1d(96, 80, 1, bias=False), torch.randn(1, 96, 1), "triton"),
                              (nn.Conv2d(96, 80, 3, padding=1), torch.randn(1, 96, 6, 6), "dequant"),
                              (nn.Conv2d(96, 80, 1), torch.randn(2, 96, 16, 16), "dequant")]:  # > 256 rows
        q = quantize_module(layer, spec).cuda().bfloat16()
        xd = x.bfloat16().cuda()
        conv = nn.functional.conv2d if x.dim() == 4 else nn.functional.conv1d
        ref = conv(xd.double().cpu(), q.dequantized_weight(torch.float64).cpu(),
                   None if q.bias is None else q.bias.double().cpu(), padding=layer.padding)
        y = q(xd)
        assert q.backend == backend and y.shape == ref.shape and y.dtype == torch.bfloat16
        assert float((y.double().cpu() - ref).norm() / ref.norm()) < 2e-2
        if layer.kernel_size == (1, 1):  # the other path on the same module
            x2 = torch.randn(2, 96, 16, 16) if x.shape[-1] < 16 else torch.randn(1, 96, 2, 3)
            x2 = x2.bfloat16().cuda()
            ref2 = conv(x2.double().cpu(), q.dequantized_weight(torch.float64).cpu(),
                        None if q.bias is None else q.bias.double().cpu())
            assert float((q(x2).double().cpu() - ref2).norm() / ref2.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="CUDA latency tables need a CUDA device")
def test_measure_cuda_small(tmp_path, monkeypatch) -> None:
    """A CUDA table: every path timed, our fastest path and tile installed for "triton" layers; W<b>A8 entries
    time each of `a8_linear.PATHS` (the rounded-x ones on the weight-only kernel measured fastest for that weight,
    installed first) and install their fastest."""
    from kernels import a8_linear, gpu_backends
    from kernels.latency import LatencyTable, cache_path, entry_key, measure
    monkeypatch.setattr(gpu_backends, "DISPATCH", {})
    monkeypatch.setattr(a8_linear, "DISPATCH", {})
    table = measure([(512, 1024), (264, 512)], ["w4", "w3", "w8gca8", "w8a8", "w4gca8", "w4gcf8"], tokens=(1, 32),
                    device="cuda", reps=5, cache_dir=tmp_path)
    assert "per-channel" in table.skipped["w8a8"]
    assert table.entries[entry_key((264, 512), "w8gca8", 32)].backend == "int8_int_mm"
    assert len(table.entries) == 2 * 5 * 2
    a8 = table.entries[entry_key((512, 1024), "w4gca8", 32)]
    assert set(a8.all_ms) == set(a8_linear.PATHS["int"]) and a8_linear.DISPATCH[(512, 1024, 4, "int", 32)] == a8.backend
    f8 = table.entries[entry_key((512, 1024), "w4gcf8", 32)]
    assert set(f8.all_ms) == set(a8_linear.PATHS["fp8"]) and a8_linear.DISPATCH[(512, 1024, 4, "fp8", 32)] == f8.backend
    assert (512, 1024, 4, 1024, True, 32) in gpu_backends.DISPATCH  # the per-channel weight-only winner
    for e in table.entries.values():
        assert 0 < e.ms < 10 and e.backend in e.all_ms
    w4 = table.entries[entry_key((512, 1024), "w4", 1)]
    assert w4.backend == table.dispatch[(512, 1024, "w4", 1)] and any(p.startswith("triton_fused[") for p in w4.all_ms)
    ours = min((p for p in w4.all_ms if gpu_backends.is_ours(p)), key=w4.all_ms.get)
    gw = repack_for_gpu(quantize(torch.randn(512, 1024), QuantSpec(4, 128), clip_search=False), DEV)
    path, tile = gpu_backends.pick(1, gw)  # measure installed the fastest of ours, which the "triton" entry timed
    assert path == ours.split("[")[0] and (tile is None) == (ours == "triton_fused")
    assert LatencyTable.load(cache_path(tmp_path, "cuda")).to_dict() == table.to_dict()


@pytest.mark.skipif(DEV != "cuda", reason="the CUDA layers' custom ops run on CUDA")
def test_torch_compile_fullgraph_on_cuda() -> None:
    """After one eager forward, a bfloat16 model of "triton" layers (linears, a pointwise and a 3x3 conv that
    dequantizes) compiles with fullgraph=True under inductor and computes what the eager model computes."""
    from torch import nn

    from kernels import quantize_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.Flatten(),
                        nn.Linear(16 * 64, 256), nn.GELU(), nn.Linear(256, 64))
    specs = {0: QuantSpec(4, None), 2: QuantSpec(8, None, symmetric=False), 4: QuantSpec(4, 128),
             6: QuantSpec(3, 64, symmetric=False)}
    qnet = nn.Sequential(*(quantize_module(m, specs[i]) if i in specs else m for i, m in enumerate(net)))
    qnet = qnet.to("cuda", torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = qnet(x)
        assert qnet[4].backend == "triton"
        assert torch._dynamo.explain(qnet)(x).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(qnet, fullgraph=True)(x)
    assert float((compiled.float() - eager.float()).norm() / eager.float().norm()) < 2e-2
