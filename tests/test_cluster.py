"""cluster.yaml passes Ray's own cluster-config schema (no cloud calls)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    yaml = pytest.importorskip("yaml")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema violation
    workers = config["available_node_types"]["gpu_8x"]
    assert workers["min_workers"] <= workers["max_workers"]
    assert any("pip install" in command and "raygpt" in command for command in config["setup_commands"])
