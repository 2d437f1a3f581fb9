"""Progress bars for the profilers' long loops (tqdm on stderr; off when stderr is not a terminal)."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "it") -> tqdm:
    """A tqdm bar that disappears when done and stays silent in logs and tests (non-TTY stderr)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=None, dynamic_ncols=True)
