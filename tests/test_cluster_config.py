"""cluster.yaml passes Ray's own cluster-config validation (its JSON schema and consistency checks)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
