"""Apply a plan to a model, and save / load the quantized model (safetensors + plan.json + config)."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from kernels import Choice, LatencyTable, quantize_module, quantized_module_from_config
from kernels.a8_linear import act_backend
from kernels.fileio import atomic_write, atomic_write_json
from kernels.gpu_activation_quant import ACT_QUANT_KINDS, unsupported_reason
from kernels.latency import device_name, use_paths
from kernels.memory import matrix_shape

from .io import read_json
from .plan import LayerPlan, Plan, PlanError

PLAN_ATTR = "bitalloc_plan"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "bitalloc.json"
KERNELS_FILE = "kernels.json"
FORMAT_VERSION = 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply(model: nn.Module, plan: Plan, inplace: bool = False, check_hash: bool = True) -> nn.Module:
    """Replace every planned layer of ``model`` by a quantized module holding its packed codes.

    The float model is left untouched unless ``inplace=True``. The plan is validated first (layer names,
    kinds, shapes and, unless ``check_hash=False``, the model's weights hash).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an allocator.Plan, got {type(plan).__name__}")
    plan.validate(model, check_hash=check_hash)
    backends = {layer.name: _backend_for(layer) for layer in plan.layers}
    qmodel = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for layer in plan.layers:
            _set_submodule(qmodel, layer.name, quantize_module(qmodel.get_submodule(layer.name), layer.spec,
                                                               backend=backends[layer.name]))
    setattr(qmodel, PLAN_ATTR, plan)
    return qmodel


def _backend_for(layer: LayerPlan) -> str | None:
    """The backend a planned layer is forced onto, for a linear layer whose choice quantizes activations
    (`a8_linear.act_backend`): "int8_act" for w8gca8 (int8 x int8 on byte-wide codes) where torch._int_mm takes the
    shape, "int8_act_packed" otherwise, "fp8_act_packed" for float8 activations (both on the packed codes,
    `a8_linear.PATHS`); a library kernel's backend for a choice that names one (`Choice.kernel`: "tinygemm"); None
    (the registry's pick) for the other layers. Convs run such choices weight-only, as
    their latency entries time them."""
    choice = Choice.parse(layer.choice)
    if choice.kernel is not None:
        reason = choice.kernel_reason(layer.kind, matrix_shape(layer.weight_shape, layer.kind))
        if reason is not None:
            raise ValueError(f"plan layer {layer.name!r}: {reason}")
        return choice.kernel
    if layer.abits is None or layer.kind not in ACT_QUANT_KINDS:
        return None
    reason = unsupported_reason(choice)
    if reason is not None:
        raise ValueError(f"plan layer {layer.name!r}: {reason}")
    return act_backend(layer.spec, matrix_shape(layer.weight_shape, layer.kind), choice.act_format).name


def quantized_bytes(qmodel: nn.Module) -> dict[str, int]:
    """Measured bytes held by each quantized layer's weight buffers (codes + scales + zero points)."""
    plan = _plan_of(qmodel)
    return {layer.name: qmodel.get_submodule(layer.name).weight_nbytes() for layer in plan.layers}


def _plan_of(qmodel: nn.Module) -> Plan:
    plan = getattr(qmodel, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("this model carries no bitalloc plan; quantize it with plan.apply(model) first")
    return plan


def save_quantized(qmodel: nn.Module, directory: str | os.PathLike, latency_table: LatencyTable | None = None) -> Path:
    """Save a quantized model to ``directory``: model.safetensors (packed codes, scales, the float rest),
    plan.json, bitalloc.json and, for Hugging Face models, config.json. Each file is written atomically.

    latency_table: the table measured for this model's layers; its fastest of our CUDA kernel paths and tiles for
    them go into kernels.json, which ``load_quantized`` installs, so the loaded model runs as the table predicts
    (without it, the layers run the default tiles)."""
    plan = _plan_of(qmodel)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_model(qmodel, tmp))
    plan.save(directory / PLAN_FILE)
    config = getattr(qmodel, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config = copy.deepcopy(config)
        config.architectures = config.architectures or [type(qmodel).__name__]
        atomic_write(directory / "config.json", lambda tmp: config.to_json_file(tmp))
    layers = [(layer.kind, matrix_shape(layer.weight_shape, layer.kind), layer.choice) for layer in plan.layers]
    paths = latency_table.measured_paths(layers) if latency_table is not None else []
    if paths:
        atomic_write_json(directory / KERNELS_FILE, {"device": latency_table.device, "versions": latency_table.versions,
                                                     "paths": paths})
    else:  # none measured (no table, or a CPU one); a previous save's paths belong to its table
        (directory / KERNELS_FILE).unlink(missing_ok=True)
    atomic_write_json(directory / MANIFEST_FILE, {
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(qmodel).__module__}.{type(qmodel).__qualname__}",
        "huggingface": config is not None,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "layers": {layer.name: qmodel.get_submodule(layer.name).config() for layer in plan.layers},
        "dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in _tensors(qmodel) if t.is_floating_point()},
    })
    return directory


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a model saved by ``save_quantized``; outputs are bit-for-bit those of the saved model. Measured
    kernel paths saved with it (kernels.json) are installed for this process's CUDA layers.

    Hugging Face models are rebuilt from config.json; for any other model pass ``model``, an instance of the
    same float architecture (its weights are replaced).
    """
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_FILE, "bitalloc manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory} holds format_version {manifest.get('format_version')!r}; this bitalloc reads {FORMAT_VERSION}")
    plan = Plan.load(directory / PLAN_FILE)
    if model is None:
        if not manifest.get("huggingface"):
            raise ValueError(f"{directory} holds a {manifest.get('model_class')} (not a Hugging Face model): "
                             "pass model=<an instance of that architecture> to load_quantized")
        model = _hf_skeleton(directory, manifest.get("attn_implementation"))
    else:
        model = copy.deepcopy(model)
    try:
        plan.validate(model, check_hash=False)
    except PlanError as e:
        raise ValueError(f"the model given does not match the saved plan: {e}") from None
    layers = manifest.get("layers", {})
    for layer in plan.layers:
        if layer.name not in layers:
            raise ValueError(f"{directory / MANIFEST_FILE} lacks the quantized layer {layer.name!r} of the plan")
        _set_submodule(model, layer.name, quantized_module_from_config(layers[layer.name]))
    _cast(model, manifest.get("dtypes", {}), directory / MANIFEST_FILE)
    missing, unexpected = load_model(model, directory / WEIGHTS_FILE, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if (directory / KERNELS_FILE).exists():
        kernels = read_json(directory / KERNELS_FILE, "measured kernel paths")
        try:
            use_paths(kernels["paths"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory / KERNELS_FILE} is malformed: {e}") from None
        here = device_name("cuda") if torch.cuda.is_available() else None
        if here is not None and kernels.get("device") != here:
            warnings.warn(f"{directory / KERNELS_FILE} holds kernel tiles measured on {kernels.get('device')}, not on "
                          f"this {here}: they are correct here but may not be the fastest (measure a table here and "
                          "save again)", stacklevel=2)
    setattr(model, PLAN_ATTR, plan)
    return model.eval()


def _tensors(model: nn.Module):
    """(name, tensor) of every parameter (tied ones once) and buffer, persistent or not."""
    return [*model.named_parameters(), *model.named_buffers()]


def _cast(model: nn.Module, dtypes: dict[str, str], manifest: Path) -> None:
    """Give each float parameter and buffer the dtype it was saved in (a bfloat16 model's rest comes back in
    bfloat16, and its non-persistent buffers, such as rotary frequencies, as they were), before the weights load."""
    for name, t in _tensors(model):
        want = dtypes.get(name)
        if want is None or str(t.dtype).removeprefix("torch.") == want:
            continue
        dtype = getattr(torch, want, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{manifest} gives {name!r} the dtype {want!r}, which is not a torch float dtype")
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf].data = t.data.to(dtype)
        else:
            module._buffers[leaf] = t.to(dtype)


def _hf_skeleton(directory: Path, attn_implementation: str | None) -> nn.Module:
    """The float architecture named by config.json, with the attention implementation the model was saved with."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(f"config.json in {directory} names no known transformers architecture ({architectures})")
    return cls(config).eval()
