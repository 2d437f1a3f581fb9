"""How steady the whole-model timings behind the latency calibration are: the 1B Llama of bench_model_gpu.py (bf16,
random weights), its 1-token float forward timed again and again (`time_forward`: a fresh CUDA-graph capture each
time, 30 replays, median), one capture replayed in several batches, and `measure_rest`'s calibration repeated
(twice on its own, once right after a latency table of the model's layers at w4, as in bench_model_gpu.py), each
followed by the float forward timed at once and after --idle-s of idle.

Session 43 saw the float forward that the calibration is taken from run 1.0% and 3.5% slower than the same forward
timed again 20-30 s later in the same process, which put 1-token predictions 1.5-2% high. This separates what
moves: a capture (its memory placement), the time between timings (idle or busy), or the calibration itself.
    python benchmarks/bench_forward_spread_gpu.py --out $OUT [--rounds 6] [--idle-s 5]
`--tiny --device cpu --idle-s 0` is a smoke test of the script on the CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model_gpu import build_model  # noqa: E402
from kernels.latency import (LatencyTable, cuda_graph, default_dtype, device_name, l2_flush_buffer,  # noqa: E402
                             measure, time_events, versions)
import kernels.model_latency as model_latency  # noqa: E402
from kernels.model_latency import default_inputs, measure_rest, time_forward  # noqa: E402
from profilers import build_layer_graph  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle before the later timings (default 5)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (with --device cpu: a smoke test)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device)
    model, config = build_model(args.tiny, device, dtype)
    graph = build_layer_graph(model, {"input_ids": torch.randint(0, config.vocab_size, (1, 8), device=device)})
    result = {"device": device_name(device), "versions": versions()}

    fresh = []
    for i in range(args.rounds):
        if i % 2:
            time.sleep(args.idle_s / 2)  # odd rounds after idle, even rounds straight after the last
        fresh.append(time_forward(model, 1, device, captures=1).ms)
    result["fresh_capture_ms"] = fresh

    if device.type == "cuda":
        batch = default_inputs(model)(1)
        flush = l2_flush_buffer(device)
        with torch.no_grad():
            replay = cuda_graph(lambda: model(**batch))
            result["one_capture_ms"] = [time_events(replay, 30, flush) for _ in range(args.rounds)]

    calibrations = []
    forwards = []  # every forward measure_rest times: the stubbed one, then the calibration's (float or w4)

    def logged(*a, **k):
        timing = time_forward(*a, **k)
        forwards.append(timing.ms)
        return timing
    model_latency.time_forward = logged
    for when in ("steady", "steady", "after a latency table"):
        if when == "after a latency table":  # what precedes measure_rest in bench_model_gpu.py
            table = measure(graph, ["w4"], tokens=(1,), device=device)
        else:
            table = LatencyTable(device_name(device), versions())
        forwards.clear()
        rest = measure_rest(model, graph, tokens=(1,), device=device, table=table)
        whole = forwards[-1]
        now = time_forward(model, 1, device).ms
        time.sleep(args.idle_s)
        idle = time_forward(model, 1, device).ms
        calibrations.append({"when": when, "rest_ms": rest.ms[1], "calibration_ms": rest.calibration_ms.get(1),
                             "calibration_forward_ms": whole, "calibration_from": rest.calibration_from.get(1),
                             "replay_overhead_ms": table.replay_overhead_ms,
                             "float_forward_after_ms": now, "float_forward_after_idle_ms": idle})
    result["calibrations"] = calibrations

    for name in ("fresh_capture_ms", "one_capture_ms"):
        v = result.get(name)
        if v is None:
            continue
        print(f"{name}: " + ", ".join(f"{x:.4f}" for x in v)
              + f"  (median {statistics.median(v):.4f}, spread {100 * (max(v) - min(v)) / min(v):.1f}%)")
    for c in calibrations:
        print(f"measure_rest ({c['when']}): " + ", ".join(f"{k} {v:.4f}" for k, v in c.items()
                                                         if isinstance(v, float)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_spread.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
