"""The result store: a directory of finished profile shards that any job (or retried worker) reuses.

A shard's file is the profilers' own on-disk cache entry (``profilers.cache``): its name is a hash of the
model weights, calibration data, profiler, choices, layers, settings and the shard itself, and it is written
atomically when the shard finishes. So a restarted job, a retried task or a second job on the same model
and data finds finished shards by name and recomputes only the missing ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from profilers import Profile, merge
from profilers.cache import cache_key, cache_path


@dataclass(frozen=True)
class ProfileRequest:
    """What determines a profile, apart from the shard: the key of every shard file."""

    model_hash: str
    calib_hash: str
    profiler: str
    choices: tuple[str, ...]
    layers: tuple[str, ...]
    settings: dict


class ResultStore:
    """Finished shards under ``root`` (shared by every job that points at the same directory)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, request: ProfileRequest, shard: dict[str, list]) -> Path:
        """The file a shard is (or will be) stored in."""
        key = cache_key(model_hash=request.model_hash, calib_hash=request.calib_hash, profiler=request.profiler,
                        choices=list(request.choices), layers=list(request.layers), settings=request.settings,
                        shard=shard)
        return cache_path(self.root, key, request.profiler)

    def missing(self, request: ProfileRequest, shards: list[dict[str, list]]) -> list[dict[str, list]]:
        """The shards that have no file yet."""
        return [s for s in shards if not self.path(request, s).exists()]

    def merged(self, request: ProfileRequest, shards: list[dict[str, list]]) -> Profile:
        """Load every shard and merge them exactly (``profilers.merge``)."""
        prof = merge([Profile.load(self.path(request, s)) for s in shards])
        prof.shard = None
        return prof
