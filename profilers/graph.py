"""The layer graph: every quantizable layer of a model and the data flow between them.

Found by one traced forward on example inputs: forward hooks record each layer's calls
(MACs) and tag its output tensor; a TorchFunctionMode propagates, through every other torch
op, the set of quantizable layers each tensor depends on (its nearest quantizable
ancestors). A layer's inputs' tags are its producers, so attention (q/k/v -> o_proj via
matmul/softmax) and residual paths show up as edges.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from kernels.fileio import atomic_write_json
from kernels.latency import conv_geometries
from kernels.layout import module_kind

from .calibration import Batch, call_model, describe

KINDS = ("linear", "conv1d", "conv2d", "hf_conv1d")
_TAG = "_bitalloc_producers"


@dataclass
class LayerInfo:
    """One quantizable layer.

    name: qualified module name; kind: "linear" | "conv1d" | "conv2d" | "hf_conv1d";
    weight_shape: the parameter's shape as stored; params: weight element count;
    macs: multiply-accumulates per sample in the traced forward (summed over calls);
    in_features / out_features: columns / rows of the 2-D weight matrix [out, in*kernel/groups];
    conv: for conv kinds, each distinct geometry the traced forward ran (`conv_geometry`: input shape per sample,
    stride, padding, dilation, groups, padding mode) with the number of calls at it ("calls"; a head shared
    across feature-map sizes has several), so latency tables time the layer as the model runs it; else None;
    calls: how often the traced forward ran the layer (a module reused in a loop or shared between blocks pays
    its latency once per call).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    in_features: int
    out_features: int
    conv: list[dict[str, Any]] | None = None
    calls: int = 1

    def __post_init__(self) -> None:
        self.weight_shape = tuple(self.weight_shape)
        self.conv = conv_geometries(self.conv, self.calls)


@dataclass
class LayerGraph:
    """Quantizable layers (module order), skipped layers with reasons, and the data-flow DiGraph."""

    layers: list[LayerInfo]
    skipped: dict[str, str] = field(default_factory=dict)
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def __getitem__(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no quantizable layer {name!r}")

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(l) | {"weight_shape": list(l.weight_shape)} for l in self.layers],
            "skipped": dict(self.skipped),
            "edges": [[a, b] for a, b in self.graph.edges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerGraph":
        layers = [LayerInfo(**l) for l in d["layers"]]
        g = nx.DiGraph()
        g.add_nodes_from(l.name for l in layers)
        g.add_edges_from((a, b) for a, b in d.get("edges", []))
        return cls(layers, dict(d.get("skipped", {})), g)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayerGraph":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a quantizable module (`kernels.layout.module_kind`), None for anything else."""
    try:
        return module_kind(module)
    except TypeError:
        return None


def _matrix_dims(module: nn.Module, kind: str) -> tuple[int, int]:
    w = module.weight
    if kind == "linear":
        return w.shape[1], w.shape[0]
    if kind == "hf_conv1d":
        return w.shape[0], w.shape[1]
    return math.prod(w.shape[1:]), w.shape[0]


def conv_geometry(module: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """A conv layer's geometry for input `x` (batch first): what `kernels.latency` needs to time it as it runs."""
    listed = lambda v: v if isinstance(v, str) else [int(e) for e in v]  # noqa: E731
    return {"in_shape": [int(d) for d in x.shape[1:]], "stride": listed(module.stride),
            "padding": listed(module.padding), "dilation": listed(module.dilation), "groups": int(module.groups),
            "padding_mode": module.padding_mode}


def _producers(obj: Any) -> frozenset[str]:
    out: frozenset[str] = frozenset()
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor):
            out = out | getattr(t, _TAG, frozenset())
    return out


def _tag(obj: Any, producers: frozenset[str]) -> None:
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor):
            setattr(t, _TAG, producers)


class _ProducerMode(TorchFunctionMode):
    """Propagates the producer tags from every torch op's tensor inputs to its outputs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        producers = _producers((args, kwargs))
        if producers:
            if func is torch.Tensor.__setitem__:
                _tag(args[0], producers)
            else:
                _tag(out, producers)
        return out


def build_layer_graph(model: nn.Module, example_batch: Batch) -> LayerGraph:
    """Trace one forward of `example_batch` (tensor, tuple or dict of inputs) through `model`.

    Layers whose weight is shared with another module (e.g. an lm_head tied to the token
    embedding) and layers the forward never calls are listed in `skipped` with the reason.
    Raises ValueError for a model without quantizable layers.
    """
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])

    candidates: dict[str, tuple[nn.Module, str]] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        others = [o for o in owners.get(id(module.weight), []) if o != name]
        if others:
            skipped[name] = f"weight tied to {others[0]}"
            continue
        candidates[name] = (module, kind)
    if not candidates and not skipped:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D)"
        )

    batch_tensors = [t for t in tree_leaves(example_batch) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not batch_tensors:
        raise ValueError(f"example batch holds no tensor with a batch dimension: {describe(example_batch)}")
    batch_size = batch_tensors[0].shape[0]

    macs: dict[str, int] = {}
    calls: dict[str, int] = {}
    geometry: dict[str, dict[str, dict[str, Any]]] = {}  # name -> geometry as JSON -> geometry with its calls
    edges: set[tuple[str, str]] = set()

    def pre_hook(name: str):
        def hook(mod, args, kwargs):
            for producer in _producers((args, kwargs)):
                if producer != name:
                    edges.add((producer, name))
        return hook

    def post_hook(name: str, kind: str):
        in_f, _ = _matrix_dims(candidates[name][0], kind)
        def hook(mod, args, kwargs, out):
            macs[name] = macs.get(name, 0) + out.numel() // batch_size * in_f
            calls[name] = calls.get(name, 0) + 1
            if kind in ("conv1d", "conv2d"):
                g = conv_geometry(mod, args[0] if args else kwargs["input"])
                geometry.setdefault(name, {}).setdefault(json.dumps(g), g | {"calls": 0})["calls"] += 1
            _tag(out, frozenset({name}))
        return hook

    handles = []
    for name, (module, kind) in candidates.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name, kind), with_kwargs=True))
    try:
        with torch.no_grad(), _ProducerMode():
            call_model(model, example_batch, "example batch")
    finally:
        for h in handles:
            h.remove()
        for t in list(model.parameters()) + list(model.buffers()) + tree_leaves(example_batch):
            if isinstance(t, torch.Tensor) and hasattr(t, _TAG):
                delattr(t, _TAG)

    layers = []
    for name, (module, kind) in candidates.items():
        if name not in macs:
            skipped[name] = "not called in the traced forward"
            continue
        in_f, out_f = _matrix_dims(module, kind)
        layers.append(LayerInfo(name, kind, tuple(module.weight.shape), module.weight.numel(), macs[name], in_f, out_f,
                                list(geometry[name].values()) if name in geometry else None, calls[name]))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layer left; skipped: {skipped}")
    g = nx.DiGraph()
    g.add_nodes_from(l.name for l in layers)
    g.add_edges_from(e for e in edges if e[0] in g and e[1] in g)
    return LayerGraph(layers, skipped, g)
