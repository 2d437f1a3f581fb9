"""Submit allocation jobs to a Ray cluster through the Ray Jobs API and follow them.

    handle = submit("job.yaml", address="http://127.0.0.1:8265")
    handle.status()      # {"status": "RUNNING", "progress": {"stage": "profile", "shards_done": 2, ...}}
    plan = handle.result()

The spec is validated here, before anything is submitted; its paths (model, calibration, out, store) are
made absolute and must be valid on the cluster (the same machine or a shared filesystem). The job runs
``python -m allocator.cli run job.json`` on the cluster, with job.json shipped as its working_dir.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kernels.fileio import atomic_write_json

from .jobs import JobSpec
from .plan import Plan

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROGRESS_PREFIX = "bitalloc progress: "
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # a cluster that just started can answer before its job agent is up ("try again later")


def client(address: str | None = None, timeout_s: float = 5.0):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (default: $RAY_ADDRESS, else
    http://127.0.0.1:8265); an unreachable address is a ConnectionError naming it, within ``timeout_s``."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    url = urlparse(address if "://" in address else f"http://{address}")
    try:
        socket.create_connection((url.hostname, url.port or 8265), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {e}") from None
    return JobSubmissionClient(url.geturl())


def default_runtime_env() -> dict[str, Any]:
    """Without an installed bitalloc, put this checkout on the job's PYTHONPATH (same machine or shared fs)."""
    try:
        metadata.distribution("bitalloc")
        return {}
    except metadata.PackageNotFoundError:
        return {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}}


class JobHandle:
    """A submitted job: ``status()``, ``wait()``, ``result()`` (the Plan), ``logs()``, ``stop()``."""

    def __init__(self, job_id: str, address: str | None = None, out: str | None = None) -> None:
        self.job_id, self.address, self.out = job_id, address, out
        self._client = client(address)

    def logs(self) -> str:
        return self._client.get_job_logs(self.job_id)

    def status(self) -> dict[str, Any]:
        """The Ray job status and the job's latest progress line (stage, shards done of total, ETA)."""
        info = self._client.get_job_info(self.job_id)
        return {"job_id": self.job_id, "status": str(info.status.value), "message": info.message,
                "progress": latest_progress(self.logs())}

    def wait(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
        """Block until the job ends; returns "SUCCEEDED", raises RuntimeError (with the log's tail) otherwise."""
        deadline = time.monotonic() + timeout_s
        while (status := str(self._client.get_job_status(self.job_id).value)) not in FINAL:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status} after {timeout_s:g} s")
            time.sleep(poll_s)
        if status != "SUCCEEDED":
            tail = "\n".join(self.logs().strip().splitlines()[-15:])
            raise RuntimeError(f"job {self.job_id} {status}:\n{tail}")
        return status

    def result(self, timeout_s: float = 600.0) -> Plan:
        """Wait for the job and load its plan (from the job's ``out`` directory)."""
        self.wait(timeout_s)
        done = latest_progress(self.logs())
        path = done.get("plan") or (self.out and str(Path(self.out) / "plan.json"))
        if not path:
            raise RuntimeError(f"job {self.job_id} logged no plan path")
        return Plan.load(path)

    def stop(self) -> bool:
        return self._client.stop_job(self.job_id)


def latest_progress(logs: str) -> dict[str, Any]:
    """The last progress record a job logged ({} before the first)."""
    for line in reversed(logs.splitlines()):
        if PROGRESS_PREFIX in line:
            return json.loads(line.split(PROGRESS_PREFIX, 1)[1])
    return {}


def submit(spec: JobSpec | str | os.PathLike | dict, address: str | None = None,
           runtime_env: dict[str, Any] | None = None) -> JobHandle:
    """Validate ``spec`` here, then submit it as a Ray job; returns its handle."""
    if not isinstance(spec, JobSpec):
        spec = JobSpec.from_dict(spec) if isinstance(spec, dict) else JobSpec.load(spec)
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="bitalloc-job-") as tmp:
        atomic_write_json(Path(tmp) / "job.json", spec.to_dict())
        env = dict(default_runtime_env() if runtime_env is None else runtime_env)
        env["working_dir"] = tmp
        job_id = submit_job(jobs, entrypoint="python -m allocator.cli -v run job.json", runtime_env=env)
    return JobHandle(job_id, address, spec.out)


def submit_job(jobs, wait_s: float = AGENT_WAIT_S, **kwargs: Any) -> str:
    """``jobs.submit_job(**kwargs)``, retried for up to ``wait_s`` while the cluster says it has no job agent
    yet (Ray's "No available agent to submit job, please try again later"); other errors are raised at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return jobs.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
