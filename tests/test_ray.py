"""Profiling shards on Ray: a local cluster of fake-GPU nodes (ray.cluster_utils.Cluster) started by the fixture.

The same plan as in-process, one worker per GPU node, a worker killed mid-job costs only its own shard, more
GPUs than the cluster has is a clear error, and latency tables are measured on the GPU type the job names.
"""

import json
import os
import time
from pathlib import Path

import pytest
from tiny import FAST, JOB, env_vars, one_torch_thread, reference_plan, save_model_and_calib

from allocator import JobSpec, run_job
from allocator.distributed import measure_latency, profile_on_ray
from allocator.jobs import load_inputs, plan_shards
from allocator.store import ProfileRequest
from kernels.model_latency import model_key
from profilers import build_layer_graph, model_hash, register_profiler
from profilers.hessian import combine, hessian
from solvers import InfeasibleError

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@register_profiler("hessian_crash_once", combine=combine)
def hessian_crash_once(model, calib, graph, choices, shard=None, crash_dir="", crash_batch=1, **settings):
    """The Hessian profiler, except that the worker process dies (os._exit) the first time it reaches the
    shard of calibration batch ``crash_batch``. Every run is recorded in ``crash_dir/runs.log``."""
    with open(Path(crash_dir) / "runs.log", "a") as f:
        f.write(json.dumps(shard) + "\n")
    marker = Path(crash_dir) / "crashed"
    if shard == {"batches": [crash_batch]} and not marker.exists():
        marker.touch()
        os._exit(1)
    return hessian(model, calib, graph, choices, shard=shard, **settings)


@pytest.fixture(scope="module")
def cluster():
    """A head and two nodes with one fake GPU each; the second is labelled an H100."""
    constants = ray._private.ray_constants
    enabled, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False  # what the variable sets at import
    with env_vars(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 2**20,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
        nodes = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20),
                 c.add_node(num_cpus=1, num_gpus=1, object_store_memory=100 * 2**20,
                            resources={"accelerator_type:H100": 1})]
        ray.init(address=c.address, runtime_env={"env_vars": {
            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}})
        yield c, [n.node_id for n in nodes]
        ray.shutdown()
        c.shutdown()
    constants.ENABLE_RAY_CLUSTER = enabled


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    save_model_and_calib(root, batch_size=1)
    with one_torch_thread():
        yield root


@pytest.fixture(scope="module")
def reference(files):
    return reference_plan(files)


def job(files, name, **changes) -> JobSpec:
    spec = JOB | {"out": f"out_{name}", "store": f"store_{name}",
                  "ray": {"workers": 2, "gpus_per_worker": 1, "max_retries": 2, "placement_timeout_s": 5}}
    return JobSpec.from_dict(spec | changes, base_dir=files)


def status(spec: JobSpec) -> dict:
    return json.loads((Path(spec.out) / "status.json").read_text())


def same_plan(plan, reference) -> None:
    assert [l.choice for l in plan.layers] == [l.choice for l in reference.layers]
    assert plan.predicted == pytest.approx(reference.predicted, rel=1e-12)


def test_two_gpu_workers_give_the_in_process_plan(cluster, files, reference):
    _, gpu_nodes = cluster
    spec = job(files, "two")
    model, calib = load_inputs(spec)
    graph = build_layer_graph(model, calib[0])
    request = ProfileRequest(model_hash(model), calib.hash(), "hessian", ("w2", "w4", "w8"), tuple(graph.names), FAST)
    shards = plan_shards(spec, graph, len(calib))
    assert shards == [{"batches": [0]}, {"batches": [1]}, {"batches": [2]}]
    results = list(profile_on_ray(spec, request, shards))
    assert all(r["computed"] for r in results)
    assert {r["node"] for r in results} == set(gpu_nodes)  # one worker (one model copy) per GPU node

    plan = run_job(spec)  # every shard is in the store now: nothing is scheduled again
    assert status(spec)["shards_reused"] == 3 and status(spec)["shards_computed"] == 0
    same_plan(plan, reference)


def test_a_worker_that_dies_costs_only_its_shard(cluster, files, reference, tmp_path):
    spec = job(files, "crash", profiler="hessian_crash_once", imports=["test_ray"],
               profiler_settings=FAST | {"crash_dir": str(tmp_path), "crash_batch": 1})
    plan = run_job(spec)
    same_plan(plan, reference)
    runs = [json.loads(line)["batches"][0] for line in (tmp_path / "runs.log").read_text().splitlines()]
    assert sorted(runs) == [0, 1, 1, 2]  # batch 1 died once and ran again; the others ran once
    assert (tmp_path / "crashed").exists() and status(spec)["shards_computed"] == 3


def test_more_gpus_than_the_cluster_has_is_a_clear_error(cluster, files):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"asks for 3 workers x 1 GPUs = 3 GPUs; the cluster has 2"):
        run_job(job(files, "three", ray={"workers": 3, "gpus_per_worker": 1}))
    with pytest.raises(RuntimeError, match=r"could not place 1 workers of \{'CPU': 1.0, 'GPU': 2\} within 2 s"):
        run_job(job(files, "wide", ray={"workers": 1, "gpus_per_worker": 2, "placement_timeout_s": 2}))
    assert time.monotonic() - start < 30


def test_latency_is_measured_on_the_gpu_type_the_job_names(cluster, files):
    """The job's latency table, with its model's unquantized rest, comes from the node with the GPU type the job
    names; the latency budget then bounds the whole model (rest + layers)."""
    _, (_, h100_node) = cluster
    spec = job(files, "two")
    model, calib = load_inputs(spec)
    graph = build_layer_graph(model, calib[0])
    table, node = measure_latency(graph, ["w2", "w4", "w8"], tokens=1, accelerator="H100",
                                  cache_dir=str(files / "store_two" / "latency"), spec=spec)
    assert node == h100_node  # the only node with the accelerator_type:H100 label
    rest = table.rest_ms(model_key(model, graph.names), 1)
    ms = [[table.layer_ms((l.out_features, l.in_features), c, 1, l.kind) for c in ("w2", "w4", "w8")] for l in graph.layers]
    budget = rest + (sum(map(min, ms)) + sum(map(max, ms))) / 2

    spec = job(files, "two", budget={"latency_ms": budget}, latency={"accelerator": "H100", "tokens": 1})
    plan = run_job(spec)  # the profile is reused from the store, the table (and rest) from the H100 node's cache
    assert plan.solver["latency_table"] == table.device and plan.solver["latency_scope"] == "whole model"
    chosen = sum(row[("w2", "w4", "w8").index(l.choice)] for row, l in zip(ms, plan.layers))
    assert sum(map(min, ms)) <= chosen <= budget - rest
    assert plan.predicted["latency_ms"] == pytest.approx(rest + chosen)
    with pytest.raises(InfeasibleError, match="below the model's unquantized rest alone"):
        run_job(job(files, "two", budget={"latency_ms": rest / 2}, latency={"accelerator": "H100", "tokens": 1}))
