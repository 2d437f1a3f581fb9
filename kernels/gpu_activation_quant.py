"""Activation-quantized choices (w<b>gca8) on CUDA: int8 x int8 through torch._int_mm, FP8 e4m3 through torch._scaled_mm.

Activations are quantized per token (absmax), weights use their per-channel codes shifted to signed
(q - 2^(b-1)), exact in int8 for every b and in e4m3 for b <= 4; the per-token and per-channel scales are
applied to the integer / fp8 product. Quantizing x is one Triton kernel (absmax, scale and codes of a token
per program, rows padded to what the matmul takes), and so is the int8 product's scaling (int32 -> x's dtype):
done in torch ops they were about ten kernels a call, each reading or writing x or the int32 product.
Choices the device cannot run are reported by `unsupported_reason` (and left out of the latency table), never
raised in the middle of a solve.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .choice import Choice
from .quantizer import QuantizedTensor
from .triton_linear import HAVE_TRITON, tl, triton

FP8_MAX_EXACT_BITS = 4   # signed codes of <= 4 bits are exact in float8_e4m3fn
E4M3_MAX = 448.0
INT8_MAX = 127.0


def fp8_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def unsupported_reason(choice: Choice, device: torch.device) -> str | None:
    """Why `device` cannot run the activation-quantized `choice` (None: it can)."""
    if device.type != "cuda":
        return f"{choice.label}: activation-quantized choices run only on CUDA (torch._int_mm / _scaled_mm); removed on {device.type}"
    if not HAVE_TRITON:
        return f"{choice.label}: activation-quantized choices quantize x in a Triton kernel; install triton"
    if choice.abits != 8:
        return f"{choice.label}: only 8-bit activations are implemented (int8 or fp8 e4m3)"
    if choice.group_size is not None:
        return f"{choice.label}: int8/fp8 matmuls take per-channel weight scales only; use w{choice.wbits}gca8"
    if not choice.symmetric:
        return f"{choice.label}: activation-quantized matmuls need symmetric weights"
    return None


def _signed_weight(qt: QuantizedTensor) -> torch.Tensor:
    return qt.codes().to(torch.int16) - (1 << (qt.spec.bits - 1))


if HAVE_TRITON:
    @triton.jit
    def _quantize_rows_kernel(x, xq, sx, M, K, stride_xm, QMAX: tl.constexpr, FP8: tl.constexpr,
                              BLOCK: tl.constexpr):
        """Row m of the padded xq: s = max|x[m]| / QMAX, xq[m] = x[m] / s (int8 rounded to nearest, or e4m3),
        sx[m] = s; rows m >= M (padding) get codes 0 and scale 0."""
        m = tl.program_id(0)
        live = m < M
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(x + m * stride_xm + k0 + offs, mask=live & (k0 + offs < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
        s = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
        for k0 in range(0, K, BLOCK):
            v = tl.load(x + m * stride_xm + k0 + offs, mask=live & (k0 + offs < K), other=0.0).to(tl.float32) / s
            if FP8:
                q = v.to(tl.float8e4nv)
            else:
                q = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5)).to(tl.int8)
            tl.store(xq + m * K + k0 + offs, q, mask=k0 + offs < K)
        tl.store(sx + m, tl.where(live, s, 0.0))

    @triton.jit
    def _scale_int_product_kernel(acc, sx, sw, out, N, stride_om, BLOCK: tl.constexpr):
        """out[m, n] = acc[m, n] * sx[m] * sw[n] in out's dtype, for a block of n."""
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        y = tl.load(acc + m * N + n, mask=mask, other=0).to(tl.float32) * tl.load(sx + m)
        y = y * tl.load(sw + n, mask=mask, other=0.0)
        tl.store(out + m * stride_om + n, y.to(out.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, fp8: bool, multiple: int, minimum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride along K) -> (codes [P, K] int8 or float8_e4m3fn, scales [P, 1] float32), quantized
    per row by its absmax, with P >= max(M, minimum) a multiple of `multiple`; rows M.. are zeros."""
    m, k = x.shape
    rows = max(minimum, -(-m // multiple) * multiple)
    xq = torch.empty(rows, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    sx = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_rows_kernel[(rows,)](x, xq, sx, m, k, x.stride(0), QMAX=E4M3_MAX if fp8 else INT8_MAX, FP8=fp8,
                                   BLOCK=block, num_warps=4)
    return xq, sx


def scale_int_product(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """The first m rows of the int32 product acc [P, N] times sx [P, 1] (per row) and sw [N] (per column), in dtype."""
    n = acc.shape[1]
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    _scale_int_product_kernel[(m, triton.cdiv(n, 1024))](acc, sx, sw, out, n, out.stride(0), BLOCK=1024, num_warps=4)
    return out


def _int8(qt: QuantizedTensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = _signed_weight(qt).to(torch.int8).to(device).t()          # [K, N], column-major as _int_mm wants
    sw = qt.scales.float().reshape(-1).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows(x.contiguous(), fp8=False, multiple=8, minimum=24)  # _int_mm needs > 16 rows
        return scale_int_product(torch._int_mm(xq, w_t), sx, sw, x.shape[0], x.dtype)
    return run


def _fp8(qt: QuantizedTensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = _signed_weight(qt).to(torch.float32).to(torch.float8_e4m3fn).to(device).t()   # [K, N] column-major
    sw = qt.scales.float().view(1, -1).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows(x.contiguous(), fp8=True, multiple=16, minimum=16)
        return torch._scaled_mm(xq, w_t, scale_a=sx, scale_b=sw, out_dtype=x.dtype)[:x.shape[0]]
    return run


def candidates(qt: QuantizedTensor, choice: Choice, dtype: torch.dtype,
               device: torch.device | str = "cuda") -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> fn(x [M, K]) for the int8 and fp8 paths of `qt` on `device`, and name -> reason skipped. (Off
    CUDA only Triton's CPU interpreter runs them, for tests.)"""
    n, k = qt.shape
    dev = torch.device(device)
    fns: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    if k % 8 or n % 8:
        skipped["int8_int_mm"] = f"torch._int_mm needs K and N multiples of 8 (N {n}, K {k})"
    else:
        fns["int8_int_mm"] = _int8(qt, dev)
    if dev.type == "cuda" and not fp8_available(dev):
        skipped["fp8_scaled_mm"] = f"FP8 needs compute capability >= 8.9 ({torch.cuda.get_device_name(dev)})"
    elif qt.spec.bits > FP8_MAX_EXACT_BITS:
        skipped["fp8_scaled_mm"] = f"{qt.spec.bits}-bit codes are not exact in e4m3 (<= {FP8_MAX_EXACT_BITS} bits)"
    elif k % 16 or n % 16:
        skipped["fp8_scaled_mm"] = f"torch._scaled_mm needs K and N multiples of 16 (N {n}, K {k})"
    else:
        fns["fp8_scaled_mm"] = _fp8(qt, dev)
    return fns, skipped
