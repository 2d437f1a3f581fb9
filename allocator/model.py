"""Model-level helpers: identity, layer kinds, storage of the unquantized rest, loading from disk or hub."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from kernels.backends import held_nbytes
from profilers import model_hash
from profilers.graph import layer_kind

from .plan import ModelIdentity

__all__ = ["layer_kind", "model_identity", "storage_bytes", "load_model"]


def model_identity(model: nn.Module) -> ModelIdentity:
    """Name (HF ``name_or_path`` or the class name) and hash of a model's weights."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    n_params = sum(p.numel() for p in model.parameters())
    return ModelIdentity(name=name, hash=model_hash(model), n_params=n_params)


def storage_bytes(model: nn.Module, exclude: set[str] = frozenset()) -> int:
    """Bytes of every distinct parameter and buffer not owned by a module in ``exclude`` (weights shared by
    several modules, e.g. tied embeddings, count once; scales held beside zeros for tinygemm count the zeros)."""
    seen: set[int] = set()
    total = 0
    for module_name, module in model.named_modules():
        if module_name in exclude:
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor is None or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += held_nbytes(tensor)
    return total


def quantized_layer_bias_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes of the biases of the layers to be quantized (they stay in float, stored beside the codes)."""
    modules = dict(model.named_modules())
    return sum(m.bias.numel() * m.bias.element_size() for n in names if (m := modules[n]).bias is not None)


def load_model(path_or_id: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a Hugging Face model from a local directory or a hub id, picking the class its config names."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path_or_id)
    except OSError as e:
        raise FileNotFoundError(f"cannot load a model config from {str(path_or_id)!r}: {e}") from None
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), transformers.AutoModel)
    model = cls.from_pretrained(path_or_id, dtype=dtype) if dtype is not None else cls.from_pretrained(path_or_id)
    return model.eval()
