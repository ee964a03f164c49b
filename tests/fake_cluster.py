"""A multi-node Ray cluster on one machine, scaled by Ray's own autoscaler: its node types from cluster.yaml.

Ray's fake multi-node provider (``fake_multinode``) starts each worker node the autoscaler
launches as a raylet of this machine. ``ray start --head --autoscaling-config=FILE`` with
``RAY_FAKE_CLUSTER=1`` runs it (``AutoscalingCluster`` is not used: it runs ``ray stop
--force``, which would kill every Ray process of the machine, a test session's own cluster
too, and reads a ``fake_multi_node/example.yaml`` that Ray 2.60's wheel lacks). The head is
stopped by its own processes, as ``shoprank cluster down`` stops one.

The node types, their custom and GPU resources and the head's zero CPUs come from
``cluster.yaml``; a laptop cannot offer an ``m6i.4xlarge``'s 16 CPUs per fake node, so each
worker type's CPUs are capped (:data:`CPUS_PER_NODE`) and so is its node count.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from shoprank import cluster as local_cluster
from shoprank.entrypoint import free_port
from shoprank.serving.app import HEAD_NODE_RESOURCE

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
CPUS_PER_NODE = 1
MAX_NODES_PER_TYPE = 2
FAKE_HEAD_TYPE = "ray.head.default"
"""The fake provider names the head's type so; cluster.yaml's head type is mapped to it."""


def node_types(without: tuple[str, ...] = ()) -> dict[str, dict]:
    """cluster.yaml's node types for the fake provider, minus the ``without`` ones."""
    launcher = yaml.safe_load(CLUSTER_YAML.read_text())
    types = {}
    for name, node in launcher["available_node_types"].items():
        if name in without:
            continue
        resources = dict(node.get("resources") or {})
        if name == launcher["head_node_type"]:
            types[FAKE_HEAD_TYPE] = {"resources": resources, "min_workers": 0, "max_workers": 0, "node_config": {}}
            continue
        resources["CPU"] = min(resources.get("CPU", CPUS_PER_NODE), CPUS_PER_NODE)
        types[name] = {"resources": resources, "min_workers": node.get("min_workers", 0),
                       "max_workers": min(node.get("max_workers", 1), MAX_NODES_PER_TYPE), "node_config": {}}
    return types


class FakeCluster:
    """A head with no CPUs for work and the autoscaler launching cluster.yaml's worker types on demand."""

    def __init__(self, types: dict[str, dict], idle_timeout_s: float = 10.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="srfk-", dir="/tmp"))  # short: Ray's socket paths
        self.head = local_cluster.LocalCluster(gcs_port=free_port(), dashboard_port=free_port(), num_cpus=0,
                                               temp_dir=str(self.directory / "ray"), client_port=free_port(),
                                               loopback_only=False)  # its fake worker nodes join on the machine's address
        self.config = self.directory / "autoscaling.yaml"
        self.config.write_text(yaml.safe_dump({
            "cluster_name": "fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "gcs_address": self.head.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
            # what `ray up` would fill in; the autoscaler reads every one of them
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }))

    @property
    def address(self) -> str:
        return self.head.address

    def env(self) -> dict[str, str]:
        """A driver's environment for this cluster (its jobs and the test's subprocesses)."""
        return {**local_cluster.token_env(), "RAY_ADDRESS": self.address}

    def start(self) -> None:
        """Start the head, its autoscaler updating every second (Ray's default: 5 s).

        A launch waits for the autoscaler's next update to see the demand, and a release for the first one after
        the idle timeout: up to 5 s each at Ray's interval, for nodes the tests launch and release several times.
        """
        local_cluster.ensure_token()
        command = [*self.head.start_command(), f"--autoscaling-config={self.config}"]
        env = {**local_cluster.head_env(self.head), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"the fake cluster's head did not start:\n{done.stdout}\n{done.stderr}")
        local_cluster.wait_for_dashboard(self.head)

    def stop(self) -> None:
        local_cluster.stop(self.head, timeout_s=5.0)
        shutil.rmtree(self.directory, ignore_errors=True)

    def worker_nodes(self) -> list[dict[str, float]]:
        """The live nodes other than the head, by their resources."""
        return self.worker_nodes_once_idle(0.0)

    def worker_nodes_once_idle(self, timeout_s: float) -> list[dict[str, float]]:
        """The worker nodes left once the autoscaler released the idle ones, or after ``timeout_s``: one driver
        polling every second (a driver per poll would cost a process start each)."""
        code = ("import json, time, ray\n"
                "ray.init(log_to_driver=False)\n"
                f"deadline = time.monotonic() + {timeout_s!r}\n"
                "while True:\n"
                "    workers = [n['Resources'] for n in ray.nodes()\n"
                f"               if n['Alive'] and {HEAD_NODE_RESOURCE!r} not in n['Resources']]\n"
                "    if not workers or time.monotonic() >= deadline:\n"
                "        break\n"
                "    time.sleep(1)\n"
                "print(json.dumps(workers))\n")
        done = self.driver(code, timeout_s=timeout_s + 120)
        if done.returncode:
            raise RuntimeError(f"the fake cluster's nodes could not be listed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def driver(self, code: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``code`` as a driver connected to this cluster (the test process has a cluster of its own)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)
