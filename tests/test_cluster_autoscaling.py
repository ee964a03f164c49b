"""A multi-node cluster on this machine (Ray's fake multi-node provider with cluster.yaml's node types):
a GPU asked for where none runs yet waits for the autoscaler to start a GPU node, which goes again
once idle; where no node type offers a GPU, the request is refused within seconds."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator

import pytest

from fake_cluster import FakeCluster, node_types

CHECK = textwrap.dedent("""
    import json, time, ray
    from shoprank.config import RayConfig
    from shoprank.entrypoint import check_gpu
    from shoprank.errors import ConfigError
    ray.init(log_to_driver=False)
    started = time.time()
    try:
        check_gpu(RayConfig(use_gpu=True, gpu_wait_s=180))
        outcome = "ready"
    except ConfigError as refused:
        outcome = f"refused: {refused}"
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"outcome": outcome, "seconds": time.time() - started, "nodes": nodes}))
""")


def _check(cluster: FakeCluster) -> dict:
    done = cluster.driver(CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _alive_gpus(cluster: FakeCluster) -> float:
    done = cluster.driver("import ray; ray.init(log_to_driver=False); print(ray.cluster_resources().get('GPU', 0))")
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def gpu_cluster() -> Iterator[FakeCluster]:
    started = FakeCluster(node_types())
    started.start()
    yield started
    started.stop()


@pytest.fixture
def cpu_only_cluster() -> Iterator[FakeCluster]:
    started = FakeCluster(node_types(without=("worker.gpu",)))
    started.start()
    yield started
    started.stop()


@pytest.mark.slow  # two fake clusters, a node started and released: about a minute and a half here
@pytest.mark.timeout(600)
def test_a_gpu_node_starts_on_demand_and_goes_when_idle(gpu_cluster: FakeCluster) -> None:
    assert _alive_gpus(gpu_cluster) == 0, "no GPU node before anyone asks"
    found = _check(gpu_cluster)
    assert found["outcome"] == "ready", found
    assert any(node.get("GPU") for node in found["nodes"]), "the autoscaler started a GPU node"
    deadline = time.monotonic() + 180
    while _alive_gpus(gpu_cluster):
        assert time.monotonic() < deadline, "the idle GPU node was not released"
        time.sleep(5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gpu_request_is_refused_where_no_node_type_offers_one(cpu_only_cluster: FakeCluster) -> None:
    found = _check(cpu_only_cluster)
    assert found["outcome"].startswith("refused: ray.use_gpu is true but the Ray cluster has no GPU and no node "
                                       "type of it offers one"), found
    assert found["seconds"] < 60, found
