"""Custom ops for torch.compile: `torch.ops.bitalloc.quantized_linear` (a quantized layer's matmul) and
`torch.ops.bitalloc.dequantize` (a weight's float copy from a backend's own layout, for the convs that dequantize
on CUDA). Each is opaque to the compiler, so `torch.compile(qmodel, fullgraph=True)` traces a quantized model
without a graph break per layer (the backend registry's Python dispatch and the Triton launches stay out of the
traced graph) and fuses the float ops around them.

The ops run the backend a quantized layer chose in its last eager forward (`QuantizedLinear.backend`), on the
buffers as that backend holds them: one eager forward on the target device and dtype comes first.
"""
from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import torch

from .backends import get_backend, layout_backend
from .choice import QuantSpec


@functools.lru_cache(maxsize=None)
def _spec(spec_json: str) -> QuantSpec:
    return QuantSpec.from_dict(json.loads(spec_json))


def _layer(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: str, out_features: int,
           in_features: int, layout: str) -> SimpleNamespace:
    """The QuantizedWeightLike a backend reads, from the op's arguments."""
    return SimpleNamespace(qweight=qweight, scales=scales, zeros=zeros, spec=_spec(spec),
                           matrix_shape=(out_features, in_features), layout=layout)


def spec_key(spec: QuantSpec) -> str:
    """The op's string form of a QuantSpec (custom ops take no dataclasses)."""
    return json.dumps(spec.to_dict(), sort_keys=True)


@torch.library.custom_op("bitalloc::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     spec: str, out_features: int, in_features: int, layout: str, backend: str) -> torch.Tensor:
    """x [M, in] @ W^T -> [M, out] by `backend` on a layer's buffers (codes in `layout`)."""
    chosen = get_backend(backend)
    layer = _layer(qweight, scales, zeros, spec, out_features, in_features, layout)
    if chosen.layout != layout or not chosen.supports(layer.spec, layer.matrix_shape, x.device, x.dtype):
        raise ValueError(f"the layer last ran backend {backend!r} with its codes in layout {layout!r}, which cannot "
                         f"run {x.dtype} inputs on {x.device}; run one forward eagerly on this device and dtype "
                         "before torch.compile")
    return chosen.linear(x, layer)


@quantized_linear.register_fake
def _(x, qweight, scales, zeros, spec, out_features, in_features, layout, backend):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("bitalloc::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: str, out_features: int,
               in_features: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [out, in] in `dtype` by the dequantize kernel of the backend that owns `layout`."""
    owner = layout_backend(layout)
    if owner is None or owner.dequantize is None:
        raise ValueError(f"layout {layout!r} has no dequantize kernel")
    layer = _layer(qweight, scales, zeros, spec, out_features, in_features, layout)
    return owner.dequantize(layer, dtype).contiguous()


@dequantize.register_fake
def _(qweight, scales, zeros, spec, out_features, in_features, layout, dtype):
    return qweight.new_empty((out_features, in_features), dtype=dtype)
