"""Job specs run in-process: validation before any work, the same plan as allocate(), shards kept in a store
that a stopped job resumes from and a second job on the same model and data reuses."""

import json

import pytest
import yaml
from tiny import JOB, one_torch_thread, reference_plan, save_model_and_calib

from allocator import JobSpec, Plan, run_job
from allocator.cli import main



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-layer GPT-2 saved to disk, 3 calibration batches, and a job spec that allocates it."""
    root = tmp_path_factory.mktemp("jobs")
    save_model_and_calib(root, batch_size=1)
    (root / "job.yaml").write_text(yaml.safe_dump(JOB | {"out": "out", "store": "store"}))
    with one_torch_thread():
        yield root


@pytest.fixture(scope="module")
def reference(files):
    """The plan of the plain in-process API on the same model, data and settings."""
    return reference_plan(files)


def status(out):
    return json.loads((out / "status.json").read_text())


def test_a_job_spec_gives_the_plan_that_allocate_gives(files, reference):
    plan = run_job(files / "job.yaml")
    assert [l.choice for l in plan.layers] == [l.choice for l in reference.layers]
    assert plan.predicted == pytest.approx(reference.predicted, rel=1e-12)
    assert Plan.load(files / "out" / "plan.json").bits == plan.bits
    assert status(files / "out") | {"elapsed_s": 0} == {
        "stage": "done", "shards_done": 3, "shards_total": 3, "shards_computed": 3, "shards_reused": 0,
        "batches_done": 3, "batches_total": 3, "layers": 8, "elapsed_s": 0, "eta_s": 0.0, "plan": str(files / "out" / "plan.json")}


def test_a_second_job_on_the_same_model_and_data_reuses_the_stored_profile(files):
    if not (files / "out" / "plan.json").exists():
        run_job(files / "job.yaml")
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {"budget": {"avg_bits": 3}, "out": "out3"}
    (files / "job3.json").write_text(json.dumps(spec))
    plan = run_job(files / "job3.json")
    assert plan.predicted["avg_bits"] <= 3
    assert status(files / "out3")["shards_computed"] == 0 and status(files / "out3")["shards_reused"] == 3


def test_a_latency_budget_bounds_the_whole_model(files):
    """With `latency:` and no Ray, the table (layers and the model's unquantized rest) is measured in-process on
    this machine's device and cached in the store; the budget covers rest + layers."""
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {"budget": {"latency_ms": 1e6}, "latency": {"tokens": 1},
                                                                "out": "out_latency"}
    (files / "job_latency.json").write_text(json.dumps(spec))
    plan = run_job(files / "job_latency.json")
    assert plan.solver["latency_scope"] == "whole model" and plan.solver["latency_tokens"] == 1
    rest, layers = plan.predicted["latency_rest_ms"], plan.predicted["latency_layers_ms"]
    assert rest > 0 and plan.predicted["latency_ms"] == pytest.approx(rest + layers)
    assert len(list((files / "store" / "latency").glob("latency_*.json"))) == 1
    (files / "job_latency.json").write_text(json.dumps(spec | {"budget": {"latency_ms": rest / 100}}))
    with pytest.raises(ValueError, match="below the model's unquantized rest alone"):
        run_job(files / "job_latency.json")
    # decode and prefill at once: the cached table gains the 4-token entries and the rest at 4 tokens
    (files / "job_latency.json").write_text(json.dumps(spec | {"budget": {"latency_ms": {"1": 1e6, "4": 1e6}}}))
    plan = run_job(files / "job_latency.json")
    assert plan.budget.latency_ms == {1: 1e6, 4: 1e6} and plan.solver["latency_scope"] == "whole model"
    at = plan.predicted["latency_ms_at"]
    assert set(at) == {"1", "4"} and at["1"] == pytest.approx(plan.predicted["latency_ms"])


def test_a_stopped_job_resumes_and_recomputes_only_the_missing_shard(files):
    first = run_job(files / "job.yaml")
    shards = sorted((files / "store").glob("hessian-*.json"))
    assert len(shards) == 3
    shards[1].unlink()  # as if the job had been stopped before that shard finished
    again = run_job(files / "job.yaml")
    assert status(files / "out")["shards_computed"] == 1
    assert [l.choice for l in again.layers] == [l.choice for l in first.layers]
    assert again.predicted == first.predicted


def test_layer_shards_give_the_same_plan(files, reference):
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {"shards": {"by": "layers", "count": 2},
                                                                 "out": "out_layers", "store": "store_layers"}
    plan = run_job(JobSpec.from_dict(spec, base_dir=files))
    done = status(files / "out_layers")
    assert (done["shards_total"], done["layers_done"], done["layers_total"]) == (2, 8, 8)
    assert [l.choice for l in plan.layers] == [l.choice for l in reference.layers]
    assert plan.predicted == pytest.approx(reference.predicted, rel=1e-12)


def test_bitalloc_run_takes_a_job_spec(files, capsys):
    assert main(["run", str(files / "job.yaml")]) == 0
    assert "avg" in capsys.readouterr().out
    assert main(["run", str(files / "job.yaml"), "--model", "x"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"modle": "x"}, r"unknown job spec keys \['modle'\]"),
    ({"ray": {"workers": 2, "gpu": 1}}, r"unknown ray keys \['gpu'\]"),
    ({"budget": {"avg_bits": 1}}, r"avg_bits=1 is impossible: the fewest bits among the candidates \['w2', 'w4', 'w8'\] is 2"),
    ({"budget": {"avg_bits": -4}}, r"Budget.avg_bits must be a positive finite number"),
    ({"budget": {"latency_ms": 1}}, r"latency_ms budget needs a latency table"),
    ({"profiler": "nope"}, r"unknown profiler 'nope'"),
    ({"solver": "nope"}, r"unknown solver 'nope'"),
    ({"calib": "missing.pt"}, r"missing.pt.*does not exist"),
    ({"shards": {"by": "rows"}}, r"shards.by must be 'batches' or 'layers'"),
    ({"ray": {"workers": 0}}, r"ray.workers must be a positive integer"),
])
def test_bad_specs_are_rejected_before_anything_runs(files, change, message):
    spec = yaml.safe_load((files / "job.yaml").read_text()) | change
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        JobSpec.from_dict(spec, base_dir=files)


def test_an_impossible_memory_budget_is_rejected_before_profiling(files):
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {"budget": {"memory_mb": 0.01}, "store": "store_none"}
    with pytest.raises(ValueError, match=r"memory_mb=0.01 is impossible: the smallest achievable .* is 0.0\d+ MiB"):
        run_job(JobSpec.from_dict(spec, base_dir=files))
    assert not (files / "store_none").exists()


def test_spec_files_with_syntax_errors_name_the_file(files):
    (files / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad.yaml' is not valid YAML"):
        JobSpec.load(files / "bad.yaml")
    (files / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad.json' is not valid JSON"):
        JobSpec.load(files / "bad.json")
