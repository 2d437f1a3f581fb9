"""Layer sensitivity profilers: the layer graph, calibration data, and Profile objects.

    graph = build_layer_graph(model, example_batch)
    calib = Calibration(batches)
    prof = profile(model, calib, graph, choices=[Choice(2), Choice(4), Choice(8)], profiler="hessian")

Registered profilers (PROFILERS): "hessian" (Hutchinson trace, HAWQ-V2/V3), "eigen" (top block
eigenvalue, HAWQ-V1), "fisher" (gradient-squared), "gptq" (output-error proxy), "measured"
(single-layer loss deltas, the ground truth), "lrp" and "interlayer". Shards: profile(...,
shard={"layers": [...]}) or {"batches": [...]}, then merge(shards).
"""
from .calibration import Calibration, model_hash
from .graph import LayerGraph, LayerInfo, build_layer_graph
from .profile import Profile, merge
from .registry import PROFILERS, profile, register_profiler

__all__ = [
    "Calibration", "LayerGraph", "LayerInfo", "PROFILERS", "Profile",
    "build_layer_graph", "merge", "model_hash", "profile", "register_profiler",
]

from . import eigen, fisher, gptq, hessian, interlayer, lrp, measured  # noqa: E402,F401  (register the profilers)
