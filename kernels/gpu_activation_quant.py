"""Activation-quantized choices (w<b>gca8) on CUDA: int8 x int8 through torch._int_mm, FP8 e4m3 through torch._scaled_mm.

Activations are quantized per token (absmax), weights use their per-channel codes shifted to signed
(q - 2^(b-1)), exact in int8 for every b and in e4m3 for b <= 4; the per-token and per-channel scales are
applied to the integer / fp8 product. Choices the device cannot run are reported by `unsupported_reason`
(and left out of the latency table), never raised in the middle of a solve.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .choice import Choice
from .quantizer import QuantizedTensor

FP8_MAX_EXACT_BITS = 4   # signed codes of <= 4 bits are exact in float8_e4m3fn
E4M3_MAX = 448.0


def fp8_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def unsupported_reason(choice: Choice, device: torch.device) -> str | None:
    """Why `device` cannot run the activation-quantized `choice` (None: it can)."""
    if device.type != "cuda":
        return f"{choice.label}: activation-quantized choices run only on CUDA (torch._int_mm / _scaled_mm); removed on {device.type}"
    if choice.abits != 8:
        return f"{choice.label}: only 8-bit activations are implemented (int8 or fp8 e4m3)"
    if choice.group_size is not None:
        return f"{choice.label}: int8/fp8 matmuls take per-channel weight scales only; use w{choice.wbits}gca8"
    if not choice.symmetric:
        return f"{choice.label}: activation-quantized matmuls need symmetric weights"
    return None


def _signed_weight(qt: QuantizedTensor) -> torch.Tensor:
    return qt.codes().to(torch.int16) - (1 << (qt.spec.bits - 1))


def _pad_rows(x: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    m = x.shape[0]
    rows = max(minimum, -(-m // multiple) * multiple)
    return x if rows == m else torch.cat([x, x.new_zeros(rows - m, x.shape[1])])


def _int8(qt: QuantizedTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = _signed_weight(qt).to(torch.int8).to("cuda").t()          # [K, N], column-major as _int_mm wants
    sw = qt.scales.float().view(1, -1).to("cuda")

    def run(x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        sx = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        xq = _pad_rows(torch.round(x.float() / sx).to(torch.int8), 8, 24)   # _int_mm needs > 16 rows
        return (torch._int_mm(xq, w_t)[:m].float() * sx * sw).to(x.dtype)
    return run


def _fp8(qt: QuantizedTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    w_t = _signed_weight(qt).to(torch.float32).to(torch.float8_e4m3fn).to("cuda").t()   # [K, N] column-major
    sw = qt.scales.float().view(1, -1).to("cuda")

    def run(x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        sx = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        xq = _pad_rows((x.float() / sx).to(torch.float8_e4m3fn), 16, 16)
        sxp = _pad_rows(sx, 16, 16)
        return torch._scaled_mm(xq, w_t, scale_a=sxp, scale_b=sw, out_dtype=x.dtype)[:m]
    return run


def candidates(qt: QuantizedTensor, choice: Choice, dtype: torch.dtype) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> fn(x [M, K]) for the int8 and fp8 paths of `qt`, and name -> reason skipped."""
    n, k = qt.shape
    fns: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    if k % 8 or n % 8:
        skipped["int8_int_mm"] = f"torch._int_mm needs K and N multiples of 8 (N {n}, K {k})"
    else:
        fns["int8_int_mm"] = _int8(qt)
    dev = torch.device("cuda")
    if not fp8_available(dev):
        skipped["fp8_scaled_mm"] = f"FP8 needs compute capability >= 8.9 ({torch.cuda.get_device_name(dev)})"
    elif qt.spec.bits > FP8_MAX_EXACT_BITS:
        skipped["fp8_scaled_mm"] = f"{qt.spec.bits}-bit codes are not exact in e4m3 (<= {FP8_MAX_EXACT_BITS} bits)"
    elif k % 16 or n % 16:
        skipped["fp8_scaled_mm"] = f"torch._scaled_mm needs K and N multiples of 16 (N {n}, K {k})"
    else:
        fns["fp8_scaled_mm"] = _fp8(qt)
    return fns, skipped
