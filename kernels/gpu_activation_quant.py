"""Activation-quantized choices: w<b>gca8 (int8 x int8, torch._int_mm), w<b>gcf8 (e4m3 x e4m3, torch._scaled_mm).

Activations are quantized per token (absmax), weights use their per-channel codes shifted to signed
(q - 2^(b-1)), exact in int8 for every b and in e4m3 for b <= 5; the per-token and per-channel scales are
applied to the integer / fp8 product. On CUDA quantizing x is one Triton kernel (absmax, scale and codes of a
token per program, rows padded to what the matmul takes), and so is the int8 product's scaling (int32 -> x's
dtype): done in torch ops (as on the CPU) they were about ten kernels a call.

A plan's w<b>gca8 layers compute with x rounded per token to int8 in the model, on backends never picked
automatically (`apply` forces them): "int8_act" here for 8-bit weights (the codes as signed bytes, the dense
packing's size; `torch._int_mm`) and "int8_act_packed" (`a8_linear`) for 2..6-bit weights and 8-bit ones of
shapes `torch._int_mm` does not take (the packed bit planes; a fused int8 kernel, the codes unpacked +
`torch._int_mm`, or x rounded in x's dtype (`round_rows`) + the weight-only kernels, whichever a latency table
measured fastest); w<b>gcf8 layers likewise on "fp8_act_packed" (e4m3 activations; codes of up to 5 bits).
Grouped or asymmetric weights with 8-bit activations, activation widths other than 8, codes too wide for e4m3
and FP8 on a device without it are refused by `unsupported_reason`, which removes them from the candidate set,
never raising in the middle of a solve. int8 and FP8 on byte-wide codes of narrower weights are timed by
benchmarks/bench_kernels_gpu.py only (`candidates(..., benchmark=True)`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import triton_linear as tlin
from .backends import Backend, QuantizedWeightLike, layer_view, register_backend
from .choice import Choice, QuantSpec
from .cpu_backends import flip_sign_bit
from .quantizer import QuantizedTensor
from .triton_linear import HAVE_TRITON, tl, triton

ACT_QUANT_KINDS = ("linear", "hf_conv1d")  # layer kinds whose emitted module quantizes its input (convs: weight-only)
FP8_MAX_EXACT_BITS = 5   # signed codes of <= 5 bits (-16..15) are exact in float8_e4m3fn (4 significant bits)
E4M3_MAX = 448.0
INT8_MAX = 127.0
FP8_REQUIREMENT = "float8 matmuls need compute capability >= 8.9"  # what `fp8_available` checks, in messages


def fp8_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def unsupported_reason(choice: Choice, device: torch.device | None = None) -> str | None:
    """Why the activation-quantized `choice` cannot be an emitted layer (on `device`, if given); None: it can."""
    fp8 = choice.act_format == "fp8"
    if choice.abits != 8:
        return f"{choice.label}: only 8-bit activations are implemented (int8, or fp8 as w<b>gcf8)"
    if choice.group_size is not None:
        kind, use = ("fp8", f"w{choice.wbits}gcf8") if fp8 else ("int8", f"w{choice.wbits}gca8")
        return f"{choice.label}: {kind} matmuls take per-channel weight scales only; use {use}"
    if not choice.symmetric:
        return f"{choice.label}: activation-quantized matmuls need symmetric weights"
    if fp8 and choice.wbits > FP8_MAX_EXACT_BITS:
        return (f"{choice.label}: {choice.wbits}-bit codes are not exact in float8 e4m3 (up to "
                f"{FP8_MAX_EXACT_BITS} bits); use w{choice.wbits}gca8")
    if device is not None and device.type not in ("cuda", "cpu"):
        return f"{choice.label}: activation-quantized layers run on CUDA and the CPU only; removed on {device.type}"
    if fp8 and device is not None and device.type == "cuda" and not fp8_available(device):
        return (f"{choice.label}: {FP8_REQUIREMENT}; removed on "
                f"{torch.cuda.get_device_name(device)}")
    return None


def token_scales(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-token (last dimension) quantization steps of x in float32: absmax / qmax (torch ops)."""
    return x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax


def padded_rows(m: int, multiple: int, minimum: int) -> int:
    """Rows a matmul of m token rows takes: at least `minimum`, a multiple of `multiple`."""
    return max(minimum, -(-m // multiple) * multiple)


def round_activations(x: torch.Tensor, bits: int = 8, act_format: str = "int") -> torch.Tensor:
    """x rounded as an activation-quantized layer rounds its input (float reference, x's dtype), per token (last
    dimension): to integers of `bits` bits scaled by absmax / (2^(bits-1) - 1), or (act_format "fp8") to float8
    e4m3 values scaled by absmax / 448."""
    if act_format == "fp8":
        s = token_scales(x, E4M3_MAX)
        return ((x.float() / s).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
    s = token_scales(x, float(2 ** (bits - 1) - 1))
    return (torch.round(x.float() / s) * s).to(x.dtype)


def signed_codes(w) -> torch.Tensor:
    """The codes of `w` (a QuantizedTensor or GpuPackedWeight) shifted to signed, code - 2^(b-1), as int16 [out, in]."""
    return w.codes().to(torch.int16) - (1 << (w.spec.bits - 1))


if HAVE_TRITON:
    @triton.jit
    def _quantize_rows_kernel(x, xq, sx, M, K, KP, stride_xm, QMAX: tl.constexpr, FP8: tl.constexpr,
                              PER: tl.constexpr, ROUNDED: tl.constexpr, BLOCK: tl.constexpr):
        """Row m of the padded xq (rows KP long): s = max|x[m]| / QMAX, xq[m] = x[m] / s (int8 rounded to
        nearest, or e4m3), sx[m] = s; rows m >= M (padding) get codes 0 and scale 0. PER > 0: column
        16 PER b + 16 i + j is stored at 16 PER b + PER j + i (the order `a8_linear` reads a K block in).
        ROUNDED: xq is float, and gets the codes times s (x rounded to the int8 levels, in xq's dtype)."""
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
            c = k0 + offs
            if PER > 0:
                c = c - c % (16 * PER) + (c % 16) * PER + (c % (16 * PER)) // 16
            if ROUNDED:
                tl.store(xq + m * KP + c, (q.to(tl.float32) * s).to(xq.dtype.element_ty), mask=k0 + offs < K)
            else:
                tl.store(xq + m * KP + c, q, mask=k0 + offs < K)
        tl.store(sx + m, tl.where(live, s, 0.0))

    @triton.jit
    def _scale_int_product_kernel(acc, sx, sw, out, N, stride_om, BLOCK: tl.constexpr):
        """out[m, n] = acc[m, n] * sx[m] * sw[n] in out's dtype, for a block of n."""
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = n < N
        y = tl.load(acc + m * N + n, mask=mask, other=0).to(tl.float32) * tl.load(sx + m)
        y = y * tl.load(sw + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + m * stride_om + n, y.to(out.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, fp8: bool, multiple: int, minimum: int,
                  per: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride along K) -> (codes [P, KP] int8 or float8_e4m3fn, scales [P, 1] float32), quantized
    per row by its absmax, with P >= max(M, minimum) a multiple of `multiple`; rows M.. are zeros. KP = K, or with
    per > 0 (int8) K padded with zeros to whole blocks of 16 per columns, each block's columns in `a8_linear`'s order."""
    m, k = x.shape
    rows = padded_rows(m, multiple, minimum)
    kp = -(-k // (16 * per)) * 16 * per if per else k
    xq = (torch.zeros if kp > k else torch.empty)(rows, kp, dtype=torch.float8_e4m3fn if fp8 else torch.int8,
                                                   device=x.device)
    sx = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 2048)
    _quantize_rows_kernel[(rows,)](x, xq, sx, m, k, kp, x.stride(0), QMAX=E4M3_MAX if fp8 else INT8_MAX, FP8=fp8,
                                   PER=per, ROUNDED=False, BLOCK=block, num_warps=4)
    return xq, sx


def round_rows(x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """x [M, K] (unit stride along K) rounded per row to the int8 levels of its absmax (ties away from zero), or
    to its e4m3 values (`round_activations` in one Triton kernel), in x's dtype: what an int8 x int8 (e4m3 x e4m3)
    product sees of x."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=x.dtype, device=x.device)
    sx = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](x, out, sx, m, k, k, x.stride(0), QMAX=E4M3_MAX if fp8 else INT8_MAX, FP8=fp8, PER=0,
                                ROUNDED=True, BLOCK=min(triton.next_power_of_2(k), 2048), num_warps=4)
    return out


def scale_int_product(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """The first m rows of the int32 product acc [P, N] times sx [P, 1] (per row) and sw [N] (per column), in dtype."""
    n = acc.shape[1]
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    _scale_int_product_kernel[(m, triton.cdiv(n, 1024))](acc, sx, sw, out, n, out.stride(0), BLOCK=1024, num_warps=4)
    return out


def int8_matmul(x: torch.Tensor, w_t: torch.Tensor, sw: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """x [M, K] @ W^T in x's dtype, x quantized to int8 per token: w_t [K, N] signed codes (column-major, as
    torch._int_mm takes them), sw [N] per-channel scales. fused: x quantized and the product scaled by our Triton
    kernels (default: on CUDA, and in Triton's CPU interpreter), else in torch ops."""
    m = x.shape[0]
    if fused is None:
        fused = HAVE_TRITON and (x.is_cuda or not tlin.ASM)
    if fused:
        xq, sx = quantize_rows(x.contiguous(), fp8=False, multiple=8, minimum=24)  # CUDA's _int_mm: > 16 rows
        return scale_int_product(torch._int_mm(xq, w_t), sx, sw, m, x.dtype)
    sx = token_scales(x, INT8_MAX)
    xq = torch.round(x.float() / sx).to(torch.int8)
    rows = padded_rows(m, 8, 24) if x.is_cuda else m
    if rows > m:
        xq = torch.cat([xq, xq.new_zeros(rows - m, xq.shape[1])])
    return (torch._int_mm(xq, w_t)[:m].float() * sx * sw.float()).to(x.dtype)


def _int8(qt: QuantizedTensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = signed_codes(qt).to(torch.int8).to(device).t()
    sw = qt.scales.float().reshape(-1).to(device)
    return lambda x: int8_matmul(x, w_t, sw)


def _fp8(qt: QuantizedTensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = signed_codes(qt).to(torch.float32).to(torch.float8_e4m3fn).to(device).t()   # [K, N] column-major
    sw = qt.scales.float().view(1, -1).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows(x.contiguous(), fp8=True, multiple=16, minimum=16)
        return torch._scaled_mm(xq, w_t, scale_a=sx, scale_b=sw, out_dtype=x.dtype)[:x.shape[0]]
    return run


def _int8_act_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    out, inp = shape
    shapes_ok = device.type == "cpu" or (device.type == "cuda" and HAVE_TRITON and out % 8 == 0 and inp % 8 == 0)
    return (shapes_ok and dtype.is_floating_point and spec.bits == 8 and spec.symmetric and spec.group_size is None
            and hasattr(torch, "_int_mm"))


def _int8_act_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    out, inp = qw.matrix_shape
    return int8_matmul(x, qw.qweight.view(torch.int8).view(out, inp).t(), qw.scales.reshape(-1))


def never_fast(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return False


INT8_ACT = register_backend(Backend("int8_act", _int8_act_supports, _int8_act_linear, layout="int8_signed",
                                    to_layout=flip_sign_bit, from_layout=flip_sign_bit, fast=never_fast))


def candidates(qt: QuantizedTensor, choice: Choice, dtype: torch.dtype, device: torch.device | str = "cuda",
               benchmark: bool = False) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> fn(x [M, K]) for the activation-quantized paths of `qt` on `device`, and name -> reason skipped.
    Without `benchmark`, the paths an emitted layer can run (what a latency table times; `a8_linear.act_backend`):
    "int8_int_mm" (backend "int8_act") for 8-bit weights of shapes torch._int_mm takes; else backend
    "int8_act_packed" (or "fp8_act_packed" for float8 activations): on CUDA each of `a8_linear.PATHS` of the
    choice's activation format (the table installs the fastest), elsewhere the backend ("int8_packed",
    "fp8_packed"). With it, also the int8 GEMM on the codes a byte each ("int8_int_mm") and FP8 on them
    ("fp8_scaled_mm", b <= 5, CUDA)."""
    from .a8_linear import FP8_ACT_PACKED, act_backend, paths
    from .gpu_backends import gpu_weight
    n, k = qt.shape
    dev = torch.device(device)
    fns: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    backend = act_backend(qt.spec, qt.shape, choice.act_format)
    name = {INT8_ACT: "int8_int_mm", FP8_ACT_PACKED: "fp8_packed"}.get(backend, "int8_packed")
    if not backend.supports(qt.spec, qt.shape, dev, dtype):
        skipped[name] = f"backend {backend.name!r} cannot run {qt.spec} of shape {qt.shape} on {dev} in {dtype}"
    elif backend is not INT8_ACT and dev.type == "cuda":
        fns.update(paths(gpu_weight(layer_view(qt, backend, dev)), choice.act_format))
    else:
        view = layer_view(qt, backend, dev)
        fns[name] = lambda x: backend.linear(x, view)
    if not benchmark:
        return fns, skipped
    if backend is not INT8_ACT:
        if dev.type == "cuda" and (k % 8 or n % 8):
            skipped["int8_int_mm"] = f"torch._int_mm needs K and N multiples of 8 (N {n}, K {k})"
        else:
            fns["int8_int_mm"] = _int8(qt, dev)
    if dev.type == "cuda" and not fp8_available(dev):
        skipped["fp8_scaled_mm"] = f"{FP8_REQUIREMENT} ({torch.cuda.get_device_name(dev)})"
    elif qt.spec.bits > FP8_MAX_EXACT_BITS:
        skipped["fp8_scaled_mm"] = f"{qt.spec.bits}-bit codes are not exact in e4m3 (<= {FP8_MAX_EXACT_BITS} bits)"
    elif k % 16 or n % 16:
        skipped["fp8_scaled_mm"] = f"torch._scaled_mm needs K and N multiples of 16 (N {n}, K {k})"
    else:
        fns["fp8_scaled_mm"] = _fp8(qt, dev)
    return fns, skipped
