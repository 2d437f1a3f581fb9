"""Uniform weight quantization of a 2-D weight [out, in], per output channel or per group of input columns.

Symmetric (b bits): codes q in [0, 2^b - 1] with the zero at 2^(b-1); w ~ (q - 2^(b-1)) * s with
s = 2 * ratio * max|w| / (2^b - 1), so all 2^b levels are used (as in GPTQ).
Asymmetric: w ~ (q - z) * s with s = ratio * (max(w, 0) - min(w, 0)) / (2^b - 1) and a uint8 zero point z.
The clipping ratio is searched per group over a grid (1.0 first, so the search never does worse than
no search) and the codes are always computed from the *stored* scale (rounded to spec.scale_dtype),
so `dequantize()` reproduces exactly what the search measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .choice import QuantSpec
from .memory import SCALE_ITEMSIZE
from .packing import pack_bits, unpack_bits

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5


@dataclass
class QuantizedTensor:
    """A quantized [out, in] weight: dense packed codes, scales [out, n_groups] and zero points (asymmetric)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    spec: QuantSpec

    @property
    def nbytes(self) -> int:
        zero_bytes = 0 if self.zeros is None else self.zeros.numel()
        return self.packed.numel() + self.scales.numel() * SCALE_ITEMSIZE[self.spec.scale_dtype] + zero_bytes

    def codes(self) -> torch.Tensor:
        """Unpacked codes as uint8 [out, in]."""
        out, inp = self.shape
        return unpack_bits(self.packed, self.spec.bits, out * inp).view(out, inp)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] these codes stand for (exact in float32 for 16-bit scales)."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.spec).to(dtype)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """float32 [out, in] from codes [out, in] (uint8, or float32 as `unpack_float` gives them; float32 is
    overwritten), scales and zero points [out, n_groups]: (q - z) * s."""
    out, inp = codes.shape
    width = spec.group_width(inp)
    full = inp // width
    w = codes.float()
    scale = scales.float().unsqueeze(-1)
    zero = float(1 << (spec.bits - 1)) if zeros is None else zeros.float().unsqueeze(-1)
    head = w[:, :full * width].unflatten(1, (full, width))
    head.sub_(zero if zeros is None else zero[:, :full]).mul_(scale[:, :full])
    if full * width < inp:  # short last group
        tail = w[:, full * width:]
        tail.sub_(zero if zeros is None else zero[:, full]).mul_(scale[:, full])
    return w


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored (clamped to the dtype's normal positive range), back in float32."""
    info = torch.finfo(dtype)
    return scale.clamp(info.tiny, info.max).to(dtype).float()


def _grouped(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w as [out, n_groups, width] (short last group padded by repeating its last column) and a 0/1 mask of real columns."""
    out, inp = w.shape
    width, n_groups = spec.group_width(inp), spec.n_groups(inp)
    pad = n_groups * width - inp
    if not pad:
        return w.view(out, n_groups, width), None
    mask = torch.ones(1, n_groups * width, dtype=w.dtype, device=w.device)
    mask[:, inp:] = 0
    w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.view(out, n_groups, width), mask.view(1, n_groups, width)


def _group_range(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (lo, hi) [out, n_groups] that ratio 1.0 maps onto the code range: (-max|w|, max|w|)
    symmetric, (min(w, 0), max(w, 0)) asymmetric. Computed once; each clipping ratio scales it."""
    if spec.symmetric:
        amax = wg.abs().amax(dim=-1)
        return -amax, amax
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, ratio: float, dtype: torch.dtype):
    """Stored scales and zero points [out, n_groups] (float32) at clipping `ratio`."""
    maxq = (1 << spec.bits) - 1
    scale = _stored((hi - lo) * (ratio / maxq), dtype)
    if spec.symmetric:
        return scale, torch.full_like(scale, float(1 << (spec.bits - 1)))
    return scale, torch.round(-lo * ratio / scale).clamp(0, maxq)


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integral float codes clamp(round(w / s + z), 0, 2^b - 1) of grouped weights."""
    q = torch.div(wg, scale.unsqueeze(-1))
    return q.add_(zero.unsqueeze(-1)).round_().clamp_(0, (1 << bits) - 1)


def _group_error(wg: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared quantization error per group [out, n_groups]."""
    err = _codes(wg, scale, zero, bits).sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).sub_(wg).square_()
    return (err if mask is None else err.mul_(mask)).sum(-1)


def _search_rows(wg: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec, ratios, dtype: torch.dtype):
    """Per-group best clipping ratio (first one wins ties) -> its stored scales and zero points."""
    lo, hi = _group_range(wg, spec)
    scale, zero = _scale_zero(lo, hi, spec, ratios[0], dtype)
    best = _group_error(wg, mask, scale, zero, spec.bits)
    for r in ratios[1:]:
        s_r, z_r = _scale_zero(lo, hi, spec, r, dtype)
        err = _group_error(wg, mask, s_r, z_r, spec.bits)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s_r, scale)
        zero = torch.where(better, z_r, zero)
    return scale, zero


ROW_CHUNK_ELEMENTS = 1 << 20  # rows searched together: keeps the clip search's temporaries cache sized


def quantize(weight: torch.Tensor, spec: QuantSpec, clip_search: bool = True,
             ratios: tuple[float, ...] = CLIP_RATIOS) -> QuantizedTensor:
    """Quantize a 2-D weight [out, in] (see `weight_matrix` for conv and HF Conv1D modules) under `spec`."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec={spec!r} must be a QuantSpec")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a non-empty 2-D tensor [out, in], got {got}; use weight_matrix(module) for conv layers")
    if not weight.is_floating_point():
        raise TypeError(f"weight.dtype={weight.dtype} must be a floating point dtype")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot quantize")
    ratios = tuple(ratios) if clip_search else (1.0,)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios={ratios!r} must be a non-empty sequence of values in (0, 1]")
    sdtype = getattr(torch, spec.scale_dtype)
    wg, mask = _grouped(w, spec)
    out, inp = w.shape
    step = max(1, ROW_CHUNK_ELEMENTS // wg[0].numel())
    parts = [_search_rows(wg[i:i + step], mask, spec, ratios, sdtype) for i in range(0, out, step)]
    scale = torch.cat([p[0] for p in parts])
    zero = torch.cat([p[1] for p in parts])
    codes = _codes(wg, scale, zero, spec.bits).view(out, -1)[:, :inp].to(torch.uint8)
    zeros = None if spec.symmetric else zero.to(torch.uint8)
    return QuantizedTensor(pack_bits(codes, spec.bits), scale.to(sdtype), zeros, (out, inp), spec)


def fake_quantize(weight: torch.Tensor, spec: QuantSpec, clip_search: bool = True) -> torch.Tensor:
    """quantize(...).dequantize() in weight's dtype and shape; conv weights [out, in, *k] are flattened and restored."""
    if isinstance(weight, torch.Tensor) and weight.dim() > 2:
        return fake_quantize(weight.reshape(weight.shape[0], -1), spec, clip_search).view(weight.shape)
    return quantize(weight, spec, clip_search).dequantize(weight.dtype)
