"""A multi-node cluster on this machine (Ray's fake multi-node provider with cluster.yaml's node types):
a GPU asked for where none runs yet waits for the autoscaler to start a GPU node, which goes again
once idle; where no node type offers a GPU, the request is refused within seconds; the pipeline job
(on an ESCI export) and the Serve app with the cluster preset's Serve settings run on worker nodes the
autoscaler starts, and those nodes go once the work is done."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx

import pytest

from fake_cluster import FakeCluster, node_types
from postgres import PostgresServer
from conftest import bearer
from shapes import check_answers, check_every_stage, write_esci
from shoprank.config import load_config
from shoprank.data.io import read_table
from shoprank.data.readers import read_esci
from shoprank.encoder.text import product_texts
from shoprank.encoder.tiny import build_tiny_encoder
from shoprank.entrypoint import free_port
from shoprank.serving.app import HEAD_NODE_RESOURCE
from shoprank.serving.keys import client_keys, create_keys
from shoprank.serving.variants import register_variants
from shoprank.store.events import open_event_store
from shoprank.store.run import Run

REPO = Path(__file__).resolve().parents[1]

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
    assert not any(node.get("GPU") for node in gpu_cluster.worker_nodes()), "no GPU node before anyone asks"
    found = _check(gpu_cluster)
    assert found["outcome"] == "ready", found
    assert any(node.get("GPU") for node in found["nodes"]), "the autoscaler started a GPU node"
    assert gpu_cluster.worker_nodes_once_idle(180) == [], "the idle GPU node was not released"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_gpu_request_is_refused_where_no_node_type_offers_one(cpu_only_cluster: FakeCluster) -> None:
    found = _check(cpu_only_cluster)
    assert found["outcome"].startswith("refused: ray.use_gpu is true but the Ray cluster has no GPU and no node "
                                       "type of it offers one"), found
    assert found["seconds"] < 60, found


RANKER = textwrap.dedent("""
    import json, time
    import numpy as np, pandas as pd, ray
    from ray.autoscaler.sdk import request_resources
    from shoprank.config import load_config
    from shoprank.ranker.train import FEATURES, train_ranker, worker_layout
    ray.init(log_to_driver=False)
    request_resources(bundles=[{"CPU": 1}] * 2)
    deadline = time.monotonic() + 240
    while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1) < 2:
        assert time.monotonic() < deadline, "the autoscaler did not start two CPU nodes"
        time.sleep(1)
    def rows(seed):
        rng = np.random.default_rng(seed)
        frame = pd.DataFrame({"request_id": [f"r{i}" for i in rng.integers(0, 200, 4000)],
                              "product_id": [f"p{i}" for i in rng.integers(0, 500, 4000)],
                              "label": rng.integers(0, 4, 4000).astype(np.int8)})
        for name in FEATURES:
            frame[name] = rng.random(len(frame), dtype=np.float32)
        return frame
    config = load_config("tiny", ["ranker.num_boost_round=5"])
    layout = worker_layout(config)
    result = train_ranker(config, rows(0), rows(1), STORAGE)
    request_resources(bundles=[])
    print(json.dumps({"layout": [layout.num_workers, layout.cpus_per_worker, layout.spread],
                      "trained": [result.metrics["workers"], result.metrics["cpus_per_worker"]]}))
""")


@pytest.mark.slow  # a fake cluster, two nodes started, a small training: 15 to 26 s here
@pytest.mark.timeout(600)
def test_the_rankers_auto_layout_puts_one_worker_on_each_node(cpu_only_cluster: FakeCluster, tmp_path: Path) -> None:
    """``ranker.num_workers`` unset on a cluster of two worker nodes (1 CPU each, the head none): two workers,
    one per node, each with its node's CPU, and they train together."""
    done = cpu_only_cluster.driver(RANKER.replace("STORAGE", repr(str(tmp_path))), timeout_s=500)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"layout": [2, 1, True], "trained": [2, 1]}, found


DEPLOY = textwrap.dedent("""
    import json, sys, ray
    from ray import serve
    from ray.util.state import list_actors
    from shoprank.serving.app import APP_NAME, AppArgs, deploy
    args, port = AppArgs.model_validate_json(sys.argv[1]), int(sys.argv[2])
    ray.init(log_to_driver=False)
    # one proxy, on the head: the fake nodes share this machine's address, so a proxy per node cannot bind
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    deploy(args)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    placed = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10000):
        if actor.class_name.startswith(f"ServeReplica:{APP_NAME}:"):
            placed.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(nodes.get(actor.node_id, {}))
    deployments = serve.status().applications[APP_NAME].deployments
    print(json.dumps({"status": {name: d.status for name, d in deployments.items()}, "placed": placed}))
""")


def _cluster_serve_settings() -> list[str]:
    """The cluster preset's Serve placement (GPU share of the query encoders, the state actors' resource) with
    its GPUs on, scaled to a laptop: one replica each, a quarter of a CPU."""
    cluster = load_config("cluster", ["run.root=s3://bucket/shoprank"]).serve
    return ["ray.use_gpu=true", f"serve.gpus_per_encoder={cluster.gpus_per_encoder}",
            f"serve.state_resource={cluster.state_resource}", "serve.replicas=1", "serve.max_replicas=2",
            "serve.cpus_per_replica=0.25"]


# the pipeline and an app of seven replicas on nodes started on demand: 100 s on a quiet 2-core machine, the
# longest test there is; `make test-all` (CI's command) runs it
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_pipeline_and_the_app_run_on_autoscaled_nodes_that_go_afterwards(
    gpu_cluster: FakeCluster, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The tiny pipeline on a shop's ESCI export (judged queries in three locales, no behaviour; CPU work only)
    as a job's driver would run it, then its variants served with the cluster preset's Serve placement: query
    encoders on the GPU nodes, the state actors where cluster.yaml puts ``shoprank_state``, nothing on the head;
    every deployment healthy and answering what the ESCI shape's test on one node asks; no worker node left once
    the app is gone."""
    root = tmp_path / "runs"
    source = write_esci(tmp_path / "data", locale="all")
    shop = load_config("tiny", source)
    catalogue = read_esci(shop.source.esci)  # read without Ray: the tiny encoder's tokenizer learns its words
    texts = product_texts(catalogue.products, shop.encoder)
    encoder = build_tiny_encoder(texts + catalogue.judgments.column("query").to_pylist(), tmp_path / "encoder")
    settings = [f"run.root={root}", *source, f"encoder.model={encoder}", "encoder.train.epochs=1",
                "ranker.num_boost_round=10", "ranker.num_workers=1"]
    job = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "tiny", *(f"--set={o}" for o in settings)],
                         cwd=REPO, env=gpu_cluster.env(), capture_output=True, text=True, timeout=1200)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    config = load_config("tiny", settings)
    run = Run.for_config(config)
    check_every_stage(run, {"search"})

    register_variants(config, run)
    create_keys(config)
    key = client_keys(config)["client"]
    port, events_db = free_port(), postgres_server.database()
    overrides = [*settings, f"serve.port={port}", f"serve.event_db={events_db}",
                 *_cluster_serve_settings()]
    args = json.dumps({"config": "tiny", "overrides": overrides})
    deployed = subprocess.run([sys.executable, "-c", DEPLOY, args, str(port)], env=gpu_cluster.env(),
                              capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    found = json.loads(deployed.stdout.strip().splitlines()[-1])
    assert set(found["status"].values()) == {"HEALTHY"}, found["status"]
    placed = found["placed"]
    assert {"Ingress", "Variant_A", "Variant_B", "QueryEncoder_A", "QueryEncoder_B", "EventStoreWriter"} <= set(placed), \
        placed
    for name in ("QueryEncoder_A", "QueryEncoder_B"):
        assert all(node.get("GPU") for node in placed[name]), f"{name} off the GPU nodes: {placed[name]}"
    assert all(node.get("shoprank_state") for node in placed["EventStoreWriter"]), placed["EventStoreWriter"]
    assert not any(node.get(HEAD_NODE_RESOURCE) for nodes in placed.values() for node in nodes)

    url = f"http://127.0.0.1:{port}"
    check_answers(url, run, key)
    product = read_table(run, "data", "products", columns=["product_id"]).column("product_id")[0].as_py()
    event = [{"user_id": "U1", "product_id": product, "event_type": "click"}]
    assert httpx.post(f"{url}/events", json=event, timeout=120.0, headers=bearer(key)).status_code == 200
    store = open_event_store(events_db)
    try:
        assert store.events().column("product_id").to_pylist() == [product], "the click is in the cluster's Postgres"
    finally:
        store.close()

    stopped = gpu_cluster.driver("import ray; from ray import serve; ray.init(log_to_driver=False); serve.shutdown()")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    left = gpu_cluster.worker_nodes_once_idle(240)
    assert left == [], f"worker nodes still up when idle: {left}"
