"""Running on a Ray cluster: the launcher files (Ray's own validator and a security lint) and
two-node runs with ray.cluster_utils.Cluster (generation, a study, losing a node)."""

import copy
import re
import time

import numpy as np
import pytest
import yaml

from raypd.config import DataConfig, load_config
from raypd.dataio import content_hash, row_digests
from raypd.generate import generate, generate_samples
from raypd.tune import run_study
from tests.conftest import REPO

CLUSTER_FILES = [REPO / "cluster.yaml", REPO / "cluster-onprem.yaml"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_rays_validator(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_keeps_ports_private_and_uses_token_auth(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert "0.0.0.0" not in yaml.safe_dump(config)  # in any value (comments may explain it)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server --host 127.0.0.1" in head
    assert config["file_mounts"].get("~/.ray/auth_token", config["file_mounts"].get("/home/ubuntu/.ray/auth_token"))
    if config["provider"]["type"] == "aws":  # SSH only through a security group the user owns
        for node in config["available_node_types"].values():
            assert node["node_config"]["SecurityGroupIds"]
        gpu = config["available_node_types"]["ray.worker.gpu"]["node_config"]["InstanceType"]
        assert re.match(r"g[56]", gpu)


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of 1 CPU each, on this machine, shut down after the module."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_generation_spreads_over_nodes_with_the_same_dataset(two_nodes, tmp_path):
    config = DataConfig(samples=600, seed=21, mu_range=(0.0, 0.0))
    manifest = generate(config, tmp_path / "ds", block_size=100, progress=False)
    assert manifest["generation_nodes"] == 2
    cols, _ = generate_samples(config, np.arange(600))  # one process, no Ray
    assert manifest["content_hash"] == content_hash(row_digests(cols))


@pytest.mark.slow
def test_smoke_study_places_trials_on_both_nodes(two_nodes, tmp_path):
    summary = run_study(load_config(str(REPO / "tune_configs" / "smoke.yaml"), ["train.epochs=2"]), "smoke",
                        tmp_path)
    assert summary["num_trials"] == 4 and all(t["status"] == "TERMINATED" for t in summary["trials"])
    assert len({t["node_id"] for t in summary["trials"]}) == 2


@pytest.mark.slow
def test_losing_a_node_mid_study_loses_and_doubles_nothing(two_nodes, tmp_path):
    """Remove the worker node once trials run on both nodes: the trial that was there fails,
    Tune retries it (search.max_failures) on the head from its last checkpoint, and the study
    ends with every trial complete, once, with one MLflow run each. (Runs last in this module:
    the fixture's worker node is gone afterwards.)"""
    import threading

    from mlflow.tracking import MlflowClient

    from raypd.train import read_state

    trials = tmp_path / "tune" / "loss" / "trials"
    removed = {}

    def remove_worker_when_busy():
        deadline = time.time() + 240
        while time.time() < deadline:
            states = []
            for last in trials.glob("*/checkpoints/last"):
                try:
                    states.append(read_state(last)["epoch"])
                except ValueError:  # not written yet, or caught mid-write
                    pass
            if sum(e >= 2 for e in states) >= 2:  # two trials under way: one on each node
                removed["epochs"] = states
                two_nodes.remove_node(two_nodes.list_all_nodes()[1])
                return
            time.sleep(0.1)

    monitor = threading.Thread(target=remove_worker_when_busy)
    monitor.start()
    config = load_config(str(REPO / "tune_configs" / "smoke.yaml"),
                         ["train.epochs=30", "train.patience=30", "search.scheduler=fifo", "search.num_samples=4"])
    summary = run_study(config, "loss", tmp_path)
    monitor.join()
    assert removed, "the worker node was never removed"
    assert summary["num_trials"] == 4 and len({t["trial_id"] for t in summary["trials"]}) == 4
    assert all(t["status"] == "TERMINATED" and t["epochs"] == 30 for t in summary["trials"])
    for trial in summary["trials"]:
        history = read_state(trials / trial["trial_id"] / "checkpoints" / "last")["history"]
        assert [h["epoch"] for h in history] == list(range(1, 31))  # no epoch lost or doubled
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raypd-loss")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
