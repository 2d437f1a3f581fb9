"""Registry of matmul backends for quantized linear layers.

A backend says which (spec, [out, in] shape, device, activation dtype) it can run correctly
(`supports`), where it is worth picking automatically (`fast`, default: wherever it runs), and computes
x2d [M, in] @ W^T -> [M, out] from a quantized layer's buffers. A backend may keep the packed codes in
its own layout (same byte count as the dense packing): `to_layout` converts dense codes into it,
`from_layout` back, so saved state dicts always hold the dense, portable packing; with `group_major` the layer
also stores its scales and zero points group-major (saved contiguous all the same).
New backends (e.g. GPU ones) plug in with `register_backend(Backend(...))`; the dispatch picks the
supporting, fast backend of highest priority; a layer can also force any supporting backend by name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol

import torch

from .choice import QuantSpec

DENSE = "dense"


class QuantizedWeightLike(Protocol):
    """What a backend reads from a quantized layer."""

    qweight: torch.Tensor            # uint8 1-D, packed codes in the layer's current `layout`
    scales: torch.Tensor             # [out, n_groups] in spec.scale_dtype
    zeros: torch.Tensor | None       # [out, n_groups] uint8 (asymmetric) or None
    spec: QuantSpec
    matrix_shape: tuple[int, int]    # (out, in)
    layout: str


@dataclass(frozen=True)
class Backend:
    """One way to run x @ W^T for a quantized weight."""

    name: str
    supports: Callable[[QuantSpec, tuple[int, int], torch.device, torch.dtype], bool]
    linear: Callable[[torch.Tensor, QuantizedWeightLike], torch.Tensor]
    priority: int = 0
    layout: str = DENSE
    to_layout: Callable[[torch.Tensor, QuantSpec, tuple[int, int]], torch.Tensor] | None = None
    from_layout: Callable[[torch.Tensor, QuantSpec, tuple[int, int]], torch.Tensor] | None = None
    fast: Callable[[QuantSpec, tuple[int, int], torch.device, torch.dtype], bool] | None = None
    # reads scales / zero points [out, n_groups] group by group: the layer then stores them group-major (the
    # transpose of a contiguous [n_groups, out]; same shape and bytes), so a tile of output columns is one load
    group_major: bool = False
    # the float [out, in] weight from the backend's layout (layers that dequantize, then call a framework op such
    # as cuDNN's conv); None: they read the dense packing
    dequantize: Callable[[QuantizedWeightLike, torch.dtype], torch.Tensor] | None = None
    # why a layer forced onto this backend cannot run on (device, dtype), where the backend can say more than
    # "does not support" (e.g. the compute capability it needs); None where it can run or has nothing to add
    why_not: Callable[[QuantSpec, tuple[int, int], torch.device, torch.dtype], str | None] | None = None
    # reads each scale with a zero beside it, [n_groups, out, 2] in the scales' dtype (torch's int4 kernels): the
    # layer then holds its scales as a view into such a tensor (`zero_beside`), which the backend reads whole
    zero_beside: bool = False
    # the backend a layer forced onto this one runs where this one cannot (None: such a layer raises there)
    fallback: str | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name; a custom layout needs both converters."""
    if backend.layout != DENSE and (backend.to_layout is None or backend.from_layout is None):
        raise ValueError(f"backend {backend.name!r} has layout {backend.layout!r} but no to_layout/from_layout")
    BACKENDS[backend.name] = backend
    return backend


def select_backend(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Backend:
    """The supporting (and fast, where it says) backend of highest priority (ties: first registered)."""
    found = [b for b in BACKENDS.values()
             if b.supports(spec, shape, device, dtype) and (b.fast is None or b.fast(spec, shape, device, dtype))]
    if not found:
        raise RuntimeError(f"no backend supports {spec} for shape {shape} on {device} with {dtype}; registered: {list(BACKENDS)}")
    return max(found, key=lambda b: b.priority)


def get_backend(name: str) -> Backend:
    """The backend registered under `name`, with a clear error otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not registered; choose from {tuple(BACKENDS)}")
    return BACKENDS[name]


def forced_backend(name: str, spec: QuantSpec, shape: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> Backend | None:
    """What a layer forced onto backend `name` runs on (device, dtype): that backend, or its fallback where it cannot
    run (None: neither)."""
    backend = get_backend(name)
    if backend.supports(spec, shape, device, dtype):
        return backend
    return None if backend.fallback is None else get_backend(backend.fallback)


def layout_backend(layout: str) -> Backend | None:
    """The backend owning a non-dense layout (None for the dense one)."""
    if layout == DENSE:
        return None
    for b in BACKENDS.values():
        if b.layout == layout:
            return b
    raise ValueError(f"layout={layout!r} has no registered backend; layouts: {sorted({b.layout for b in BACKENDS.values()})}")


def in_backend_order(t: torch.Tensor | None, backend: Backend) -> torch.Tensor | None:
    """Scales / zero points [out, n_groups] stored as `backend` reads them: group-major, row-major, or (scales
    of a `zero_beside` backend) a view into [n_groups, out, 2] with a zero beside each scale."""
    if backend.zero_beside and t is not None and t.is_floating_point():
        return t if holds_zero_beside(t) else with_zero_beside(t)
    if t is None or (t.t().is_contiguous() if backend.group_major else t.is_contiguous()):
        return t
    return t.t().contiguous().t() if backend.group_major else t.contiguous()


def with_zero_beside(scales: torch.Tensor) -> torch.Tensor:
    """Scales [out, n_groups] as a view into a new [n_groups, out, 2] tensor holding a zero beside each scale."""
    out, groups = scales.shape
    held = torch.zeros(groups, out, 2, dtype=scales.dtype, device=scales.device)
    held[..., 0] = scales.t()
    return held[..., 0].t()


def holds_zero_beside(scales: torch.Tensor) -> bool:
    """Whether `scales` [out, n_groups] is a view `with_zero_beside` made (the whole of its storage)."""
    out, groups = scales.shape
    return (scales.stride() == (2, 2 * out) and scales.storage_offset() == 0
            and scales.untyped_storage().nbytes() == 2 * scales.numel() * scales.element_size())


def held_nbytes(t: torch.Tensor) -> int:
    """Bytes a buffer holds: numel x itemsize, or for scales held `with_zero_beside` the zeros too."""
    if t.dim() == 2 and t.is_floating_point() and holds_zero_beside(t):
        return t.untyped_storage().nbytes()
    return t.numel() * t.element_size()


def scale_zero(scales: torch.Tensor) -> torch.Tensor:
    """The [n_groups, out, 2] tensor a `with_zero_beside` view of scales [out, n_groups] is part of."""
    out, groups = scales.shape
    return scales.as_strided((groups, out, 2), (2 * out, 2, 1), 0)


def layer_view(qt, backend: Backend, device: torch.device | str) -> SimpleNamespace:
    """A QuantizedWeightLike of QuantizedTensor `qt` on `device`, held as a quantized layer run by `backend` holds it."""
    move = lambda t: in_backend_order(None if t is None else t.to(device), backend)  # noqa: E731
    return SimpleNamespace(qweight=convert_layout(qt.packed, qt.spec, qt.shape, DENSE, backend.layout).to(device),
                           scales=move(qt.scales), zeros=move(qt.zeros), spec=qt.spec, matrix_shape=qt.shape,
                           layout=backend.layout)


def convert_layout(qweight: torch.Tensor, spec: QuantSpec, shape: tuple[int, int], src: str, dst: str) -> torch.Tensor:
    """Packed codes in layout `src` -> layout `dst` (through the dense packing)."""
    if src == dst:
        return qweight
    owner = layout_backend(src)
    dense = qweight if owner is None else owner.from_layout(qweight, spec, shape)
    target = layout_backend(dst)
    return dense if target is None else target.to_layout(dense, spec, shape)
