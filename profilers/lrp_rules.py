"""LRP rules for CNNs, MLPs and transformers, as "gradient x input with detach tricks".

Every rule rewrites one operation's output so that its *value* is unchanged but its
*gradient* is the LRP rule's: with relevance R_out = y * dS/dy at an output, the relevance at
an input is R_in = x * dS/dx. Composed over the network, `x * grad` at any tensor is the LRP
relevance there, and a rule that conserves locally conserves end to end.

Rules (one per layer kind; sources in brackets):
- `linear_rule`   Linear / Conv / HF Conv1D: epsilon rule, optional gamma rule
                  [Bach et al. 2015; Montavon et al. 2019, "Layer-wise relevance propagation:
                  an overview"]. Bias and epsilon absorb R * (b / z) and R * eps / (z + eps).
- `layernorm_rule` LayerNorm with the normalization scale 1/std treated as constant: the
                  centring stays linear, so x * grad conserves up to the bias
                  [Ali et al. 2022, "XAI for transformers" (LN rule); AttnLRP, Achtibat et al. 2024].
- `gate_rule`     elementwise y = f(x) read as y = x * (f(x)/x) with the gate detached: the
                  identity rule R_in = R_out. Used for GELU/SiLU/ReLU/Tanh/... and RMSNorm
                  (y = x * (w / rms(x)) elementwise) [AttnLRP identity rule].
- `uniform_rule`  product of two variable inputs (q @ k^T, attn @ v, gated MLP a * b): half of
                  the relevance to each operand [AttnLRP uniform rule].
- softmax: "attnlrp" keeps its gradient, which is AttnLRP's rule R_in = x * (R - s * sum R)
  (the Taylor bias absorbs the rest); "cp" detaches it (a constant gate, CP-LRP), so q and k
  receive no relevance and attention conserves exactly [Ali et al. 2022].
- residual adds, pooling, dropout, reshapes, embeddings, BatchNorm: unchanged; x * grad of a
  sum splits relevance in proportion to the summands, max/avg pooling are piecewise linear.

`LRPRules` installs them on a model (forward hooks for modules, a TorchFunctionMode for
functional ops and scaled_dot_product_attention). Modules with no rule are listed in
`fallback`: relevance passes through them as plain gradient x input.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

ATTENTION_MODES = ("attnlrp", "cp")

PASSTHROUGH = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
)
UNSUPPORTED = (nn.MultiheadAttention, nn.RNNBase)  # composite modules whose internals no rule sees


def stabilize(z: Tensor, eps: float) -> Tensor:
    """z + eps * sign(z), with sign(0) = +1: the epsilon rule's denominator."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def carry(value: Tensor, linear: Tensor, factor: Tensor | float = 1.0) -> Tensor:
    """A tensor equal to `value` whose gradient is that of `linear * factor` (factor constant)."""
    factor = factor.detach() if isinstance(factor, Tensor) else factor
    return value.detach() + (linear - linear.detach()) * factor


def linear_rule(z: Tensor, z_mod: Tensor, eps: float) -> Tensor:
    """Epsilon (z_mod = z) or gamma (z_mod from W + gamma * W+, b + gamma * b+) rule:
    R_in = x * W_mod^T (R_out / stabilize(z_mod))."""
    return carry(z, z_mod, z / stabilize(z_mod, eps))


def gate_rule(x: Tensor, y: Tensor) -> Tensor:
    """Identity rule for an elementwise y = f(x): R_in = R_out (gate y/x held constant; 0 where x = 0)."""
    gate = torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(y))
    return carry(y, x, gate)


def layernorm_rule(x: Tensor, y: Tensor, module: nn.LayerNorm) -> Tensor:
    """LayerNorm with 1/std constant: gradient of (x - mean) / std * w + b."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + module.eps).detach()
    lin = centred / std
    if module.weight is not None:
        lin = lin * module.weight
    if module.bias is not None:
        lin = lin + module.bias
    return carry(y, lin)


def uniform_rule(y: Tensor) -> Tensor:
    """Product of two variable operands: half of R_out to each (y's gradient halved)."""
    return 0.5 * y + 0.5 * y.detach()


def _gamma(p: Tensor | None, gamma: float) -> Tensor | None:
    return None if p is None else p + gamma * p.clamp(min=0)


def _affine_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The module's forward with other parameters (Linear, Conv, HF Conv1D)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module._conv_forward(x, weight, bias)
    out = x.reshape(-1, x.shape[-1]) @ weight  # HF Conv1D: weight [in, out]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[-1])


def _hf_conv1d() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")
    return None if mod is None else mod.Conv1D


def rule_kind(module: nn.Module) -> str | None:
    """The rule a module gets: "linear" | "layernorm" | "gate" | "softmax" | "passthrough",
    "container" for modules whose children and functional ops carry the rules, None if no rule."""
    conv1d = _hf_conv1d()
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (conv1d is not None and isinstance(module, conv1d)):
        return "linear"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, ELEMENTWISE) or type(module).__name__.endswith("RMSNorm") \
            or type(module).__module__ == "transformers.activations":
        return "gate"
    if isinstance(module, nn.Softmax):
        return "softmax"
    if isinstance(module, PASSTHROUGH):
        return "passthrough"
    if isinstance(module, UNSUPPORTED):
        return None
    return "container" if any(True for _ in module.children()) else None


def _variable(t: Any) -> bool:
    """A tensor relevance flows through: requires grad and is not a parameter (or a view of one)."""
    return isinstance(t, Tensor) and t.requires_grad and not isinstance(t, nn.Parameter) \
        and not isinstance(t._base, nn.Parameter)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
              *, mode: str = "attnlrp") -> Tensor:
    """scaled_dot_product_attention written out with the LRP rules (uniform matmuls, softmax by `mode`)."""
    if dropout_p:
        raise ValueError("LRP needs attention without dropout (put the model in eval mode)")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _product(q @ k.transpose(-2, -1), q, k) * scale
    low = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, low)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, low) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if mode == "cp":
        probs = probs.detach()
    return _product(probs @ v, probs, v)


def _product(y: Tensor, a: Any, b: Any) -> Tensor:
    return uniform_rule(y) if _variable(a) and _variable(b) else y


_PRODUCTS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm,
             torch.mul, Tensor.mul, Tensor.__mul__, torch.einsum}
_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}
_GATES = {F.gelu, F.silu, F.mish, F.elu, F.softplus, torch.tanh, Tensor.tanh, F.tanh, torch.sigmoid,
          Tensor.sigmoid, F.sigmoid}


class _RuleMode(TorchFunctionMode):
    """Applies the functional rules: products, softmax, elementwise gates, sdpa."""

    def __init__(self, attention_mode: str):
        super().__init__()
        self.attention_mode = attention_mode
        self.enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs, mode=self.attention_mode)
        out = func(*args, **kwargs)
        if not self.enabled:
            return out
        if func in _PRODUCTS:
            operands = args[1:] if func is torch.einsum else args[:2]
            if func is torch.einsum and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
                operands = operands[0]
            if len(operands) == 2 and isinstance(out, Tensor):
                return _product(out, *operands)
        elif func in _SOFTMAX and self.attention_mode == "cp":
            return out.detach()
        elif func in _GATES and isinstance(out, Tensor) and _variable(args[0]):
            return gate_rule(args[0], out)
        return out


class LRPRules:
    """Context manager: while active, `x * grad` on `model` is LRP relevance.

    epsilon: the stabilizer of the linear rule; gamma: > 0 favours positive contributions
    (LRP-gamma, meant for non-negative inputs such as after ReLU); attention: "attnlrp" or "cp".
    watch: module names whose (rule-rewritten) outputs are collected in `outputs`.
    fallback: {module name: type name} of modules met in the forward that have no rule (their
    relevance passed as plain gradient x input).
    """

    def __init__(self, model: nn.Module, epsilon: float = 1e-6, gamma: float = 0.0, attention: str = "attnlrp",
                 watch: Sequence[str] = ()):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r} is not supported; choose from {ATTENTION_MODES}")
        if epsilon < 0 or gamma < 0:
            raise ValueError(f"epsilon={epsilon} and gamma={gamma} must be >= 0")
        self.model, self.epsilon, self.gamma, self.attention = model, epsilon, gamma, attention
        self.watch = set(watch)
        modules = dict(model.named_modules())
        missing = sorted(self.watch - set(modules))
        if missing:
            raise ValueError(f"watched modules {missing} are not in {type(model).__name__}")
        self.outputs: dict[str, list[Tensor]] = {}
        self.fallback: dict[str, str] = {}
        self._handles: list[Any] = []
        self._mode = _RuleMode(attention)

    def __enter__(self) -> "LRPRules":
        for name, module in self.model.named_modules():
            kind = rule_kind(module)
            if kind not in ("container", "passthrough") or name in self.watch:
                self._handles.append(module.register_forward_hook(self._hook(name, kind), with_kwargs=True))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def _paused(self) -> Iterator[None]:
        self._mode.enabled = False
        try:
            yield
        finally:
            self._mode.enabled = True

    def _hook(self, name: str, kind: str | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            x = args[0] if args else next(iter(kwargs.values()), None)
            with self._paused():
                if kind is None:
                    if any(_variable(t) for t in _leaves(out)):
                        self.fallback[name] = type(module).__name__
                    new = out
                else:
                    new = self._apply(kind, module, x, out)
            if name in self.watch and isinstance(new, Tensor):
                self.outputs.setdefault(name, []).append(new)
            return new
        return hook

    def _apply(self, kind: str, module: nn.Module, x: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or not isinstance(x, Tensor) or not out.requires_grad:
            return out
        if kind == "linear":
            z_mod = out
            if self.gamma:
                z_mod = _affine_forward(module, x, _gamma(module.weight, self.gamma), _gamma(module.bias, self.gamma))
            return linear_rule(out, z_mod, self.epsilon)
        if kind == "layernorm":
            return layernorm_rule(x, out, module)
        if kind == "gate":
            if out.shape != x.shape:
                raise ValueError(f"{type(module).__name__} is not elementwise ({tuple(x.shape)} -> {tuple(out.shape)})")
            return gate_rule(x, out)
        if kind == "softmax" and self.attention == "cp":
            return out.detach()
        return out


def _leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _leaves(o)]
    return []
