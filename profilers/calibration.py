"""Calibration data: normalised batches, the model's forward on them, and the profiling loss.

A batch is what the model's forward takes: a tensor, a tuple of tensors (positional
inputs) or a dict of keyword inputs (as Hugging Face tokenizers return, may hold "labels").
"""
from __future__ import annotations

import hashlib
import inspect
import weakref
from typing import Any, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

Batch = Union[torch.Tensor, tuple, dict]


def model_hash(model: nn.Module) -> str:
    """Stable sha256 over parameter names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("input", batch)]
    if isinstance(batch, dict):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
    return [(f"input[{i}]", v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]


def describe(batch: Batch) -> str:
    """Short text of a batch's structure and shapes, for error messages."""
    parts = [f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in _tensors(batch)]
    kind = "tensor" if isinstance(batch, torch.Tensor) else type(batch).__name__
    return f"{kind} {{{', '.join(parts)}}}"


def output_tensor(out: Any) -> tuple[torch.Tensor, bool]:
    """(tensor, is_logits) from a model output: a tensor, an HF output object or a tuple.

    HF objects give .logits (logits), else .last_hidden_state, else their first tensor.
    A plain tensor with last dimension > 1 is treated as logits.
    """
    if isinstance(out, torch.Tensor):
        return out, out.dim() >= 1 and out.shape[-1] > 1
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits, True
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, False
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v, False
    raise ValueError(f"model output of type {type(out).__name__} holds no tensor")


def call_model(model: nn.Module, batch: Batch, where: str = "batch") -> Any:
    """model(batch) by its form; a batch the model rejects raises a ValueError naming
    the forward's signature and the shapes given."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    batch = _to(batch, device)
    try:
        if isinstance(batch, torch.Tensor):
            return model(batch)
        if isinstance(batch, dict):
            return model(**batch)
        return model(*batch)
    except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as e:
        sig = inspect.signature(model.forward)
        raise ValueError(
            f"{where} does not fit {type(model).__name__}.forward{sig}: given {describe(batch)}; "
            f"the model raised {type(e).__name__}: {e}"
        ) from None


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)


class Calibration:
    """A list of calibration batches (+ optional labels) and the loss profilers differentiate.

    batches: iterable of tensors, tuples of tensors, or dicts of keyword inputs (dicts may
        hold "labels"). labels: optional per-batch label tensors for tensor/tuple batches.
    distill: loss without labels: "auto" (KL for logits, MSE for hidden states), "kl" or "mse".
    NaN/Inf anywhere raise a ValueError naming the batch index and key.
    """

    def __init__(self, batches: Iterable[Batch], labels: Iterable[torch.Tensor] | None = None, distill: str = "auto"):
        self.batches: list[Batch] = []
        for b in batches:
            if isinstance(b, list):
                b = tuple(b)
            if not isinstance(b, (torch.Tensor, tuple, dict)):
                raise TypeError(f"calibration batch {len(self.batches)} is a {type(b).__name__}; expected a tensor, a tuple of tensors or a dict of keyword inputs")
            self.batches.append(b)
        if not self.batches:
            raise ValueError("calibration data is empty")
        self.labels = None if labels is None else list(labels)
        if self.labels is not None and len(self.labels) != len(self.batches):
            raise ValueError(f"{len(self.labels)} label tensors for {len(self.batches)} calibration batches")
        if distill not in ("auto", "kl", "mse"):
            raise ValueError(f"distill must be 'auto', 'kl' or 'mse', not {distill!r}")
        self.distill = distill
        self._check_finite()
        self._hash: str | None = None
        self._refs: weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]] = weakref.WeakKeyDictionary()

    def _check_finite(self) -> None:
        for i, b in enumerate(self.batches):
            items = _tensors(b) + ([("labels", self.labels[i])] if self.labels is not None else [])
            for key, t in items:
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad = "NaN" if torch.isnan(t).any() else "Inf"
                    raise ValueError(f"calibration batch {i}, {key!r}: contains {bad}")

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]

    def hash(self) -> str:
        """Stable sha256 of the batches' structure, dtypes, shapes, values and labels."""
        if self._hash is None:
            h = hashlib.sha256(f"distill={self.distill};".encode())
            for i, b in enumerate(self.batches):
                items = _tensors(b) + ([("labels", self.labels[i])] if self.labels is not None else [])
                h.update(f"batch{i}:{type(b).__name__};".encode())
                for key, t in items:
                    h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def has_labels(self, i: int) -> bool:
        """Whether batch i carries labels (a "labels" key or a labels tensor)."""
        return self.labels is not None or (isinstance(self.batches[i], dict) and "labels" in self.batches[i])

    def inputs(self, i: int) -> Batch:
        """Batch i without its labels (what the forward gets when no task loss is wanted)."""
        b = self.batches[i]
        return {k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else b

    def forward(self, model: nn.Module, batch: int | Batch) -> torch.Tensor:
        """The model's output tensor on a batch (an index into this calibration or a batch)."""
        if isinstance(batch, int):
            out = call_model(model, self.inputs(batch), f"calibration batch {batch}")
        else:
            out = call_model(model, batch)
        return output_tensor(out)[0]

    def reference(self, model: nn.Module, i: int) -> torch.Tensor:
        """The float model's output on batch i, computed once per model object and cached.
        Call it (or `references`) before modifying the model's weights."""
        refs = self.references(model)
        return refs[i]

    def references(self, model: nn.Module) -> list[torch.Tensor]:
        """All reference outputs for `model` (computed now if not cached)."""
        if model not in self._refs:
            with torch.no_grad():
                self._refs[model] = [self.forward(model, i).detach() for i in range(len(self))]
        return self._refs[model]

    def loss(self, model: nn.Module, i: int, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar loss on batch i.

        With labels: the task loss (HF models compute it from "labels"; otherwise
        cross-entropy for integer labels, MSE for float labels). Without labels:
        self-distillation against the float model's output (`reference`, cached):
        KL(softmax(ref) || softmax(out)) averaged over positions for logits, MSE otherwise.
        """
        b = self.batches[i]
        where = f"calibration batch {i}"
        if self.has_labels(i):
            if isinstance(b, dict) and self.labels is None:
                if _accepts(model, "labels"):
                    out = call_model(model, b, where)
                    loss = getattr(out, "loss", None)
                    if isinstance(loss, torch.Tensor):
                        return loss
                    out_t = output_tensor(out)[0]
                else:
                    out_t = self.forward(model, i)
                return _task_loss(out_t, b["labels"].to(out_t.device), where)
            out_t = self.forward(model, i)
            return _task_loss(out_t, self.labels[i].to(out_t.device), where)
        out = call_model(model, self.inputs(i), where)
        out_t, is_logits = output_tensor(out)
        ref = self.reference(model, i) if reference is None else reference
        if self.distill == "kl" or (self.distill == "auto" and is_logits):
            logp = F.log_softmax(out_t.float(), dim=-1).reshape(-1, out_t.shape[-1])
            ref_logp = F.log_softmax(ref.float(), dim=-1).reshape(-1, out_t.shape[-1])
            return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
        return F.mse_loss(out_t.float(), ref.float())


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _task_loss(out: torch.Tensor, labels: torch.Tensor, where: str) -> torch.Tensor:
    if labels.is_floating_point():
        if labels.shape != out.shape:
            raise ValueError(f"{where}: float labels of shape {tuple(labels.shape)} do not match the output {tuple(out.shape)}")
        return F.mse_loss(out.float(), labels.float())
    if out.shape[:-1] != labels.shape:
        raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} do not match the output {tuple(out.shape)} (expected {tuple(out.shape[:-1])})")
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1))
