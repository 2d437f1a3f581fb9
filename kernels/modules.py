"""Quantized layers holding only packed codes, scales, zero points and bias as buffers (no float weight).

`quantize_module(module, spec)` turns nn.Linear / transformers Conv1D into `QuantizedLinear` and
nn.Conv1d / nn.Conv2d into `QuantizedConv`. The linear forward dispatches through the backend registry
(kernels.backends); the conv forward dequantizes and calls F.conv. Buffers (excluding bias) take exactly
`weight_nbytes(...)` bytes (with the zero beside each scale that a layer forced onto tinygemm holds); a backend
may hold the codes in its own layout of the same size, and the state dict always holds the dense packing and
plain scales, so `module.config()` + state dict rebuild the layer anywhere.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import a8_linear, cpu_backends, gpu_activation_quant, gpu_backends, ops  # noqa: F401  (importing them registers the backends and the op)
from .backends import (DENSE, Backend, convert_layout, forced_backend, get_backend, held_nbytes, in_backend_order,
                       layout_backend, select_backend)
from .choice import QuantSpec
from .layout import matrix_to_weight, module_kind, weight_matrix
from .memory import matrix_shape
from .packing import packed_nbytes
from .quantizer import QuantizedTensor, quantize


class _QuantizedWeight(nn.Module):
    """Shared buffers, (de)serialisation and layout handling of the quantized layers."""

    kind: str

    def __init__(self, kind: str, weight_shape: tuple[int, ...], spec: QuantSpec, bias: bool,
                 bias_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec={spec!r} must be a QuantSpec")
        self.kind = kind
        self.forced_backend: str | None = None
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.matrix_shape = matrix_shape(self.weight_shape, kind)
        self.spec = spec
        self._spec_key = ops.spec_key(spec)
        self.layout = DENSE
        out, inp = self.matrix_shape
        n_groups = spec.n_groups(inp)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(out * inp, spec.bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out, n_groups, dtype=getattr(torch, spec.scale_dtype), device=device))
        self.register_buffer("zeros", None if spec.symmetric else torch.zeros(out, n_groups, dtype=torch.uint8, device=device))
        bias_out = self.weight_shape[1] if kind == "hf_conv1d" else self.weight_shape[0]
        self.register_buffer("bias", torch.zeros(bias_out, dtype=bias_dtype, device=device) if bias else None)

    def set_quantized(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> None:
        """Fill the buffers from a QuantizedTensor of this layer's [out, in] shape (dense layout)."""
        if tuple(qt.shape) != self.matrix_shape or qt.spec != self.spec:
            raise ValueError(f"quantized tensor {qt.shape} {qt.spec} does not match layer {self.matrix_shape} {self.spec}")
        device = self.qweight.device
        self.qweight = qt.packed.to(device)
        self.scales = self._held_scales(qt.scales.to(device))
        self.zeros = None if qt.zeros is None else qt.zeros.to(device)
        self.layout = DENSE
        if bias is not None:
            self.bias = bias.detach().clone().to(device)

    def weight_nbytes(self) -> int:
        """Bytes held by the weight's buffers (codes + scales + zero points, and the zeros held beside the scales
        of a layer forced onto tinygemm; bias excluded)."""
        return sum(held_nbytes(b) for name, b in self.named_buffers() if name != "bias")

    def _held_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales as the forced backend holds them (tinygemm's: beside a zero each), else as given."""
        return scales if self.forced_backend is None else in_backend_order(scales, get_backend(self.forced_backend))

    def quantized_tensor(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (dense packing)."""
        packed = convert_layout(self.qweight, self.spec, self.matrix_shape, self.layout, DENSE)
        return QuantizedTensor(packed, self.scales, self.zeros, self.matrix_shape, self.spec)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight in the original module's layout (for inspection; not kept)."""
        return matrix_to_weight(self.quantized_tensor().dequantize(dtype), self.kind, self.weight_shape)

    def select(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """The backend a forward on (device, dtype) runs: the forced one (or its fallback where it cannot run), else
        the registry's best."""
        if self.forced_backend is not None:
            runs = forced_backend(self.forced_backend, self.spec, self.matrix_shape, device, dtype)
            if runs is not None:
                return runs
            backend = get_backend(self.forced_backend)
            why = backend.why_not and backend.why_not(self.spec, self.matrix_shape, device, dtype)
            raise ValueError(f"backend={backend.name!r} does not support {self.spec} {self.matrix_shape} on {device} with {dtype}"
                             + (f": {why}" if why else ""))
        return select_backend(self.spec, self.matrix_shape, device, dtype)

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] @ W^T + bias on the backend `select` picks for x2's device and dtype. Under torch.compile
        the backend of the last eager forward runs as one custom op (`kernels.ops`), so the graph does not break."""
        if torch.compiler.is_compiling():
            if self.backend is None:
                raise RuntimeError("a quantized layer picks its backend and weight layout in its first forward: run "
                                   "the model once eagerly on the target device and dtype before torch.compile")
            y = torch.ops.bitalloc.quantized_linear(x2, self.qweight, self.scales, self.zeros, self._spec_key,
                                                    *self.matrix_shape, self.layout, self.backend)
        else:
            backend = self.select(x2.device, x2.dtype)
            self._use_backend(backend)
            self.backend = backend.name
            y = backend.linear(x2, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _use_backend(self, backend: Backend) -> None:
        """Hold the codes in the backend's layout and the scales / zero points in its order (the forced backend's
        order where the layer runs its fallback; converted once)."""
        if backend.layout != self.layout:
            self.qweight = convert_layout(self.qweight, self.spec, self.matrix_shape, self.layout, backend.layout)
            self.layout = backend.layout
        holder = backend if self.forced_backend is None else get_backend(self.forced_backend)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t is not None and t is not (ordered := in_backend_order(t, holder)):
                setattr(self, name, ordered)

    def _apply(self, fn, recurse=True):
        """Move/cast buffers as usual, except the scales, which only move: their dtype is part of the spec."""
        scales = self.scales
        super()._apply(lambda t: t if t is scales else fn(t), recurse)
        self.scales = self._held_scales(scales.to(fn(torch.empty(0, device=scales.device)).device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != DENSE:
            destination[prefix + "qweight"] = convert_layout(self.qweight, self.spec, self.matrix_shape, self.layout, DENSE)
        for name in ("scales", "zeros"):  # group-major buffers (`Backend.group_major`) are saved row-major
            t = destination.get(prefix + name)
            if t is not None and not t.is_contiguous():
                destination[prefix + name] = t.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "qweight" in state_dict:
            self.layout = DENSE  # state dicts hold the dense packing, copied into qweight as is
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def config(self) -> dict[str, Any]:
        """JSON-able metadata that, with the state dict, rebuilds this layer (see `quantized_module_from_config`)."""
        config = {"kind": self.kind, "weight_shape": list(self.weight_shape), "spec": self.spec.to_dict(),
                  "bias": self.bias is not None,
                  "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None}
        if self.forced_backend is not None:  # e.g. "int8_act": a w8a8 layer stays one when it is loaded
            config["backend"] = self.forced_backend
        return config


class QuantizedLinear(_QuantizedWeight):
    """y = x @ W^T + b for a quantized nn.Linear or HF Conv1D (kind "hf_conv1d": weight_shape is [in, out])."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], spec: QuantSpec, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, backend: str | None = None,
                 device: torch.device | str | None = None) -> None:
        if kind not in ("linear", "hf_conv1d") or len(weight_shape) != 2:
            raise ValueError(f"QuantizedLinear needs kind 'linear' or 'hf_conv1d' and a 2-D weight_shape, got {kind!r} {tuple(weight_shape)}")
        super().__init__(kind, weight_shape, spec, bias, bias_dtype, device)
        self.forced_backend = None if backend is None else get_backend(backend).name
        self.scales = self._held_scales(self.scales)
        self.backend: str | None = None  # name of the backend used by the last forward

    @property
    def in_features(self) -> int:
        return self.matrix_shape[1]

    @property
    def out_features(self) -> int:
        return self.matrix_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects in_features={self.in_features}")
        return self._linear(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}, backend={self.backend or self.forced_backend}")


class QuantizedConv(_QuantizedWeight):
    """A quantized nn.Conv1d / nn.Conv2d. Pointwise ones (1x1, stride 1, no padding, one group) run as a linear over
    the channels on the linear backends, on CUDA up to PREFILL_DEQUANT_MIN_M rows (batch x positions: above it
    the linear path would dequantize + call cuBLAS anyway, and a conv saves moving the channels last and back);
    the others dequantize the weight per forward (on CUDA by the selected backend's kernel), then F.conv (no
    cached float weight): a storage-only saving."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], spec: QuantSpec, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 backend: str | None = None) -> None:
        dims = {"conv1d": 1, "conv2d": 2}.get(kind)
        if dims is None or len(weight_shape) != dims + 2:
            raise ValueError(f"QuantizedConv needs kind 'conv1d' or 'conv2d' with a matching weight_shape, got {kind!r} {tuple(weight_shape)}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode={padding_mode!r} is not supported; choose from ('zeros', 'reflect', 'replicate', 'circular')")
        super().__init__(kind, weight_shape, spec, bias, bias_dtype, device)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        if backend not in (None, "dequant") and not self.pointwise:
            raise ValueError(f"backend={backend!r} needs a pointwise convolution (1x1 kernel, stride 1, no padding, one "
                             f"group); this one runs dequantize + conv: choose None or 'dequant'")
        self.forced_backend = None if backend is None else get_backend(backend).name
        self.backend = None if self.pointwise else "dequant"

    @property
    def pointwise(self) -> bool:
        """A 1x1 kernel with stride 1, no padding, dilation 1 and one group: a linear over the channels, run by
        the linear backends (the registry's fastest for the device)."""
        ones = lambda v: all(int(e) == 1 for e in (v if isinstance(v, (tuple, list)) else (v,)))  # noqa: E731
        no_pad = self.padding in ("valid", "same") or all(
            int(e) == 0 for e in (self.padding if isinstance(self.padding, (tuple, list)) else (self.padding,)))
        return (all(k == 1 for k in self.weight_shape[2:]) and self.groups == 1 and ones(self.stride)
                and ones(self.dilation) and no_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, inp = self.matrix_shape
        if self.pointwise:
            if x.dim() < 2 or x.shape[1] != inp:
                raise ValueError(f"input of shape {tuple(x.shape)} does not have the layer's {inp} channels in dim 1")
            if (self.forced_backend is not None or x.device.type != "cuda"
                    or x.numel() // inp < gpu_backends.PREFILL_DEQUANT_MIN_M):
                xc = x.movedim(1, -1)
                return self._linear(xc.reshape(-1, inp)).view(*xc.shape[:-1], out).movedim(-1, 1).contiguous()
            self.backend = "dequant"
        w = self._float_weight(x.device, x.dtype).view(self.weight_shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        if self.padding_mode == "zeros":
            return conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups)
        pad = self.padding if isinstance(self.padding, (tuple, list)) else (self.padding,) * (len(self.weight_shape) - 2)
        x = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=self.padding_mode)
        return conv(x, w, bias, self.stride, 0, self.dilation, self.groups)

    def _float_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`: on CUDA by the selected backend's dequantize kernel (codes kept in its
        layout), else from the dense packing."""
        if self.forced_backend is None and device.type == "cuda":
            if torch.compiler.is_compiling():  # the layout an eager forward chose, through a custom op (`kernels.ops`)
                owner = layout_backend(self.layout)
                if owner is not None and owner.dequantize is not None:
                    return torch.ops.bitalloc.dequantize(self.qweight, self.scales, self.zeros, self._spec_key,
                                                         *self.matrix_shape, self.layout, dtype)
            else:
                backend = self.select(device, dtype)
                if backend.dequantize is not None:
                    self._use_backend(backend)
                    return backend.dequantize(self, dtype).contiguous()
        if self.layout != DENSE:  # codes in a layout without a dequantize kernel: back to the dense packing, once
            self.qweight = convert_layout(self.qweight, self.spec, self.matrix_shape, self.layout, DENSE)
            self.layout = DENSE
        return self.quantized_tensor().dequantize(dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stride": _listify(self.stride), "padding": _listify(self.padding),
                "dilation": _listify(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode}

    def extra_repr(self) -> str:
        return (f"{self.kind}, weight_shape={self.weight_shape}, stride={self.stride}, padding={self.padding}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}, backend={self.backend}")


def _listify(v):
    return list(v) if isinstance(v, tuple) else v


def _tuplify(v):
    return tuple(v) if isinstance(v, list) else v


def quantize_module(module: nn.Module, spec: QuantSpec, clip_search: bool = True, backend: str | None = None) -> nn.Module:
    """A quantized copy of `module` (nn.Linear, HF Conv1D, nn.Conv1d, nn.Conv2d) holding only packed buffers."""
    kind = module_kind(module)
    weight = module.weight
    qt = quantize(weight_matrix(module), spec, clip_search=clip_search)
    has_bias = module.bias is not None
    bias_dtype = module.bias.dtype if has_bias else weight.dtype
    if kind in ("linear", "hf_conv1d"):
        q = QuantizedLinear(kind, tuple(weight.shape), spec, has_bias, bias_dtype, backend=backend, device=weight.device)
    else:
        q = QuantizedConv(kind, tuple(weight.shape), spec, has_bias, bias_dtype, module.stride, module.padding,
                          module.dilation, module.groups, module.padding_mode, device=weight.device, backend=backend)
    q.set_quantized(qt, module.bias)
    return q


def quantized_module_from_config(config: dict[str, Any], device: torch.device | str | None = None,
                                 backend: str | None = None) -> nn.Module:
    """An empty quantized layer from `module.config()`; fill it with `load_state_dict`. `backend` forces one (default:
    the config's, if it names one)."""
    backend = backend or config.get("backend")
    try:
        kind, shape, spec = config["kind"], tuple(config["weight_shape"]), QuantSpec.from_dict(config["spec"])
        bias_dtype = getattr(torch, config.get("bias_dtype") or "float32")
        if kind in ("linear", "hf_conv1d"):
            return QuantizedLinear(kind, shape, spec, config["bias"], bias_dtype, backend=backend, device=device)
        return QuantizedConv(kind, shape, spec, config["bias"], bias_dtype, _tuplify(config["stride"]), _tuplify(config["padding"]),
                             _tuplify(config["dilation"]), config["groups"], config["padding_mode"], device=device,
                             backend=backend)
    except KeyError as e:
        raise ValueError(f"config is missing key {e}; expected the dict of module.config()") from None


def quantized_module_from_state(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                                device: torch.device | str | None = None, backend: str | None = None) -> nn.Module:
    """Rebuild a saved quantized layer: `module.config()` (JSON) + its state dict (e.g. from safetensors)."""
    module = quantized_module_from_config(config, device, backend)
    module.load_state_dict(state_dict)
    return module
