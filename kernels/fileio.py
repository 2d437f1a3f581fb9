"""Atomic file writes for every saved object of kernels, profilers and the allocator (tables, profiles, layer
graphs, plans, quantized models): a crash leaves the old file or the new one, never half of either, and no temp
file behind. (`solvers`, which imports no other package of ours, keeps its own JSON writer in `solvers.jsonio`.)"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON atomically (`atomic_write`); indent=None writes it compact."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")

    return atomic_write(path, write)
