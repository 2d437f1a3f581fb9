"""Run the GPU test files across several device calls on one warm machine, each call picking up where the last
stopped.

The GPU tests compile every Triton tile on first use; on 15 xdist workers the whole of tests/test_kernels_gpu.py
takes longer than one 10-minute device call (session 29: 19 of 221 passed in 380 s). Triton's on-disk cache and
this script's state directory survive between calls while the machine is held, so a second call made at once
compiles less and skips what passed. Each call runs pytest for at most --budget seconds on the collected tests
no earlier call saw pass (named by their exact ids), and appends the tests that pass to <state>/passed.txt; the
pytest log of call k is <state>/log_k.txt (copy it to $OUT to keep it). The last line says how many passed, failed
and remain.
    python benchmarks/gpu_tests_in_parts.py --budget 540 [--state .device/gpu-tests] [--seed FILE] [-- pytest args]

Passes also add up across sessions, whose machines start bare: passed.txt begins with a hash of every Python source
of our packages, the tests and the benchmarks, and the GPU's compute capability (`run_key`). Commit it (e.g. under
docs/gpu_runs/), and a later call given it as `--seed` skips those tests too, but only for the same sources on a GPU
of the same capability: a test that passed on other code, or was skipped on other hardware, does not count.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

FILES = ("tests/test_kernels_gpu.py", "tests/test_kernels_gpu_layout.py", "tests/test_latency.py")
OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED"
# a test id: a parametrized one runs to the "]" before a space or the line's end (its id may hold spaces)
TEST_ID = r"tests/\S+?::[^\s\[]+(?:\[.*?\](?=\s|$))?"
# "[gw3] [ 5%] PASSED tests/...::test[id]" under xdist, "tests/...::test[id] PASSED [ 5%]" without
RESULT = re.compile(rf"\b({OUTCOMES}) ({TEST_ID})|({TEST_ID}) ({OUTCOMES})\b", re.MULTILINE)
SOURCES = ("allocator", "benchmarks", "kernels", "profilers", "solvers", "tests")
ROOT = Path(__file__).resolve().parents[1]


def run_key() -> str:
    """What a recorded pass or skip is valid for: sha256 over the path and bytes of every .py file under SOURCES,
    and the compute capability of the first GPU nvidia-smi lists."""
    digest = hashlib.sha256()
    for path in sorted(p for package in SOURCES for p in (ROOT / package).rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.split()
    except FileNotFoundError:
        smi = []
    return f"# tree {digest.hexdigest()} compute capability {smi[0] if smi else 'none (no GPU)'}"


def read_passed(path: Path, key: str) -> set[str]:
    """The tests a passed.txt lists, if it was written under `key` (else none, and it says so)."""
    if not path.exists():
        return set()
    lines = path.read_text().split("\n")
    if lines[0] != key:
        print(f"{path}: written for other sources or another GPU ({lines[0] or 'no key line'}); not used")
        return set()
    return {line for line in lines[1:] if line}


def outcomes(log: str) -> dict[str, str]:
    """Test id -> PASSED, FAILED, ERROR or SKIPPED, from a `pytest -v` log (with or without xdist)."""
    return {m[1] or m[2]: m[0] or m[3] for m in RESULT.findall(log)}


def collect(pytest_args: list[str]) -> list[str]:
    """The test ids pytest collects from FILES with `pytest_args` (e.g. -k)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES,
                          *pytest_args], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.startswith("tests/") and "::" in line]


def not_passed(collected: list[str], passed: set[str]) -> list[str]:
    """The collected ids not yet passed or skipped, to be named to pytest one by one (exact ids: `--deselect`
    matches by prefix, so deselecting a passed `test_a` would also drop `test_ab`)."""
    return [test for test in collected if test not in passed]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=540, help="seconds this call's pytest may run")
    ap.add_argument("--state", default=".device/gpu-tests",
                    help="directory kept between calls (passed.txt, logs); git-ignored, so it stays on a warm machine")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--seed", type=Path, help="a passed.txt of an earlier session (used only for the same sources)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = ap.parse_args()
    if args.seed is not None and not args.seed.is_file():
        ap.error(f"--seed {args.seed}: no such file")
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    passed_file = state / "passed.txt"
    key = run_key()
    passed = read_passed(passed_file, key) | (read_passed(args.seed, key) if args.seed else set())
    log = state / f"log_{len(list(state.glob('log_*.txt')))}.txt"
    collected = collect(args.pytest_args)
    todo = not_passed(collected, passed)
    if not todo:
        print(f"{passed_file}: nothing to run ({len(collected)} tests collected, all passed or skipped before)")
        return
    cmd = [sys.executable, "-m", "pytest", "-v", "-n", str(args.workers), "-p", "no:cacheprovider", *todo,
           *args.pytest_args]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and its xdist workers
            proc.wait()
            f.write(f"\n[gpu_tests_in_parts] stopped after {args.budget} s\n")
    results = outcomes(log.read_text())
    passed |= {test for test, outcome in results.items() if outcome in ("PASSED", "SKIPPED")}
    passed_file.write_text("\n".join([key, *sorted(passed)]) + "\n")
    failed = sorted(test for test, outcome in results.items() if outcome in ("FAILED", "ERROR"))
    remaining = [test for test in not_passed(todo, passed) if test not in failed]
    for test in failed:
        print("FAILED", test)
    print(f"{log}: {sum(o == 'PASSED' for o in results.values())} passed in this call; {len(passed)} passed or "
          f"skipped in all; {len(failed)} failed; {len(remaining)} remain")


if __name__ == "__main__":
    main()
