"""A local Ray head for ``ray job submit``: loopback only, token authentication on.

``shoprank cluster up`` (``make cluster-up``) starts ``ray start --head`` bound to
127.0.0.1 with ``RAY_AUTH_MODE=token``; Ray writes the token to
``~/.ray/auth_token`` on first start. Clients (``ray job submit``, the job SDK)
need ``RAY_AUTH_MODE=token`` in their environment to send it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from ray._common.utils import get_ray_address_file

from shoprank.errors import ShopRankError

HOST = "127.0.0.1"
TOKEN_PATH = Path.home() / ".ray" / "auth_token"


@dataclass(frozen=True)
class LocalCluster:
    """Where a local head listens."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    num_cpus: int = 2
    temp_dir: str | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def start_command(self, *, block: bool = False) -> list[str]:
        command = [
            ray_executable(), "start", "--head",
            f"--node-ip-address={HOST}", f"--port={self.gcs_port}",
            f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
        ]
        if self.temp_dir:
            command.append(f"--temp-dir={self.temp_dir}")
        if block:
            command.append("--block")
        return command


def ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (the project's venv)."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def token_env() -> dict[str, str]:
    """The environment a client needs to talk to a token-authenticated cluster."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def head_env() -> dict[str, str]:
    """The head's environment: token auth on, and this venv first on PATH.

    Job entrypoints (``python jobs/...``) inherit the head's environment, so
    ``python`` there is the interpreter that has shoprank and Ray installed.
    """
    env = token_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dashboard_ready(cluster: LocalCluster) -> bool:
    """True once the job API answers (any HTTP answer counts, 401 included)."""
    try:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def wait_for_dashboard(cluster: LocalCluster, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dashboard_ready(cluster):
            return
        time.sleep(0.5)
    raise ShopRankError(f"the Ray dashboard at {cluster.dashboard_url} did not answer within {timeout_s:.0f}s")


def start(cluster: LocalCluster) -> None:
    """Start the head (idempotent: an answering dashboard means it already runs)."""
    if dashboard_ready(cluster):
        print(f"Ray head already running at {cluster.address}")
        return
    result = subprocess.run(cluster.start_command(), env=head_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise ShopRankError(f"`ray start --head` failed:\n{result.stdout}\n{result.stderr}")
    wait_for_dashboard(cluster)
    if TOKEN_PATH.exists():
        TOKEN_PATH.chmod(0o600)  # the token grants code execution on the cluster


def head_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """The processes of the head on ``cluster.gcs_port``: every one that names its session
    (found from its GCS server's arguments), and their children (workers, agents, replicas)."""
    session = None
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if f"--gcs_server_port={cluster.gcs_port}" in args:
            session = next((a.split("=", 1)[1] for a in args if a.startswith("--session-name=")), None)
    if session is None:
        return []
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if session in " ".join(process.info["cmdline"] or []):
            try:
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop(cluster: LocalCluster, timeout_s: float = 20.0) -> int:
    """Stop this head and its workers, and no other Ray instance (unlike ``ray stop``, which
    stops every Ray process on the machine); how many processes were stopped."""
    processes = head_processes(cluster)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    address_file = Path(get_ray_address_file(None))
    if address_file.exists() and address_file.read_text().strip().endswith(f":{cluster.gcs_port}"):
        address_file.unlink()  # so nothing tries to join the stopped head
    return len(processes)


def how_to_reach(cluster: LocalCluster) -> str:
    return "\n".join(
        [
            f"Ray head:       {cluster.address} (GCS)",
            f"Dashboard/jobs: {cluster.dashboard_url} (loopback only)",
            f"Auth token:     {TOKEN_PATH} (token authentication is on)",
            "Submit a job:",
            "  export RAY_AUTH_MODE=token",
            f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- \\",
            "      python jobs/preprocess.py --config demo --set run.root=$PWD/runs",
        ]
    )
