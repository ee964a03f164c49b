"""A local Ray head for ``ray job submit``: token authentication on, the job API on loopback.

``shoprank cluster up`` (``make cluster-up``) starts ``ray start --head`` with
``RAY_AUTH_MODE=token``. Ray's ``ray start`` refuses to start without a token and does
not create one (only ``ray.init`` does), so ``cluster up`` first creates it with Ray's
own generator (``ray get-auth-token --generate``) in ``~/.ray/auth_token``, mode 0600.
Clients (``ray job submit``, the job SDK) need ``RAY_AUTH_MODE=token`` in their
environment to send it. ``shoprank cluster down`` stops every process of that head and
no other Ray instance of the machine.

Every listener of a local head is on 127.0.0.1: the dashboard (the job API) by
``--dashboard-host``, and the GCS, the raylet, the agents and the Ray Client server by
Ray's single-node switch (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, :func:`on_loopback`).
Without it Ray on Linux replaces a loopback ``--node-ip-address`` with the machine's
network address and they listen on every interface (the GCS and raylet on ``::``).
One listener is not Ray core's: each Serve replica's replica-to-replica gRPC server, which Ray Serve binds to
``[::]:0`` whatever the node's address (it checks Ray's token, yet listens on every interface). The app's replicas
call :func:`replica_grpc_on_loopback` first thing in ``__init__``, which binds it to 127.0.0.1 under the switch.
The head's environment carries the switch, so every process it starts (workers, job
drivers, Serve replicas) agrees on the node's address; a driver that joins it through
the GCS (``shoprank serve``) turns it on for itself (:func:`on_loopback`), or it would
look for the GCS on the machine's address and hang. A multi-node cluster
(``cluster.yaml``) is started by Ray's launcher, without it.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from ray._common.utils import get_default_ray_temp_dir, get_ray_address_file
from ray._private import ray_constants

from shoprank.errors import ShopRankError
from shoprank.haproxy import ingress_env

HOST = "127.0.0.1"
# Set in the head's environment; every process the head starts (Ray's daemons, workers,
# job supervisors and drivers, Serve replicas) inherits it, whatever its command line says.
HEAD_MARKER = "SHOPRANK_RAY_HEAD"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
SINGLE_NODE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


LISTEN_PORTS = range(20_000, 32_768)
"""Where :func:`free_port` looks: above Ray's worker ports (``min_worker_port``..``max_worker_port``, 10002-19999 by
default) and below Linux's ephemeral range (32768-60999), from which every outgoing connection and every
``bind(0)`` of Ray's processes takes its port. A port from that range can be taken by such a process between the
probe and the listener's bind (a Serve proxy then fails with "Failed to bind to address")."""


def free_port() -> int:
    """A TCP port free on this machine now, chosen at random among :data:`LISTEN_PORTS` (see there)."""
    for port in random.sample(LISTEN_PORTS, 200):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # a machine that holds 200 of them: the kernel's choice
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def on_loopback() -> Iterator[None]:
    """While a driver starts or joins a one-machine cluster: Ray's single-node mode, in which the node's address is
    127.0.0.1 and every Ray daemon started now listens there only.

    The variable reaches the processes started inside (a local cluster's GCS, raylet and so its workers); Ray read
    it into ``ray_constants`` when first imported, so the constant is set too, for this process's own address
    lookups while it connects. Both are restored after: a later join of a multi-node cluster works as before.
    """
    before_env, before_constant = os.environ.get(SINGLE_NODE_VARIABLE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_VARIABLE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_constant
        if before_env is None:
            os.environ.pop(SINGLE_NODE_VARIABLE, None)
        else:
            os.environ[SINGLE_NODE_VARIABLE] = before_env


def replica_grpc_on_loopback() -> None:
    """Called first in each of the app's Serve deployments' ``__init__``: under Ray's single-node switch, which the
    replica's worker inherits from its raylet, the replica's gRPC server for calls between deployments listens on
    127.0.0.1, the node's address there, where the proxy and the other replicas call it (node address and port).

    Ray Serve binds that server to ``[::]:0`` in ``Replica._on_initialized``, which runs after the deployment's
    ``__init__``, through the module's ``add_port_to_grpc_server``, looked up when called, so wrapping that name
    first reaches it. (A runtime_env ``worker_process_setup_hook`` would be the natural place, but Ray honours it
    only in a job's runtime_env, not a replica's.) If a later Ray renames
    it, nothing is wrapped and the listener test (``tests/test_fresh_home.py``) names the replica listening on
    ``::``. On a multi-node cluster (no switch) nothing changes.
    """
    if os.environ.get(SINGLE_NODE_VARIABLE) != "0":
        return
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        return

    def bind_on_loopback(server: Any, address: str) -> int:
        return bind(server, f"{HOST}:0" if address == "[::]:0" else address)

    replica.add_port_to_grpc_server = bind_on_loopback


def is_loopback_address(address: str | None) -> bool:
    """True if a Ray address (``host:port``, or ``auto``: this machine's running head) names a loopback GCS."""
    if address in (None, "", "auto"):
        address_file = Path(get_ray_address_file(None))
        address = address_file.read_text().strip() if address_file.exists() else ""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


@dataclass(frozen=True)
class LocalCluster:
    """Where a local head listens, and where it keeps its sessions and logs."""

    gcs_port: int = 6379
    dashboard_port: int = 8265
    num_cpus: int = 2
    temp_dir: str | None = None
    client_port: int = 10001
    loopback_only: bool = True
    """Ray's single-node mode, every listener on 127.0.0.1 (:func:`on_loopback`); off for a head that other nodes
    join (the tests' fake multi-node cluster)."""

    @property
    def address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def metrics_discovery_file(self) -> Path:
        """Where the head's dashboard lists every node's metrics export port for Prometheus (Ray's service
        discovery file, rewritten every 5 s; monitoring/prometheus.yml reads the default temp dir's)."""
        return Path(self.temp_dir or get_default_ray_temp_dir()).absolute() / "prom_metrics_service_discovery.json"

    def start_command(self, *, block: bool = False) -> list[str]:
        """``ray start --head`` for this head.

        ``ray start`` always starts a Ray Client server (it cannot be turned off; port 0
        is refused), so its port is explicit, not Ray's fixed 10001 that a second head
        would collide on. The dashboard agent's HTTP port is 0 (chosen when it starts):
        on Ray's fixed 52365 it fails to bind while another Ray instance of the machine
        (a test suite's ``ray.init``) holds it, and the head then refuses every job
        (``No available agent to submit job``).
        """
        command = [
            ray_executable(), "start", "--head",
            f"--node-ip-address={HOST}", f"--port={self.gcs_port}",
            f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", "--dashboard-agent-listen-port=0",
            f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
        ]
        if self.temp_dir:
            command.append(f"--temp-dir={os.path.abspath(self.temp_dir)}")  # its sockets must not depend on the cwd
        if block:
            command.append("--block")
        return command


def ray_executable() -> str:
    """The ``ray`` CLI of this interpreter's environment (the project's venv)."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def token_path() -> Path:
    """The token file Ray reads: ``RAY_AUTH_TOKEN_PATH`` if set, else ``~/.ray/auth_token``.

    Computed at call time, from the current ``HOME``, as Ray's loader does.
    """
    configured = os.environ.get(TOKEN_PATH_VARIABLE)
    return Path(configured) if configured else Path.home() / ".ray" / "auth_token"


def token_location() -> str:
    """Where Ray finds the token: the ``RAY_AUTH_TOKEN`` variable, else :func:`token_path`."""
    return f"the {TOKEN_VARIABLE} environment variable" if os.environ.get(TOKEN_VARIABLE) else str(token_path())


def ensure_token() -> bool:
    """Make sure ``ray start`` finds a token, creating one if missing; True if it was created.

    ``ray start`` with ``RAY_AUTH_MODE=token`` fails without a token and never creates
    one (only ``ray.init`` does), so on a fresh machine (no ``~/.ray``) the head could not
    start. The token is made by Ray's own generator (``ray get-auth-token --generate``,
    which writes ``~/.ray/auth_token``) under umask 077, so it is never readable by
    others, not even for a moment; an existing token file is tightened to 0600 (the
    token grants code execution on the cluster).
    """
    if os.environ.get(TOKEN_VARIABLE):
        return False
    path = token_path()
    created = not path.exists()
    if created and TOKEN_PATH_VARIABLE in os.environ:
        raise ShopRankError(
            f"{TOKEN_PATH_VARIABLE} names {path}, which does not exist: put the cluster's token there, "
            f"or unset {TOKEN_PATH_VARIABLE} to have one created in ~/.ray/auth_token"
        )
    if created:
        result = subprocess.run(
            [ray_executable(), "get-auth-token", "--generate"], capture_output=True, text=True, umask=0o077
        )
        if result.returncode != 0 or not path.exists():
            raise ShopRankError(f"`ray get-auth-token --generate` did not create {path}:\n{result.stderr}")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    return created


def token_env() -> dict[str, str]:
    """The environment a client needs to talk to a token-authenticated cluster."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def head_env(cluster: LocalCluster) -> dict[str, str]:
    """The head's environment: token auth on, this venv first on PATH, and the head's marker.

    Job entrypoints (``python jobs/...``) inherit the head's environment, so
    ``python`` there is the interpreter that has shoprank and Ray installed. The
    marker (:data:`HEAD_MARKER`) is how :func:`head_processes` finds every process
    of this head.
    """
    env = token_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env[HEAD_MARKER] = cluster.address
    if cluster.loopback_only:
        env[SINGLE_NODE_VARIABLE] = "0"  # every listener on loopback (see the module docstring)
    env.update(ingress_env(loopback=cluster.loopback_only, free_port=free_port))  # SHOPRANK_INGRESS: Serve's front
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
    """Start the head (idempotent: an answering dashboard means it already runs), creating
    the auth token first if there is none."""
    if dashboard_ready(cluster):
        print(f"Ray head already running at {cluster.address}")
        return
    if ensure_token():
        print(f"Created the Ray auth token: {token_path()} (mode 0600)")
    result = subprocess.run(cluster.start_command(), env=head_env(cluster), capture_output=True, text=True)
    if result.returncode != 0:
        raise ShopRankError(f"`ray start --head` failed:\n{result.stdout}\n{result.stderr}")
    wait_for_dashboard(cluster)


def head_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """Every process of the head on ``cluster.gcs_port``, and their children.

    A process belongs to the head when its environment carries the head's marker
    (every process that ``cluster up`` started, and everything those started), or when
    its command line names the session of the GCS on that port (a head started
    without the marker, by hand or by an earlier shoprank). The session name alone
    misses processes: ``ray start`` exits once the head is up, so its daemons are
    children of init, not of the GCS, and the Ray Client server's command line names
    only the GCS address (``python -m ray.util.client.server --address=... --port=10001``).
    Children are added because a process that retitles itself (``ray::DashboardAgent``)
    can overwrite what ``/proc`` shows of its environment; its parent still shows it.
    """
    session = None
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if f"--gcs_server_port={cluster.gcs_port}" in args:
            session = next((a.split("=", 1)[1] for a in args if a.startswith("--session-name=")), None)
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            named = session is not None and session in " ".join(process.info["cmdline"] or [])
            if named or process.environ().get(HEAD_MARKER) == cluster.address:
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
        except psutil.Error:  # gone meanwhile, or another user's (not ours to stop)
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_order(process: psutil.Process) -> int:
    """When ``process`` is stopped: the raylet first, Ray's other daemons and the workers next, the GCS last.

    Ray's own ``ray stop`` order. Sent SIGTERM while the others still run, this Ray's GCS hangs in its shutdown
    (flushing its event recorder) until it is killed, so a head stopped all at once took the whole grace period;
    stopped last, it exits in about 2 s (the whole head in about 6 s instead of 22)."""
    try:
        name = process.name()
    except psutil.Error:
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def stop(cluster: LocalCluster, timeout_s: float = 20.0) -> int:
    """Stop this head and its workers, and no other Ray instance (unlike ``ray stop``, which
    stops every Ray process on the machine); how many processes were stopped.

    In ``ray stop``'s order (:func:`_stop_order`): each group gets SIGTERM and a third of ``timeout_s`` to exit,
    then SIGKILL, before the next group's turn."""
    processes = head_processes(cluster)
    groups: list[list[psutil.Process]] = [[], [], []]
    for process in processes:
        groups[_stop_order(process)].append(process)
    for group in groups:
        for process in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(group, timeout=timeout_s / len(groups))
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
    address_file = Path(get_ray_address_file(cluster.temp_dir))
    if address_file.exists() and address_file.read_text().strip().endswith(f":{cluster.gcs_port}"):
        address_file.unlink()  # so nothing tries to join the stopped head
    return len(processes)


def how_to_reach(cluster: LocalCluster) -> str:
    """What a user needs to submit jobs to the head."""
    return "\n".join(
        [
            f"Ray head:       {cluster.address} (GCS)",
            f"Dashboard/jobs: {cluster.dashboard_url} (loopback only)",
            f"Auth token:     {token_location()} (token authentication is on)",
            f"Metrics:        {cluster.metrics_discovery_file} (Prometheus service discovery; docs/monitoring.md)",
            "Submit a job:",
            "  export RAY_AUTH_MODE=token",
            f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- \\",
            "      python jobs/preprocess.py --config demo --set run.root=$PWD/runs",
        ]
    )
