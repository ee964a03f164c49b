"""cluster.yaml passes Ray's own cluster-config validation (its JSON schema and consistency checks), and the
`cluster` preset's Serve app fits its node types."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from shoprank.config import load_config
from shoprank.serving.app import placements

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _prepared() -> dict:
    return prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_cluster_yaml_passes_rays_validation() -> None:
    config = _prepared()
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head.cpu" and types["head.cpu"]["resources"]["CPU"] == 0
    assert types["worker.cpu"]["max_workers"] > types["worker.cpu"]["min_workers"] == 0
    assert "gpu" in types["worker.gpu"]["docker"]["worker_image"] and types["worker.gpu"]["max_workers"] > 0
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


def test_the_validation_rejects_a_broken_config() -> None:
    broken = copy.deepcopy(_prepared())
    broken["available_node_types"]["worker.gpu"]["max_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def _hosts(options: dict, node: dict[str, float]) -> bool:
    """Whether a node with these resources can take a replica with these Ray actor options."""
    asked = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    return all(amount <= node.get(name, 0) for name, amount in asked.items() if amount)


def test_the_cluster_presets_serve_app_fits_the_node_types() -> None:
    """Every replica has a node type to run on (not the head, which offers no CPU), the query encoders of both
    variants at their most fit the GPU type's nodes, and the state actors go where the custom resource is."""
    types = {name: node["resources"] for name, node in _prepared()["available_node_types"].items()}
    most = {name: node["max_workers"] for name, node in _prepared()["available_node_types"].items()}
    config = load_config("cluster", ["run.root=s3://bucket/shoprank"])
    placed = placements(config, list(config.serve.variants))
    assert {"QueryEncoder_A", "QueryEncoder_B", "EventStoreWriter"} <= set(placed)
    for name, placement in placed.items():
        hosts = [kind for kind, node in types.items() if _hosts(placement.ray_actor_options, node)]
        assert hosts and "head.cpu" not in hosts, f"{name} {placement.ray_actor_options}: hosts {hosts}"
    for resource in ("GPU", "CPU"):
        asked = sum(p.max_replicas * p.ray_actor_options.get(f"num_{resource.lower()}s", 0) for p in placed.values())
        offered = sum(most[kind] * node.get(resource, 0) for kind, node in types.items())
        assert 0 < asked <= offered, f"{resource}: the app at its most asks {asked}, the node types offer {offered}"
    state = placed["EventStoreWriter"].ray_actor_options["resources"]
    assert [kind for kind, node in types.items() if set(state) <= set(node)] == ["worker.cpu"]
