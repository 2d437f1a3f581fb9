"""Reading the JSON files the allocator saves (its writes go through `kernels.fileio`, atomic)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object, with errors that name the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data
