"""Quality of a (quantized) model on held-out labelled batches: loss, perplexity, accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from profilers import Calibration


@torch.no_grad()
def evaluate(model: nn.Module, batches: Calibration | Sequence) -> dict[str, float]:
    """Mean task loss over labelled batches, its exp (perplexity, meaningful for language models) and,
    for classifiers whose output is [batch, classes], top-1 accuracy."""
    data = batches if isinstance(batches, Calibration) else Calibration(batches)
    was_training = model.training
    model.eval()
    losses, correct, seen = [], 0, 0
    try:
        for i in range(len(data)):
            labels = _labels(data, i)
            if labels is None:
                raise ValueError(f"evaluation batch {i} has no labels; evaluate needs labelled batches")
            losses.append(float(data.loss(model, i)))
            out = data.forward(model, i)
            if out.dim() == 2 and labels is not None and labels.dim() == 1:
                correct += int((out.argmax(-1) == labels).sum())
                seen += labels.numel()
    finally:
        model.train(was_training)
    loss = sum(losses) / len(losses)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if seen:
        result["accuracy"] = correct / seen
    return result


def _labels(data: Calibration, i: int) -> torch.Tensor | None:
    if data.labels is not None:
        return data.labels[i]
    batch = data[i]
    return batch.get("labels") if isinstance(batch, dict) else None
