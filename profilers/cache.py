"""On-disk cache of profiles, keyed by everything that determines the result."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .profile import Profile


def cache_key(
    *,
    model_hash: str,
    calib_hash: str,
    profiler: str,
    choices: list[str],
    layers: list[str],
    settings: dict[str, Any],
    shard: dict[str, list] | None,
) -> str:
    """sha256 over the model and calibration hashes, profiler name, choices, layers, settings and shard."""
    blob = json.dumps(
        {
            "model": model_hash,
            "calib": calib_hash,
            "profiler": profiler,
            "choices": choices,
            "layers": layers,
            "settings": settings,
            "shard": shard,
        },
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str, profiler: str) -> Path:
    return Path(cache_dir) / f"{profiler}-{key[:24]}.json"


def load_cached(cache_dir: str | os.PathLike, key: str, profiler: str) -> Profile | None:
    """The cached profile for `key`, or None."""
    path = cache_path(cache_dir, key, profiler)
    return Profile.load(path) if path.exists() else None


def store(cache_dir: str | os.PathLike, key: str, prof: Profile) -> Path:
    """Save `prof` under `key` (atomic write); returns the file."""
    path = cache_path(cache_dir, key, prof.profiler)
    prof.save(path)
    return path
