"""`bitalloc demo` end to end on a tiny, quickly trained model (the real demo trains a bigger one)."""

from allocator import Plan, load_quantized
from allocator.demo import DemoSettings, run_demo


def test_demo_trains_allocates_and_saves(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    settings = DemoSettings(n_layer=1, n_embd=32, n_head=2, seq_len=32, batch_size=8, steps=30, calib_batches=2,
                            eval_batches=2)
    rows = run_demo(out_dir=tmp_path / "out", settings=settings, profilers=("fisher", "measured"))
    by_name = {r["config"]: r for r in rows}
    assert set(by_name) == {"float32", "uniform 8-bit", "uniform 4-bit", "uniform 3-bit", "mixed (fisher) @ 4-bit size",
                            "mixed (fisher) @ 3-bit size", "mixed (measured) @ 4-bit size", "mixed (measured) @ 3-bit size"}
    for name, row in by_name.items():
        if name != "float32":
            assert row["predicted_mib"] == row["measured_mib"]
    assert by_name["mixed (measured) @ 3-bit size"]["measured_mib"] <= by_name["uniform 3-bit"]["measured_mib"]
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.profiler["name"] == "measured" and plan.predicted["avg_bits"] <= 3.0 + 1e-9
    assert load_quantized(tmp_path / "out") is not None
    printed = capsys.readouterr().out
    assert "reloaded outputs identical: True" in printed
    # a second run reuses the cached model instead of training again
    run_demo(out_dir=tmp_path / "out2", settings=settings, profilers=("fisher",))
    assert "training demo" not in capsys.readouterr().err
