"""The ``bitalloc`` command line: run (flags or a job spec), profile, solve, pareto, demo; submit, status,
logs and stop for jobs on a Ray cluster."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .budget import Budget


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets (give at least one)")
    g.add_argument("--avg-bits", type=float, help="parameter-weighted average weight bits")
    g.add_argument("--memory-mb", type=float, help="whole model's weights in MiB")
    g.add_argument("--latency-ms", type=_latency_ms, metavar="MS | TOKENS:MS,...",
                   help="predicted latency from a latency table: MS at --tokens, or a bound per token count, e.g. "
                        "1:1.9,512:5 for decode and prefill at once")
    g.add_argument("--bops", type=float, help="bit operations per sample")
    g.add_argument("--latency-table", help="latency table JSON from `bitalloc latency` (needed by --latency-ms, "
                                           "except in `run`, which measures one on this machine's device)")
    g.add_argument("--tokens", type=int, default=1, help="tokens per forward the latency budget is for (default 1)")


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(memory_mb=args.memory_mb, avg_bits=args.avg_bits, latency_ms=args.latency_ms, bops=args.bops)


def _latency(args: argparse.Namespace) -> dict:
    if args.latency_table is None:
        return {}
    from kernels.latency import LatencyTable

    return {"latency_table": LatencyTable.load(args.latency_table), "tokens": args.tokens}


def _latency_ms(text: str) -> float | dict[int, float]:
    try:
        if ":" not in text:
            return float(text)
        return {int(t): float(ms) for t, ms in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--latency-ms must be milliseconds (2.5) or TOKENS:MS pairs (1:1.9,512:5), got {text!r}") from None


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be comma-separated integers like 2,3,4,8, got {text!r}") from None


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--profiler-setting takes KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, value


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="Hugging Face model directory or hub id")
    p.add_argument("--calib", required=required, help="calibration batches: .pt (list of batches) or .txt (tokenized with the model's tokenizer)")
    p.add_argument("--bits", type=_bits, default=(2, 3, 4, 8), help="candidate weight bits (default 2,3,4,8)")
    p.add_argument("--choices", help="candidate choice labels instead of --bits, e.g. w4,w8gc,w4g64 (w<bits>[g<size>|gc]"
                   "[a<bits>|f8][asym][@<kernel>]: w8gca8 int8 activations, w4gcf8 float8 ones, w4@tinygemm a layer "
                   "held for torch's tinygemm)")
    p.add_argument("--profiler", default="hessian", help="sensitivity profiler (default hessian)")
    p.add_argument("--cache-dir", help="reuse profiles cached here")
    p.add_argument("--profiler-setting", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                   help="a profiler setting, e.g. max_probes=32 (repeatable)")


def _choices(args: argparse.Namespace):
    from .api import parse_choices

    return parse_choices(args.bits, args.choices.split(",") if args.choices else None)


def _measured_here(model, profiled, budget: Budget, tokens: int, out: Path) -> dict:
    """A latency budget without --latency-table: the table (the layers and the model's rest) measured on this
    machine's device at the budget's token counts, cached under <out>/latency, as a job without Ray does."""
    if budget.latency_ms is None:
        return {}
    from .device_latency import measure_here

    counts = tuple(budget.latency_at(tokens))
    table = measure_here(profiled.graph, profiled.profile.choices, counts, str(out / "latency"), model=model,
                         graph=profiled.graph)
    print(f"no --latency-table: measured one on {table.device} at tokens {list(counts)} (cached in {out / 'latency'})")
    return {"latency_table": table, "tokens": tokens}


def _load(args: argparse.Namespace):
    from .calib_files import load_calibration
    from .model import load_model

    model = load_model(args.model)
    calib = load_calibration(args.calib, tokenizer_path=args.model)
    return model, calib


def cmd_run(args: argparse.Namespace) -> None:
    if args.spec is not None:
        return cmd_run_job(args)
    from .api import profile_model, solve_profiled
    from .quantize import quantized_bytes, save_quantized
    from .calib_files import load_calibration
    from .report import has_labels, print_plan_check, print_quality

    model, calib = _load(args)
    profiled = profile_model(model, calib, _choices(args), profiler=args.profiler, cache_dir=args.cache_dir,
                             **dict(args.profiler_setting))
    budget, out = _budget(args), Path(args.out)
    latency = _latency(args) or _measured_here(model, profiled, budget, args.tokens, out)
    plan = solve_profiled(profiled, budget, method=args.method, **latency)
    qmodel = plan.apply(model)
    save_quantized(qmodel, out, latency_table=latency.get("latency_table"))
    print(plan.summary())
    print_plan_check(plan, quantized_bytes(qmodel), out)
    held_out = load_calibration(args.eval, tokenizer_path=args.model) if args.eval else calib
    if has_labels(held_out):
        print_quality(model, qmodel, held_out, "held-out data" if args.eval else "calibration data")
    else:
        print("quality not measured: the batches carry no labels (pass --eval with labelled batches)")
    print(f"wrote {out / 'plan.json'} and the quantized model to {out}/")


def cmd_run_job(args: argparse.Namespace) -> None:
    from .jobs import run_job

    plan = run_job(args.spec)
    print(plan.summary())


def cmd_submit(args: argparse.Namespace) -> None:
    from .submit import submit

    handle = submit(args.spec, address=args.address)
    print(f"submitted job {handle.job_id}")
    if args.wait:
        plan = handle.result(timeout_s=args.timeout)
        print(plan.summary())


def _handle(args: argparse.Namespace):
    from .submit import JobHandle

    return JobHandle(args.job_id, address=args.address)


def cmd_status(args: argparse.Namespace) -> None:
    status = _handle(args).status()
    p = status["progress"]
    line = f"{status['job_id']}: {status['status']}"
    if p:
        unit = "layers" if "layers_done" in p else "batches"
        line += (f", stage {p['stage']}, shards {p['shards_done']}/{p['shards_total']} "
                 f"({p['shards_reused']} reused), {unit} {p[unit + '_done']}/{p[unit + '_total']}, "
                 f"{p['layers']} layers, ETA {p['eta_s']:g} s")
    print(line)


def cmd_logs(args: argparse.Namespace) -> None:
    print(_handle(args).logs(), end="")


def cmd_stop(args: argparse.Namespace) -> None:
    stopped = _handle(args).stop()
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")


def cmd_profile(args: argparse.Namespace) -> None:
    from .api import profile_model

    model, calib = _load(args)
    profiled = profile_model(model, calib, _choices(args), profiler=args.profiler, cache_dir=args.cache_dir,
                             **dict(args.profiler_setting))
    profiled.save(args.out)
    print(f"profiled {len(profiled.graph)} layers x {len(profiled.profile.choices)} choices with "
          f"{args.profiler} in {profiled.profile.elapsed_s:.1f} s; wrote {args.out}")


def cmd_solve(args: argparse.Namespace) -> None:
    from .api import ProfiledModel, solve_profiled

    plan = solve_profiled(ProfiledModel.load(args.profile), _budget(args), method=args.method, **_latency(args))
    plan.save(args.out)
    print(plan.summary())
    print(f"wrote {args.out}")


def cmd_latency(args: argparse.Namespace) -> None:
    from kernels.latency import measure

    from .api import ProfiledModel

    profiled = ProfiledModel.load(args.profile)
    tokens = _ints(args.tokens, "--tokens")
    table = measure(profiled.graph, profiled.profile.choices, tokens=tokens, device=args.device)
    line = (f"measured {len(table.entries)} (shape, choice, tokens) latencies on {table.device}"
            + (f"; removed choices: {table.skipped}" if table.skipped else ""))
    if args.model is not None:
        rest = _measure_rest(args.model, profiled, tokens, args.device, table)
        line += "; the model's unquantized rest: " + ", ".join(
            f"{ms:.4g} ms at {t} tokens" + (f" ({rest.calibration_ms[t]:+.4g} ms calibration, from the "
                                            f"{rest.calibration_from.get(t, 'float')} model)"
                                            if t in rest.calibration_ms else "") for t, ms in rest.ms.items())
    table.save(args.out)
    print(line + f"; wrote {args.out}")


def _measure_rest(model_path: str, profiled, tokens: tuple[int, ...], device: str, table):
    """Time the rest of the profiled model (its layers stubbed out) on `device`, in the dtype `measure` used."""
    from kernels.latency import default_dtype
    from kernels.model_latency import measure_rest, model_key

    from .model import load_model

    model = load_model(model_path)
    if model_key(model, profiled.graph.names) != profiled.rest_key:
        raise ValueError(f"--model {model_path} is not the model the profile was made for (or the profile predates "
                         "rest keys): run `bitalloc profile` on it again")
    return measure_rest(model.to(device, default_dtype(device)), profiled.graph, tokens, device, table=table)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers like 1,16,512, got {text!r}") from None


def cmd_pareto(args: argparse.Namespace) -> None:
    from .frontier import frontier

    frontier(args.profile, objective=args.objective, out=args.out, plot=args.plot, **_latency(args))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitalloc", description="Mixed-precision bit allocation for PyTorch / Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="profile, solve and save a quantized model (from flags or a job spec)")
    p.add_argument("spec", nargs="?", help="job spec (.yaml/.json) instead of the flags below")
    _add_model_args(p, required=False)
    _add_budget_args(p)
    p.add_argument("--method", default="ilp", help="solver method (default ilp)")
    p.add_argument("--eval", help="labelled held-out batches (.pt or .txt) to measure quality on (default: the calibration data)")
    p.add_argument("--out", help="output directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Jobs API)")
    p.add_argument("spec", help="job spec (.yaml/.json)")
    p.add_argument("--address", help="Ray dashboard address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--wait", action="store_true", help="wait for the plan and print it")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits (default 3600)")
    p.set_defaults(func=cmd_submit)
    for name, func, text in (("status", cmd_status, "a submitted job's state and progress"),
                             ("logs", cmd_logs, "a submitted job's logs"), ("stop", cmd_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", help="Ray dashboard address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
        p.set_defaults(func=func)

    p = sub.add_parser("profile", help="profile layer sensitivities and save them for later solves")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("solve", help="solve a saved profile under budgets")
    p.add_argument("--profile", required=True, help="profile JSON written by `bitalloc profile`")
    _add_budget_args(p)
    p.add_argument("--method", default="ilp", help="solver method (default ilp)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("latency", help="measure the latency table of a saved profile's layers and choices on a device")
    p.add_argument("--profile", required=True, help="profile JSON written by `bitalloc profile`")
    p.add_argument("--device", default="cuda", help="device to time on (default cuda; cpu works too)")
    p.add_argument("--tokens", default="1,16,512", help="tokens per forward to time (default 1,16,512)")
    p.add_argument("--model", help="the profiled model (directory or hub id): also time its unquantized rest, so "
                                   "latency budgets cover the whole model")
    p.add_argument("--out", required=True, help="latency table JSON to write")
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser("pareto", help="exact cost-vs-bytes (or -latency) frontier of a saved profile")
    p.add_argument("--profile", required=True, help="profile JSON written by `bitalloc profile`")
    p.add_argument("--objective", default="memory", choices=("memory", "bops", "latency"),
                   help="quantity traded against cost (latency: needs --latency-table)")
    p.add_argument("--latency-table", help="latency table JSON from `bitalloc latency` (for --objective latency)")
    p.add_argument("--tokens", type=int, default=1, help="tokens per forward of the latency frontier (default 1)")
    p.add_argument("--plot", help="PNG to draw the frontier into")
    p.add_argument("--out", required=True, help="frontier JSON to write")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("demo", help="train a small GPT-2 on shipped text, allocate bits, compare to uniform")
    p.add_argument("--out", default="bitalloc-demo", help="output directory (default ./bitalloc-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "run" and (args.spec is None) == (args.model is None):
        print("bitalloc: error: run takes a job spec, or --model, --calib and --out (not both)", file=sys.stderr)
        return 2
    if args.command == "run" and args.spec is None and (args.calib is None or args.out is None):
        print("bitalloc: error: run --model needs --calib and --out", file=sys.stderr)
        return 2
    if getattr(args, "spec", None) is None and getattr(args, "memory_mb", None) is None and args.command in ("run", "solve") and not any(
        getattr(args, k) is not None for k in ("avg_bits", "latency_ms", "bops")
    ):
        print("bitalloc: error: give a budget: --avg-bits, --memory-mb, --latency-ms or --bops", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, RuntimeError, TimeoutError) as e:
        print(f"bitalloc: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
