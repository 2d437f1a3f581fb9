"""benchmarks/gpu_tests_in_parts.py reads each test's outcome from pytest's log, ids with spaces included (session
40: ids cut at their first space deselected three tests by prefix and left them counted as remaining)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_tests_in_parts.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_tests_in_parts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_outcomes_of_xdist_and_plain_logs_keep_whole_ids() -> None:
    spaced = "tests/t.py::test_conv[QuantSpec(bits=3, group_size=64, symmetric=False)]"
    log = "\n".join([
        f"{spaced} ",
        f"[gw13] [ 75%] PASSED {spaced} ",
        "[gw1] [ 80%] FAILED tests/t.py::test_linear[dtype1-True-4]",
        "tests/t.py::test_plain SKIPPED (no GPU)                    [ 90%]",
        "tests/t.py::test_tile[m1n32s3w2p2D-False-2] PASSED [100%]",
        "=== 2 passed, 1 failed, 1 skipped in 3.00s ===",
    ])
    assert _script().outcomes(log) == {
        spaced: "PASSED",
        "tests/t.py::test_linear[dtype1-True-4]": "FAILED",
        "tests/t.py::test_plain": "SKIPPED",
        "tests/t.py::test_tile[m1n32s3w2p2D-False-2]": "PASSED",
    }


def test_a_call_names_exactly_the_tests_not_yet_passed() -> None:
    """A passed `test_a` leaves `test_ab` to run (pytest's `--deselect` would drop both: it matches by prefix)."""
    collected = ["tests/t.py::test_a", "tests/t.py::test_ab", "tests/t.py::test_c[2]", "tests/t.py::test_c[20]"]
    passed = {"tests/t.py::test_a", "tests/t.py::test_c[2]"}
    assert _script().not_passed(collected, passed) == ["tests/t.py::test_ab", "tests/t.py::test_c[20]"]
