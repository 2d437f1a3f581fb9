"""Calibration data from files, for the CLI: a torch-saved list of batches, or a text file to tokenize."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_calibration(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                     seq_len: int = 128, batch_size: int = 4, max_batches: int = 16) -> list:
    """Read calibration batches.

    ``.pt``: ``torch.save`` of a list of batches (tensors, tuples, or dicts such as a tokenizer returns),
    loaded with ``weights_only=True``. ``.txt``: text tokenized with the tokenizer at ``tokenizer_path``
    (usually the model's directory) and cut into ``batch_size`` x ``seq_len`` blocks with labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    if path.suffix == ".pt":
        try:
            data = torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"calibration file {str(path)!r} could not be read as a torch-saved list of batches: {e}") from None
        if isinstance(data, (torch.Tensor, dict)):
            data = [data]
        if not isinstance(data, (list, tuple)) or not data:
            raise ValueError(f"calibration file {str(path)!r} must hold a non-empty list of batches, got {type(data).__name__}")
        return list(data)
    if path.suffix == ".txt":
        if tokenizer_path is None:
            raise ValueError("a .txt calibration file needs a tokenizer: pass the model directory as tokenizer_path")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        block = seq_len * batch_size
        n = min(len(ids) // block, max_batches)
        if n == 0:
            raise ValueError(f"calibration text {str(path)!r} has {len(ids)} tokens; need at least {block} (batch_size x seq_len)")
        blocks = ids[: n * block].view(n, batch_size, seq_len)
        return [{"input_ids": b, "labels": b.clone()} for b in blocks]
    raise ValueError(f"calibration file {str(path)!r}: unsupported extension {path.suffix!r}; use .pt or .txt")
