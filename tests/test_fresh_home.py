"""The front door on a fresh machine: the real `shoprank cluster up` with an empty HOME (no
``~/.ray``), the preprocessing job submitted with `ray job submit` as `make demo` submits its
job (the CLI is a client of Ray's job SDK), then `shoprank cluster down`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray
import requests

from conftest import App
from shoprank.entrypoint import free_port
from shoprank.haproxy import chosen_ingress

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _processes_of(home: Path, temp_dir: str) -> list[psutil.Process]:
    """The processes of a head started with ``HOME=home`` and ``--temp-dir=temp_dir``, and their
    children, found without shoprank's own lookup: the head inherits the test's HOME (the Ray
    Client server too, whose command line names neither the temp dir nor the session)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline", "environ"]):
        environ = process.info["environ"] or {}
        if environ.get("HOME") == str(home) or temp_dir in " ".join(process.info["cmdline"] or []):
            try:
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
    found.pop(os.getpid(), None)
    return list(found.values())


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _listeners(processes: list[psutil.Process]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket ``processes`` listen on."""
    found = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            found |= {(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}
    return found


def test_every_listener_of_a_local_cluster_is_on_loopback(app: App) -> None:
    """The session's cluster, started like every entrypoint's local cluster (``local_ray_options``), with the app
    deployed: its GCS, raylet, dashboard, agents and workers, Serve's proxy and every replica (whose
    replica-to-replica gRPC server Ray Serve binds to ``::``, see ``shoprank.cluster``), and this driver, listen on
    127.0.0.1 only."""
    node = ray._private.worker._global_node
    daemons = [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos]
    processes = [psutil.Process(), *daemons, *(c for d in daemons for c in d.children(recursive=True))]
    listening = _listeners(processes)
    names = {name for _, _, name in listening}
    front = "haproxy" if chosen_ingress() == "haproxy" else "ray::ProxyActor"  # SHOPRANK_INGRESS (shoprank.haproxy)
    assert names >= {"gcs_server", "raylet", front}, listening
    assert {f"ray::ServeReplica:{app.name}:{deployment}" for deployment in ("Ingress", "Variant_A", "Variant_B")} <= names
    assert [entry for entry in sorted(listening) if entry[0] not in LOOPBACK] == []


def _port_is_free(port: int) -> bool:
    """True if a server could listen on ``port`` on every interface now (nothing listens there)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


class Head:
    """A head started by the real CLI, with its own HOME, ports and temp dir."""

    def __init__(self, home: Path) -> None:
        self.home = home
        # Short and under /tmp: Ray's socket paths live under the temp dir and must fit 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="srf-", dir="/tmp")
        self.gcs_port, self.dashboard_port, self.client_port = free_port(), free_port(), free_port()
        self.env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
        for inherited in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            self.env.pop(inherited, None)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def cluster(self, action: str) -> subprocess.CompletedProcess[str]:
        """``shoprank cluster <action>`` on this head's ports and temp dir."""
        return subprocess.run(
            [str(BIN / "shoprank"), "cluster", action, "--port", str(self.gcs_port),
             "--dashboard-port", str(self.dashboard_port), "--client-port", str(self.client_port),
             "--temp-dir", self.temp_dir],
            env=self.env, capture_output=True, text=True, timeout=180,
        )


@pytest.fixture
def head(tmp_path: Path) -> Iterator[Head]:
    """A fresh HOME and a head's settings; whatever a failed test leaves of the head is killed."""
    home = tmp_path / "home"
    home.mkdir()
    started = Head(home)
    yield started
    for process in _processes_of(home, started.temp_dir):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    shutil.rmtree(started.temp_dir, ignore_errors=True)


@pytest.mark.timeout(600)
def test_cluster_up_on_a_fresh_home_runs_a_job_and_down_leaves_nothing(
    ray_local: None, head: Head, tmp_path: Path
) -> None:
    up = head.cluster("up")
    assert up.returncode == 0, up.stdout + up.stderr
    token = head.home / ".ray" / "auth_token"
    assert f"Created the Ray auth token: {token} (mode 0600)" in up.stdout
    assert f"Auth token:     {token}" in up.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) == 64  # Ray's generator: 32 random bytes, hex

    jobs_api = f"{head.dashboard_url}/api/jobs/"
    assert requests.get(jobs_api, timeout=10).status_code == 401, "a client without the token is refused"
    bearer = {"Authorization": f"Bearer {token.read_text().strip()}"}
    assert requests.get(jobs_api, headers=bearer, timeout=10).status_code == 200

    runs = tmp_path / "runs"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
         "python", "jobs/preprocess.py", "--config", "tiny", "--set", f"run.root={runs}",
         "--set", "source.synthetic.num_sessions=300"],
        env=head.env, capture_output=True, text=True, timeout=400,
    )
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    assert f"run directory: {runs / 'tiny'}" in job.stdout
    manifest = json.loads((runs / "tiny" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "preprocess"}
    assert manifest["stages"]["preprocess"]["rows"]["query_pairs"] > 0

    before = _processes_of(head.home, head.temp_dir)
    listening = _listeners(before)  # the GCS, the raylet, the dashboard and its agents, the Ray Client server
    assert {head.gcs_port, head.dashboard_port, head.client_port} <= {port for _, port, _ in listening}
    assert [entry for entry in sorted(listening) if entry[0] not in LOOPBACK] == []
    client_server = [p for p in before if "ray.util.client.server" in p.cmdline()]
    assert client_server and f"--port={head.client_port}" in client_server[0].cmdline()
    assert not _port_is_free(head.client_port)

    down = head.cluster("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"Ray head on port {head.gcs_port}: " in down.stdout
    assert [p.pid for p in before if p.is_running()] == [] and _processes_of(head.home, head.temp_dir) == []
    for port in (head.gcs_port, head.dashboard_port, head.client_port):
        assert _port_is_free(port), f"port {port} is still taken after `cluster down`"
    assert ray.get(ray.remote(lambda: 42).remote()) == 42, "the session's own cluster still works"


def test_cluster_up_with_a_missing_token_path_says_what_to_do(head: Head) -> None:
    head.env["RAY_AUTH_TOKEN_PATH"] = str(head.home / "nowhere" / "token")
    up = head.cluster("up")
    assert up.returncode == 2
    assert up.stderr.startswith(f"error: RAY_AUTH_TOKEN_PATH names {head.home / 'nowhere' / 'token'}, which does not")
    assert "Traceback" not in up.stderr and not (head.home / ".ray").exists()
