"""Entrypoints: submitted to a real `ray start --head` with token auth, and run directly.

A job submitted from the command line to a head that `shoprank cluster up` started on a
fresh HOME, and a client without the token refused, are `test_fresh_home.py`'s test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient

from shoprank import cluster as local_cluster
from shoprank.cluster import LocalCluster, head_env, wait_for_dashboard
from shoprank.entrypoint import free_port

REPO = Path(__file__).resolve().parents[1]


def _kill_cluster(process: subprocess.Popen[bytes], temp_dir: str) -> None:
    """Stop the head and every Ray process of this cluster (found by its temp dir), nothing else."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        if not left:
            return
        for p in left:
            try:
                p.kill() if time.monotonic() > deadline - 10 else p.terminate()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalCluster]:
    """A real `ray start --head` on loopback with token authentication, for the job SDK's
    submissions, stopped after them."""
    temp_dir = tempfile.mkdtemp(prefix="srh-", dir="/tmp")
    cluster = LocalCluster(free_port(), free_port(), num_cpus=2, temp_dir=temp_dir, client_port=free_port())
    command = cluster.start_command(block=True) + [
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    local_cluster.ensure_token()  # as `cluster up` does: `ray start` never creates it
    process = subprocess.Popen(
        command, env=head_env(cluster), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_dashboard(cluster, timeout_s=120)
        yield cluster
    finally:
        _kill_cluster(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's session logs: CI's disk is shared by every run


@ray.remote(num_cpus=0)
class _EnvReader:
    def ray_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS")

    def ray_address_of_a_detached_child(self) -> str | None:
        child = _EnvReader.options(lifetime="detached").remote()
        try:
            return ray.get(child.ray_address.remote())
        finally:
            ray.kill(child)


def test_a_local_cluster_tells_every_worker_its_address(ray_local: None) -> None:
    """What Ray Train's placement-group cleaner needs to find its own cluster: ``RAY_ADDRESS`` in a
    detached actor started by an actor with environment variables of its own (the Train controller)."""
    reader = _EnvReader.options(runtime_env={"env_vars": {"SHOPRANK_PROBE": "1"}}).remote()
    own = ray.get_runtime_context().gcs_address
    assert ray.get(reader.ray_address.remote()) == own
    assert ray.get(reader.ray_address_of_a_detached_child.remote()) == own
    ray.kill(reader)


def test_a_bad_config_is_one_clear_line_without_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "jobs/preprocess.py", "--config", "tiny", "--set", "source.synthetic.seeed=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "source.synthetic.seeed: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def _wait_for(client: JobSubmissionClient, job_id: str, states: set[JobStatus], timeout_s: float) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while status not in states and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    return status


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_pipeline_job_killed_after_the_encoder_continues_where_it_stopped(
    ray_head: LocalCluster, tmp_path: Path, tiny_encoder_dir: Path
) -> None:
    client = JobSubmissionClient(ray_head.dashboard_url)
    entrypoint = (f"python jobs/pipeline.py --config tiny --set run.root={tmp_path} "
                  f"--set encoder.model={tiny_encoder_dir}")
    stage_log = tmp_path / "tiny" / "stage_log.json"

    def entries() -> list[dict]:
        return json.loads(stage_log.read_text())["entries"] if stage_log.exists() else []

    first = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    deadline = time.monotonic() + 600
    while not any(e["stage"] == "encoder" and e["status"] == "done" for e in entries()):
        assert time.monotonic() < deadline, client.get_job_logs(first)[-3000:]
        assert client.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}, client.get_job_logs(first)[-3000:]
        time.sleep(0.5)
    client.stop_job(first)
    assert _wait_for(client, first, {JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED}, 120) == JobStatus.STOPPED
    before = len(entries())
    assert not any(e["stage"] == "register" for e in entries())

    second = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
    assert _wait_for(client, second, {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}, 900) == \
        JobStatus.SUCCEEDED, client.get_job_logs(second)[-3000:]
    rerun = {e["stage"]: e["status"] for e in entries()[before:] if e["status"] != "started"}
    assert rerun["ingest"] == rerun["preprocess"] == rerun["encoder"] == "skipped"
    assert rerun["features"] == rerun["ranker"] == rerun["evaluate"] == rerun["register"] == "done"
    logs = client.get_job_logs(second)
    assert "| encoder | skipped |" in logs and "evaluation table:" in logs
    registry = json.loads((tmp_path / "registry.json").read_text())["aliases"]
    assert registry["B"]["run"].endswith("/tiny") and registry["A"]["strategy"] == "retrieval"
