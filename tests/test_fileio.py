"""Saved objects are written atomically: a crash in the middle of a write leaves the old file and no temp file."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from allocator import Budget, allocate
from kernels import LatencyTable
from kernels.fileio import atomic_write, atomic_write_json
from profilers import Profile, build_layer_graph
from tiny import FAST, lm_batches, tiny_gpt2


def test_a_crash_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out" / "table.json"
    atomic_write_json(path, {"a": 1})

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]


def _saved_object(what: str):
    if what == "plan":
        return allocate(tiny_gpt2(), lm_batches(2), Budget(avg_bits=4.0), bits=(2, 4, 8), profiler_settings=FAST)
    if what == "layer graph":
        return build_layer_graph(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(2, 8))
    if what == "profile":
        return Profile(["0", "2"], ["w4", "w8"], np.ones((2, 2)))
    return LatencyTable("cpu", {"torch": torch.__version__})


@pytest.mark.parametrize("what", ["plan", "latency table", "profile", "layer graph"])
def test_every_saved_object_survives_a_crash_while_saving(what, tmp_path, monkeypatch):
    obj = _saved_object(what)
    path = tmp_path / "saved.json"
    obj.save(path)
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        obj.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["saved.json"]
