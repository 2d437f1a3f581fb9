"""Whole-model latency of a ~1B-parameter Llama on one device: table-predicted vs measured, decode tokens/s vs the
float model, and memory vs the plans' predicted bytes, in one run.

1. A Llama from a LlamaConfig (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 32000; random
   weights, no download), in bfloat16 on CUDA (float32 on the CPU: `latency.default_dtype`).
2. A latency table for its distinct linear shapes, choices w2, w3, w4, w8 (group 128), at each token count; each
   entry also times the path the model's QuantizedLinear layers run (what the prediction uses). The float linears
   are timed the same way (F.linear, L2 flushed, CUDA-graph replay up to GRAPH_MAX_TOKENS tokens), and the model's
   rest once per token count (every quantizable layer stubbed out).
3. Plans without a profile (a synthetic cost, params x 4^-bits x a per-role weight): uniform w4, uniform w8, a fixed
   2/3/4/8 pattern, and two solved by --method: at uniform w4's size, and under the pattern plan's predicted
   whole-model latency at 1 token (a whole-model latency budget: the table holds the rest).
4. Each plan applied to the model on the device (`allocator.check_latency`): forward timed at each token count
   (batch 1, no KV cache; CUDA-graph replay when capturable, L2 flushed, median), predicted vs measured, CUDA
   allocator bytes (resident and peak) vs the plan's predicted bytes. Decode = the 1-token forward. Predicted is
   the library's (`LatencyTable.layer_ms`: graph-timed entries less the table's replay overhead; the rest with its
   calibration against a whole forward, `RestLatency.calibration_ms`: of the model with every layer at w4 where
   the table holds w4, else of the float model); the error without that
   calibration and the raw sum of the isolated entries are shown beside it.
--extra-choices w8gca8 adds choices to the table, a uniform plan of each, and the solved plans' candidates
(w4@tinygemm: layers held for torch's tinygemm).
Writes bench.json, bench.md and latency.json under --out. `--tiny --device cpu` runs a tiny config on the CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator import Budget, check_latency, format_checks, predict_latency, uniform_plan  # noqa: E402
from allocator.api import ProfiledModel, build_problem, plan_from_solution, solve_profiled  # noqa: E402
from allocator.budget import MIB  # noqa: E402
from allocator.model import storage_bytes  # noqa: E402
from kernels import Choice  # noqa: E402
from kernels.fileio import atomic_write, atomic_write_json  # noqa: E402
from kernels.latency import (default_dtype, device_name, l2_flush_buffer, measure, time_layer,  # noqa: E402
                             versions)
from kernels.model_latency import measure_rest, model_key, time_forward  # noqa: E402
from profilers import Profile, build_layer_graph  # noqa: E402
from solvers import Solution  # noqa: E402

CHOICES = ("w2", "w3", "w4", "w8")
FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    """A randomly initialised LlamaForCausalLM (untied lm_head) on `device` in `dtype`."""
    config = transformers.LlamaConfig(**(TINY if tiny else FULL), max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval(), config


def time_float_linears(graph, tokens, device, dtype, reps) -> dict[tuple[int, int, int], float]:
    """(N, K, tokens) -> median ms of F.linear on a float weight, timed as `measure` times the quantized paths."""
    out = {}
    flush = l2_flush_buffer(device)
    for n, k in {(l.out_features, l.in_features) for l in graph.layers}:
        w = torch.randn(n, k, device=device, dtype=dtype)
        for t in tokens:
            x = torch.randn(t, k, device=device, dtype=dtype)
            out[(n, k, t)] = time_layer(lambda x: F.linear(x, w), x, reps, flush, t)
    return out


def role_weight(name: str, n_blocks: int) -> float:
    """Synthetic sensitivity: lm_head and down_proj most, the first and last block more, k/v more than q/o."""
    if name == "lm_head":
        return 8.0
    block = int(name.split(".")[2])
    w = 4.0 if block in (0, n_blocks - 1) else 1.0
    if "down_proj" in name:
        w *= 4.0
    elif "k_proj" in name or "v_proj" in name:
        w *= 2.0
    return w


def synthetic_profiled(model, graph, n_blocks: int, choices: list[str]) -> ProfiledModel:
    """A ProfiledModel with cost params x 4^-bits x role weight (quantization noise power; no calibration)."""
    bits = np.array([Choice.parse(c).wbits for c in choices], dtype=float)
    cost = np.array([[l.params * role_weight(l.name, n_blocks) * 4.0 ** -b for b in bits] for l in graph.layers])
    prof = Profile(layers=graph.names, choices=list(choices), cost=cost, profiler="synthetic",
                   settings={"cost": "params x 4^-bits x role weight"})
    return ProfiledModel.build(model, graph, prof)


def pattern_labels(names: list[str], n_blocks: int) -> dict[str, str]:
    """A fixed 2/3/4/8 plan: lm_head and the first and last block 8-bit; elsewhere attention and down_proj 4-bit,
    gate/up 2-bit in odd blocks and 3-bit in even ones."""
    out = {}
    for name in names:
        if name == "lm_head":
            out[name] = "w8"
            continue
        block = int(name.split(".")[2])
        if block in (0, n_blocks - 1):
            out[name] = "w8"
        elif "gate_proj" in name or "up_proj" in name:
            out[name] = "w2" if block % 2 else "w3"
        else:
            out[name] = "w4"
    return out


def fixed_plan(profiled: ProfiledModel, labels: dict[str, str]):
    """The Plan that puts each layer at its given choice label."""
    problem = build_problem(profiled)
    index = np.array([problem.choices.index(labels[n]) for n in problem.layers])
    solution = Solution.build(problem, index, {}, method="pattern", status="fixed", solve_time_s=0.0)
    avg = float((problem.bits[np.arange(len(index)), index] * problem.params).sum() / problem.params.sum())
    return plan_from_solution(profiled, problem, solution, Budget(avg_bits=avg))


def solved_plans(profiled: ProfiledModel, plans: dict, table, method: str,
                 tokens: tuple[int, ...]) -> tuple[dict, list[str]]:
    """Plans by `method` on the synthetic cost: at uniform w4's size, under the pattern plan's predicted
    whole-model latency at 1 token, and (with more token counts) at 1 token and the largest count at once. One
    equal to an earlier plan, or a solver failure, becomes a note instead."""
    pattern_ms = {t: sum(predict_latency(plans["pattern 2/3/4/8"], table, t, profiled.rest_key)) for t in tokens}
    budgets = {f"{method} @ w4 size": (method, Budget(memory_mb=plans["uniform w4"].predicted["total_bytes"] / MIB)),
               f"{method} @ pattern latency": (method, Budget(latency_ms=pattern_ms[1]))}
    if max(tokens) > 1:  # two budgets: pareto takes one, greedy runs without pulp (the GPU image lacks it)
        several = "greedy" if method == "pareto" else method
        budgets[f"{several} @ pattern latency at 1 and {max(tokens)}"] = (several, Budget(
            latency_ms={1: pattern_ms[1], max(tokens): pattern_ms[max(tokens)]}))
    out, notes = {}, []
    for name, (solver, budget) in budgets.items():
        try:
            plan = solve_profiled(profiled, budget, method=solver, latency_table=table, tokens=1)
        except Exception as e:  # noqa: BLE001 - a solver failing is reported; the other plans still run
            notes.append(f"{name}: no plan ({type(e).__name__}: {e})")
            log(notes[-1])
            continue
        same = next((n for n, p in {**plans, **out}.items()
                     if [l.choice for l in p.layers] == [l.choice for l in plan.layers]), None)
        if same is not None:
            notes.append(f"{name} ({plan.budget}): the same plan as {same}, not timed again")
            log(notes[-1])
            continue
        out[name] = plan
        p = plan.predicted
        log(f"{name} ({plan.budget}): {bits_histogram(plan)}, predicted {p['latency_ms']:.4f} ms at 1 token "
            f"({plan.solver['latency_scope']}), {p['total_bytes'] / MIB:.2f} MiB")
    return out, notes


def bits_histogram(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in plan.layers:
        out[layer.choice] = out.get(layer.choice, 0) + 1
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench.json, bench.md and latency.json")
    ap.add_argument("--device", default="cuda", help="device to run on (default cuda; cpu with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 128, 4 blocks) instead of the ~1B one")
    ap.add_argument("--tokens", help="comma-separated token counts (default 1,16,512; --tiny: 1,8)")
    ap.add_argument("--reps", type=int, help="timed runs per median (default: 30 on CUDA, 5 on the CPU)")
    ap.add_argument("--method", default="pareto", help="solver for the budgeted plans (default pareto: exact, no pulp)")
    ap.add_argument("--extra-choices", default="", help="choice labels besides w2,w3,w4,w8, each also a uniform "
                    "plan and a candidate of the solved ones (e.g. w8gca8: int8 activations; "
                    "w4@tinygemm: torch's tinygemm)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available; use --tiny --device cpu")
    try:
        tokens = tuple(int(t) for t in (args.tokens or ("1,8" if args.tiny else "1,16,512")).split(","))
    except ValueError:
        sys.exit(f"--tokens must be comma-separated integers like 1,16,512, got {args.tokens!r}")
    if 1 not in tokens:
        sys.exit(f"--tokens must include 1 (the decode figure), got {tokens}")
    reps = args.reps or (30 if device.type == "cuda" else 5)
    extra = [Choice.parse(c).label for c in args.extra_choices.split(",") if c]
    choices = list(CHOICES) + extra
    out = Path(args.out)
    dtype = default_dtype(device)
    stages: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = time.perf_counter() - t0
        log(f"{name}: {stages[name]:.1f} s")

    t0 = time.perf_counter()
    model, config = build_model(args.tiny, device, dtype)
    n_blocks = config.num_hidden_layers
    n_params = sum(p.numel() for p in model.parameters())
    graph = build_layer_graph(model, {"input_ids": torch.randint(0, config.vocab_size, (1, 8), device=device)})
    stage("build model + layer graph", t0)
    log(f"{device_name(device)}: Llama {n_params / 1e9:.3f} B params, {len(graph)} quantizable layers, {dtype}")

    t0 = time.perf_counter()
    table = measure(graph, choices, tokens=tokens, device=device, reps=reps)
    stage("latency table (quantized linears)", t0)
    t0 = time.perf_counter()
    float_linear = time_float_linears(graph, tokens, device, dtype, reps)
    stage("float linears", t0)
    t0 = time.perf_counter()
    rest = measure_rest(model, graph, tokens=tokens, device=device, reps=reps, table=table)
    stage("rest of the model", t0)
    table.save(out / "latency.json")

    t0 = time.perf_counter()
    profiled = synthetic_profiled(model, graph, n_blocks, choices)
    plans = {"uniform w4": uniform_plan(profiled, "w4"), "uniform w8": uniform_plan(profiled, "w8"),
             "pattern 2/3/4/8": fixed_plan(profiled, pattern_labels(graph.names, n_blocks))}
    plans.update({f"uniform {c}": uniform_plan(profiled, c) for c in extra})
    solved, notes = solved_plans(profiled, plans, table, args.method, tokens)
    plans.update(solved)
    stage("plans", t0)

    t0 = time.perf_counter()
    float_rows = []
    for t in tokens:
        timing = time_forward(model, t, device, reps)
        raw = [float_linear[(l.out_features, l.in_features, t)] for l in graph.layers]
        layers = sum(table.in_model_ms(ms, t) for ms in raw)
        rest_ms = table.rest_ms(model_key(model, graph.names), t)  # with its calibration, as the plans get it
        float_rows.append({"plan": f"float ({str(dtype).removeprefix('torch.')})", "tokens": t, "rest_ms": rest_ms,
                           "layers_ms": layers, "raw_ms": rest_ms + sum(raw), "predicted_ms": rest_ms + layers,
                           "measured_ms": timing.ms, "mode": timing.mode,
                           "rel_error": (rest_ms + layers - timing.ms) / timing.ms})
    stage("float model forward", t0)
    t0 = time.perf_counter()
    checks = check_latency(model, plans, table, tokens=tokens, device=device, reps=reps, check_hash=False)
    stage("quantized models (apply + time)", t0)
    print(format_checks(checks), flush=True)

    check_rows = [c.to_dict() for c in checks]
    float_bytes = storage_bytes(model)
    float_decode = next(r["measured_ms"] for r in float_rows if r["tokens"] == 1)
    decode = [{"plan": r["plan"], "ms": r["measured_ms"], "tokens_per_s": 1e3 / r["measured_ms"],
               "vs_float": float_decode / r["measured_ms"]} for r in float_rows if r["tokens"] == 1]
    decode += [{"plan": c.plan, "ms": c.measured_ms, "tokens_per_s": 1e3 / c.measured_ms,
                "vs_float": float_decode / c.measured_ms} for c in checks if c.tokens == 1]
    shapes = sorted({(l.out_features, l.in_features) for l in graph.layers})
    kernels = []
    for n, k in shapes:
        for t in tokens:
            row = {"shape": f"{n}x{k}", "tokens": t, "float_ms": float_linear[(n, k, t)]}
            for c in choices:
                e = table.entries[f"linear:{n}x{k}|{c}|{t}"]
                row[c] = {"model_ms": e.model_ms, "model_path": e.selected or e.backend, "fastest_ms": e.ms, "fastest_path": e.backend,
                          "all_ms": e.all_ms, "rejected": e.rejected}
            kernels.append(row)
    meta = {"device": device_name(device), "versions": {**versions(), "transformers": transformers.__version__},
            "config": {k: getattr(config, k) for k in FULL}, "params": n_params, "dtype": str(dtype), "tokens": tokens,
            "reps": reps, "choices": choices, "stages_s": stages, "total_s": time.perf_counter() - START,
            "timer": "CUDA events, L2 flushed before each" if device.type == "cuda" else "time.perf_counter",
            "replay_overhead_ms": table.replay_overhead_ms, "graph_max_tokens": table.graph_max_tokens,
            "notes": "batch 1, no KV cache; decode = the 1-token forward"}
    result = {"meta": meta, "rest": rest.to_dict(), "float": float_rows, "float_bytes": float_bytes,
              "checks": check_rows, "decode": decode, "kernels": kernels,
              "plans": {name: {"bits": bits_histogram(p), "avg_bits": p.predicted["avg_bits"],
                               "predicted": p.predicted, "budget": p.budget.to_dict(), "solver": p.solver}
                        for name, p in plans.items()},
              "notes": notes}
    atomic_write_json(out / "bench.json", result)
    md = markdown(result, float_rows + check_rows, checks, decode, kernels)
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(md))
    print(md, flush=True)
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'latency.json'}")


def markdown(result: dict, rows: list[dict], checks, decode: list[dict], kernels: list[dict]) -> str:
    meta = result["meta"]
    choices = meta["choices"]
    v = meta["versions"]
    correction = (f"each layer's table entry less the fixed cost of one timed graph replay "
                  f"({meta['replay_overhead_ms']:.4f} ms, measured once per table) where it was graph-timed "
                  f"(<= {meta['graph_max_tokens']} tokens), which the whole-model graph pays once in all"
                  if meta["graph_max_tokens"] else "the table's entries as timed (nothing is graph-timed on the CPU)")
    lines = [f"# Whole-model latency: Llama {meta['params'] / 1e9:.3f} B on {meta['device']}", "",
             f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}; {meta['dtype']}; "
             f"{meta['notes']}; median of {meta['reps']} runs, {meta['timer']}; total {meta['total_s']:.0f} s "
             f"(" + ", ".join(f"{k} {s:.0f} s" for k, s in meta["stages_s"].items()) + ").", "",
             "## Predicted (rest + layers from the table) vs measured forward, ms", "",
             f"Predicted = rest + layers (`LatencyTable.layer_ms`): {correction}. The rest carries its calibration "
             "(`RestLatency.calibration_ms`, measured by `measure_rest`: the forward of the model with every layer "
             "at w4 less the stubbed rest and the w4 entries where the table holds w4 for every layer, else the float "
             "model's forward less the rest and its float layers timed alone; `calibration_from` in bench.json); "
             "'uncalibrated' is the error without it (what sessions before 41 reported). Raw sum = rest + the "
             "entries as timed in isolation.", "",
             "| plan | tokens | rest | layers | raw sum | raw error | predicted | measured | error | uncalibrated "
             "| timed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cal = {int(t): ms for t, ms in result["rest"].get("calibration_ms", {}).items()}
    lines += [f"| {r['plan']} | {r['tokens']} | {r['rest_ms']:.4f} | {r['layers_ms']:.4f} | {r['raw_ms']:.4f} | "
              f"{100 * (r['raw_ms'] - r['measured_ms']) / r['measured_ms']:+.1f}% | {r['predicted_ms']:.4f} | "
              f"{r['measured_ms']:.4f} | {100 * r['rel_error']:+.1f}% | "
              f"{100 * (r['predicted_ms'] - cal.get(r['tokens'], 0.0) - r['measured_ms']) / r['measured_ms']:+.1f}% "
              f"| {r['mode']} |" for r in rows]
    source = result["rest"].get("calibration_from", {})
    lines += ["", "Calibration: " + (", ".join(f"{ms:+.4f} ms at {t} tokens from the {source.get(str(t), 'float')} "
                                               "model" for t, ms in cal.items()) or "none")]
    lines += ["", "## Decode (1 token, no KV cache)", "", "| plan | ms | tokens/s | vs float |", "|---|---|---|---|"]
    lines += [f"| {d['plan']} | {d['ms']:.4f} | {d['tokens_per_s']:.1f} | {d['vs_float']:.2f}x |" for d in decode]
    lines += ["", "## Memory: plan's predicted bytes vs measured", "",
              f"Float model: {result['float_bytes'] / MIB:.1f} MiB of parameters + buffers. "
              f"Measured = {checks[0].memory if checks else '-'}; peak includes the forward's activations and "
              "temporaries.", "",
              "| plan | avg bits | choices | predicted MiB | resident MiB | resident / predicted | peak MiB |",
              "|---|---|---|---|---|---|---|"]
    for name, p in result["plans"].items():
        c = next(c for c in checks if c.plan == name)
        lines.append(f"| {name} | {p['avg_bits']:.3f} | {p['bits']} | {c.predicted_bytes / MIB:.1f} | "
                     f"{c.resident_bytes / MIB:.1f} | {c.resident_bytes / c.predicted_bytes:.4f} | "
                     f"{c.peak_bytes / MIB:.1f} |")
    lines += [""] + [f"- {note}" for note in result["notes"]] if result["notes"] else []
    lines += ["", "## Layer table: the path the model runs vs the fastest measured, ms", "",
              "| N x K | tokens | float | " + " | ".join(f"{c} model (path) | {c} fastest (path)" for c in choices) + " |",
              "|---|---|---|" + "---|---|" * len(choices)]
    for r in kernels:
        cells = [f"{r[c]['model_ms']:.4f} ({r[c]['model_path']}) | {r[c]['fastest_ms']:.4f} ({r[c]['fastest_path']})"
                 for c in choices]
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['float_ms']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
