"""Exact memory model of a quantized weight: packed code bytes + scale bytes + zero-point bytes."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .choice import QuantSpec
from .packing import packed_nbytes

SCALE_ITEMSIZE = {name: torch.empty(0, dtype=getattr(torch, name)).element_size() for name in ("float16", "bfloat16", "float32")}


def matrix_shape(shape: Sequence[int], kind: str = "linear") -> tuple[int, int]:
    """[out, in] of a weight shape of a layer of `kind`; conv shapes [out, in, *kernel] flatten to
    [out, in*prod(kernel)], and HF Conv1D weights ([in, out]) are read transposed."""
    dims = tuple(int(d) for d in (shape[::-1] if kind == "hf_conv1d" else shape))
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise ValueError(f"shape={tuple(shape)} is not a weight shape; expected [out, in] or [out, in, *kernel] with positive sizes")
    return dims[0], math.prod(dims[1:])


def weight_nbytes(shape: Sequence[int], spec: QuantSpec, kernel: str | None = None) -> int:
    """Bytes stored for a weight of `shape` ([out, in]; HF Conv1D weights must be given transposed) under `spec`,
    held for `kernel` (`Choice.kernel`): "tinygemm" keeps a zero beside each scale, in the scale's dtype."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec={spec!r} must be a QuantSpec")
    out, inp = matrix_shape(shape)
    n_scales = out * spec.n_groups(inp)
    zero_bytes = n_scales * SCALE_ITEMSIZE[spec.scale_dtype] if kernel == "tinygemm" else (0 if spec.symmetric else n_scales)
    return packed_nbytes(out * inp, spec.bits) + n_scales * SCALE_ITEMSIZE[spec.scale_dtype] + zero_bytes
