"""A quantized model saved with its latency table, loaded in a new process, runs what the table timed.

Builds the ~1B Llama of bench_model_gpu.py (random weights, bfloat16, CUDA), measures a w4 table at --tokens
(with our kernel's tiles) and the model's rest, applies uniform w4 and saves it twice: with the table (its measured
paths go into kernels.json) and without. A fresh Python process per copy loads it (`load_quantized`), moves it to
the GPU and times its forward (batch 1, no KV cache, CUDA graph, L2 flushed). Prints and writes saved.json under
--out: the table's prediction, the forward in this process, and each reloaded copy's forward.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from allocator import predict_latency, save_quantized, uniform_plan  # noqa: E402
from bench_model_gpu import build_model, synthetic_profiled  # noqa: E402
from kernels import measure  # noqa: E402
from kernels.latency import default_dtype, device_name  # noqa: E402
from kernels.model_latency import measure_rest, time_forward  # noqa: E402
from profilers import build_layer_graph  # noqa: E402


def reloaded_ms(directory: Path, tokens: int, reps: int) -> dict:
    """Load `directory` in a new process, as a deployment would, and time its forward there."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import torch, warnings\n"
            "from allocator import load_quantized; from kernels.model_latency import time_forward\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); m = load_quantized(sys.argv[2]).to('cuda')\n"
            "print(json.dumps({'ms': time_forward(m, int(sys.argv[3]), 'cuda', int(sys.argv[4])).ms,"
            " 'dtypes': sorted({str(p.dtype) for p in m.parameters()}), 'warnings': [str(x.message) for x in w]}))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(directory), str(tokens), str(reps)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="directory for saved.json")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    device = torch.device("cuda")
    model, config = build_model(False, device, default_dtype(device))
    graph = build_layer_graph(model, {"input_ids": torch.randint(0, config.vocab_size, (1, 8), device=device)})
    table = measure(graph, ["w4"], tokens=(args.tokens,), device=device, reps=args.reps)
    measure_rest(model, graph, tokens=(args.tokens,), device=device, reps=args.reps, table=table)
    profiled = synthetic_profiled(model, graph, config.num_hidden_layers)
    plan = uniform_plan(profiled, "w4")
    predicted = sum(predict_latency(plan, table, args.tokens, profiled.rest_key))
    qmodel = plan.apply(model)
    here = time_forward(qmodel, args.tokens, device, args.reps).ms
    result = {"device": device_name(device), "tokens": args.tokens, "plan": "uniform w4", "predicted_ms": predicted,
              "this_process_ms": here}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("with_table", {"latency_table": table}), ("without_table", {})):
            save_quantized(qmodel, Path(tmp) / name, **kw)
            result[f"reloaded_{name}"] = reloaded_ms(Path(tmp) / name, args.tokens, args.reps)
    result["saved_paths"] = len(table.measured_paths())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "saved.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
