"""The Jobs API path end to end: a Ray head with its dashboard on loopback (started and stopped by the
fixture), `bitalloc submit job.yaml --address ...`, then status, logs, stop and the plan."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from tiny import FAST, JOB, env_vars, one_torch_thread, reference_plan, save_model_and_calib

from allocator import Plan, submit
from allocator.cli import main
from profilers import register_profiler
from profilers.hessian import combine, hessian

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
# A head node (ray.cluster_utils.Cluster, not ray.init: only it takes the job agent's port, which must be free;
# an agent of an earlier test's cluster still shutting down can hold Ray's default 52365)
HEAD = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=int(sys.argv[1]), dashboard_agent_listen_port=int(sys.argv[2]), node_ip_address="127.0.0.1"))
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    cluster.shutdown()
""")


@register_profiler("hessian_gated", combine=combine)
def hessian_gated(model, calib, graph, choices, shard=None, gate="", gated_batch=2, **settings):
    """The Hessian profiler, except that the shard of ``gated_batch`` waits until the file ``gate`` exists."""
    deadline = time.monotonic() + 120
    while shard == {"batches": [gated_batch]} and not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return hessian(model, calib, graph, choices, shard=shard, **settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster with the dashboard (Jobs API) on 127.0.0.1; shut down by closing its stdin."""
    port = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HEAD, str(port), str(free_port())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the Ray head did not start its dashboard at {address}")
            time.sleep(0.5)
    with env_vars(RAY_AUTH_MODE="disabled"):
        yield address
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    save_model_and_calib(root, batch_size=1)
    (root / "job.yaml").write_text(yaml.safe_dump(JOB | {"out": "out", "ray": {"workers": 2}}))
    return root


@pytest.fixture(scope="module")
def reference(files):
    """The plan of the plain in-process API on the same model, data and settings."""
    with one_torch_thread():
        yield reference_plan(files)


def test_submitting_waits_for_a_starting_clusters_job_agent():
    """Right after a cluster starts, Ray can refuse a job for want of an agent ("try again later"): the
    submission retries that, and only that."""
    from allocator.submit import submit_job

    class Jobs:
        def __init__(self, failures, error):
            self.calls, self.failures, self.error = 0, failures, error

        def submit_job(self, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(self.error)
            return f"job-{kwargs['entrypoint']}"

    busy = "Request failed with status code 500: No available agent to submit job, please try again later.."
    jobs = Jobs(2, busy)
    assert submit_job(jobs, wait_s=10, entrypoint="x") == "job-x" and jobs.calls == 3
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_job(Jobs(99, busy), wait_s=0, entrypoint="x")
    other = Jobs(1, "Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit_job(other, wait_s=10, entrypoint="x")
    assert other.calls == 1


def test_an_unreachable_address_is_a_clear_error_within_seconds(files):
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach the Ray dashboard at http://127.0.0.1:9"):
        submit(files / "job.yaml", address="http://127.0.0.1:9")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_submit_a_job_and_follow_it(head, files, reference, capsys):
    assert main(["submit", str(files / "job.yaml"), "--address", head, "--wait"]) == 0
    job_id = capsys.readouterr().out.split("submitted job ", 1)[1].split()[0]
    plan = Plan.load(files / "out" / "plan.json")
    assert [l.choice for l in plan.layers] == [l.choice for l in reference.layers]
    assert json.loads((files / "out" / "status.json").read_text())["shards_computed"] == 3

    assert main(["status", job_id, "--address", head]) == 0
    assert capsys.readouterr().out.strip() == f"{job_id}: SUCCEEDED, stage done, shards 3/3 (0 reused), batches 3/3, 8 layers, ETA 0 s"
    assert main(["logs", job_id, "--address", head]) == 0
    assert '"stage": "profile", "shards_done": 2' in capsys.readouterr().out


@pytest.mark.slow
def test_a_job_asking_for_more_gpus_than_the_cluster_has_fails_clearly(head, files):
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {"ray": {"workers": 2, "gpus_per_worker": 1}, "out": "out_gpu"}
    handle = submit(spec | {"model": str(files / "model"), "calib": str(files / "calib.pt"),
                            "out": str(files / "out_gpu")}, address=head)
    with pytest.raises(RuntimeError, match=r"FAILED[\s\S]*asks for 2 workers x 1 GPUs = 2 GPUs; the cluster has 0"):
        handle.wait(timeout_s=120)


@pytest.mark.slow
def test_a_stopped_job_resumes_from_the_store(head, files, reference):
    """Stop a job while one shard is still running, submit it again: only that shard is computed."""
    gate = files / "gate"
    spec = yaml.safe_load((files / "job.yaml").read_text()) | {
        "model": str(files / "model"), "calib": str(files / "calib.pt"), "out": str(files / "out_stop"),
        "store": str(files / "store_stop"), "profiler": "hessian_gated", "imports": ["test_ray_jobs"],
        "profiler_settings": FAST | {"gate": str(gate)}}
    env = {"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}}
    handle = submit(spec, address=head, runtime_env=env)
    deadline = time.monotonic() + 120
    while len(list((files / "store_stop").glob("hessian_gated-*.json"))) < 2:
        assert time.monotonic() < deadline, handle.logs()
        time.sleep(0.5)
    assert handle.stop() is True
    with pytest.raises(RuntimeError, match=f"job {handle.job_id} STOPPED"):
        handle.wait(timeout_s=60)

    gate.touch()
    plan = submit(spec, address=head, runtime_env=env).result(timeout_s=120)
    done = json.loads((files / "out_stop" / "status.json").read_text())
    assert (done["shards_computed"], done["shards_reused"]) == (1, 2)
    assert [l.choice for l in plan.layers] == [l.choice for l in reference.layers]
    assert plan.predicted == pytest.approx(reference.predicted, rel=1e-12)
