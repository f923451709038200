"""cluster.yaml (AWS) and cluster-onprem.yaml (Ray's local provider) pass Ray's own cluster-config schema
(no cloud calls), and set up their nodes alike. tests/test_ray_up.py runs cluster-onprem.yaml for real."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-onprem.yaml"]


def load(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_is_a_valid_ray_cluster_config(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)  # raises on any schema violation
    for node_type in config["available_node_types"].values():
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", float("inf"))
    assert any("pip install" in command and "raygpt" in command for command in config["setup_commands"])


def test_the_two_cluster_files_set_up_and_start_nodes_alike():
    """Same copies, same venv and PATH line, same torch choice, same Ray start lines; the on-prem head
    asks for Ray's v1 autoscaler (v2 does not drive the local provider)."""
    aws, onprem = load("cluster.yaml"), load("cluster-onprem.yaml")
    for key in ("file_mounts", "rsync_exclude", "rsync_filter"):
        assert aws[key] == onprem[key], key
    assert len(aws["setup_commands"]) == len(onprem["setup_commands"])
    assert aws["setup_commands"][1:3] == onprem["setup_commands"][1:3]
    assert aws["worker_start_ray_commands"] == onprem["worker_start_ray_commands"]
    head = [command.replace("RAY_enable_autoscaler_v2=0 ", "") for command in onprem["head_start_ray_commands"]]
    assert aws["head_start_ray_commands"] == head
