"""Profiler benchmark: how well each sensitivity profiler predicts what quantization actually does.

On three trained networks (benchmarks/bench_models.py: char GPT-2, char BERT masked LM, digits CNN):
  1. Spearman rank correlation of each profiler's Omega_i(b) with the measured single-layer deltas, per bit width;
  2. ILP plans at 3 and 4 average bits: each profiler's predicted cost, the prediction from measured single-layer
     deltas without and with the inter-layer pair terms, and the measured loss change of the whole quantized model;
  3. held-out quality of every profiler's plan at equal average bits, uniform quantization beside them;
  4. profiling wall time per profiler, and batched Hutchinson probes (batch_probes=8) against one probe per
     double backward (batch_probes=1, the PyHessian loop), the same probes in the same run.

    python benchmarks/bench_profilers.py --quick --markdown docs/profilers.md    # the committed table
    python benchmarks/bench_profilers.py --timing-only --device cuda              # 4. only; needs no solver
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import TASKS, Task  # noqa: E402
from kernels import Choice  # noqa: E402
from profilers import Calibration, Profile, build_layer_graph, profile  # noqa: E402

BITS = (2, 3, 4, 8)
CORRELATED_BITS = (2, 3, 4)
AVG_BITS = (4.0, 3.0)
PROFILERS = ("hessian", "eigen", "fisher", "lrp", "gptq", "interlayer", "measured")
SETTINGS = {"eigen": {"tol": 1e-2, "max_iter": 30}}
QUICK_SETTINGS = {"eigen": {"tol": 1e-2, "max_iter": 10}, "hessian": {"max_probes": 32}}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def timed_profile(task: Task, calib: Calibration, graph, name: str, **settings) -> tuple[Profile, str]:
    """One profiler run and its time as "wall s (process CPU s)": CPU seconds count all threads and
    are steadier than wall time on a shared machine."""
    cpu = time.process_time()
    prof = profile(task.model, calib, graph, [Choice(b) for b in BITS], profiler=name, **settings)
    if next(task.model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return prof, f"{prof.elapsed_s:.2f} ({time.process_time() - cpu:.1f})"


def warm_up(task: Task, calib: Calibration) -> None:
    """One forward and backward first, so that no profiler's time includes the device's start-up."""
    calib.loss(task.model, 0).backward()
    task.model.zero_grad(set_to_none=True)


def run_profilers(task: Task, calib: Calibration, graph, settings: dict) -> tuple[dict[str, Profile], dict[str, str]]:
    """Every profiler's Profile and its time."""
    profiles, times = {}, {}
    for name in PROFILERS:
        profiles[name], times[name] = timed_profile(task, calib, graph, name, **settings.get(name, {}))
        print(f"  {task.name}: {name} {times[name]} s", flush=True)
    return profiles, times


def probe_batching_times(task: Task, calib: Calibration, graph, probes: int) -> list:
    """Times of the Hutchinson traces with the same number of probes per layer (tol=0: no early stop), one probe
    per double backward against 8 batched, and the wall-time speed-up. `probes` is rounded up to whole rounds
    (8 probes on every calibration batch), so that both runs draw the same number."""
    per_round = 8 * len(calib)
    probes = -(-probes // per_round) * per_round
    runs = {bp: timed_profile(task, calib, graph, "hessian", tol=0.0, max_probes=probes, min_probes=probes, batch_probes=bp)
            for bp in (1, 8)}
    return [probes, runs[1][1], runs[8][1], runs[1][0].elapsed_s / runs[8][0].elapsed_s]


def rank_correlations(profiles: dict[str, Profile]) -> dict[str, list[float]]:
    """Spearman rho over layers of each profiler's cost with the measured single-layer deltas, per bit width.
    For "interlayer" its pair-augmented score is compared (its cost column is the measured delta itself)."""
    truth = profiles["measured"]
    out = {}
    for name, prof in profiles.items():
        if name == "measured":
            continue
        table = prof.per_choice("augmented") if name == "interlayer" else prof.cost
        out[name] = [float(spearmanr(table[:, truth.choices.index(f"w{b}")], truth.cost[:, truth.choices.index(f"w{b}")]).statistic)
                     for b in CORRELATED_BITS]
    return out


def as_profiled(model, graph, prof: Profile):
    """Wrap a Profile for the allocator's solver (imported here: --timing-only needs no solver)."""
    from allocator.api import ProfiledModel
    from allocator.model import model_identity, quantized_layer_bias_bytes, storage_bytes

    fixed = storage_bytes(model, exclude=set(graph.names)) + quantized_layer_bias_bytes(model, graph.names)
    return ProfiledModel(graph, prof, fixed, model_identity(model))


def without_pairs(prof: Profile) -> Profile:
    return Profile(layers=prof.layers, choices=prof.choices, cost=prof.cost, scores=prof.scores, profiler=prof.profiler,
                   settings=prof.settings, model_hash=prof.model_hash, calib_hash=prof.calib_hash)


def plans_at(task: Task, graph, profiles: dict[str, Profile], avg_bits: float) -> dict[str, object]:
    """Uniform quantization at avg_bits and every profiler's ILP plan at avg_bits (interlayer with and without pairs)."""
    from allocator import Budget
    from allocator.api import solve_profiled, uniform_plan

    budget = Budget(avg_bits=avg_bits)
    plans = {f"uniform w{int(avg_bits)}": uniform_plan(as_profiled(task.model, graph, profiles["measured"]), Choice(int(avg_bits)))}
    for name, prof in profiles.items():
        if name == "interlayer":
            plans["interlayer, no pairs"] = solve_profiled(as_profiled(task.model, graph, without_pairs(prof)), budget)
            name = "interlayer + pairs"
        plans[name] = solve_profiled(as_profiled(task.model, graph, prof), budget)
    return plans


def predicted_from_deltas(plan, measured: Profile, interlayer: Profile) -> tuple[float, float]:
    """Sum of the measured single-layer deltas at the plan's choices, and that plus the pair terms."""
    index = {layer.name: measured.choices.index(layer.choice) for layer in plan.layers}
    single = float(sum(measured.cost[i, index[name]] for i, name in enumerate(measured.layers)))
    pairs = float(sum(d[index[a], index[b]] for (a, b), d in interlayer.pairs.items()))
    return single, single + pairs


def plan_rows(task: Task, calib: Calibration, held_out: Calibration, graph, profiles: dict[str, Profile]) -> list[list]:
    from allocator.evaluate import evaluate

    float_calib = evaluate(task.model, calib)["loss"]
    float_held = evaluate(task.model, held_out)
    rows = [[task.name, "-", "float32", 32.0, "", "", "", "", float_held["loss"], quality(float_held)]]
    for avg_bits in AVG_BITS:
        for name, plan in plans_at(task, graph, profiles, avg_bits).items():
            qmodel = plan.apply(task.model)
            single, with_pairs = predicted_from_deltas(plan, profiles["measured"], profiles["interlayer"])
            held = evaluate(qmodel, held_out)
            own = "" if name.startswith("uniform") else plan.predicted["cost"]
            rows.append([task.name, avg_bits, name, plan.predicted["avg_bits"], own, single, with_pairs,
                         evaluate(qmodel, calib)["loss"] - float_calib, held["loss"], quality(held)])
    return rows


def quality(result: dict) -> str:
    return f"acc {result['accuracy']:.4f}" if "accuracy" in result else f"ppl {result['perplexity']:.3f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 calibration batches per model (else 8), fewer probes and power iterations")
    parser.add_argument("--timing-only", action="store_true", help="profiling times only: no plans, no solver needed")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--probes", type=int, default=32,
                        help="Hutchinson probes per layer in the batching comparison (rounded up to a multiple of 8 x calibration batches)")
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    correlations, plans, timings = [], [], []
    for model_name in args.models:
        task = TASKS[model_name](args.quick)
        task.model.to(args.device)
        calib = Calibration(task.calib, labels=task.labels)
        print(f"{task.name}: {task.description}; {len(calib)} calibration batches", flush=True)
        graph = build_layer_graph(task.model, calib[0])
        warm_up(task, calib)
        profiles, times = run_profilers(task, calib, graph, QUICK_SETTINGS if args.quick else SETTINGS)
        timings.append([task.name, len(graph)] + [times[p] for p in PROFILERS] + probe_batching_times(task, calib, graph, args.probes))
        if args.timing_only:
            continue
        correlations += [[task.name, len(graph), name] + rhos for name, rhos in rank_correlations(profiles).items()]
        plans += plan_rows(task, calib, Calibration(task.held_out, labels=task.held_out_labels), graph, profiles)

    command = "python benchmarks/bench_profilers.py " + " ".join(sys.argv[1:])
    parts = [f"Command: `{command}`  \nMachine: {machine(args.device)}  \n"
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; total {time.perf_counter() - start:.0f} s\n"]
    if not args.timing_only:
        parts.append("### Spearman rho of Omega_i(b) with the measured single-layer deltas\n\n"
                     + markdown_table(["model", "layers", "profiler"] + [f"w{b}" for b in CORRELATED_BITS], correlations))
        parts.append("### ILP plans at equal average bits: predicted vs measured loss change, held-out quality\n\n"
                     + markdown_table(["model", "budget", "plan", "avg bits", "own predicted cost", "sum of single deltas",
                                       "+ pair terms", "measured d loss (calib)", "held-out loss", "held-out quality"], plans))
    parts.append(f"### Profiling time, wall s (process CPU s), on {args.device}; Hutchinson with the same probes per layer: "
                 "one probe per double backward vs 8 batched\n\n"
                 + markdown_table(["model", "layers"] + list(PROFILERS)
                                  + ["probes", "hutchinson 1 probe", "hutchinson 8 batched", "speed-up"], timings))
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
