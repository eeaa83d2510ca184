"""Studies on an autoscaling cluster shaped like cluster.yaml, on Ray's fake multi-node
autoscaler (provider fake_multinode): a head with 0 CPUs, worker types starting at 0 nodes.
Each cluster is a `ray start --head --block` in its own process group, ended by that group
(never `ray stop`: it would end every Ray process on the machine). raypd runs as a user runs
it, `python -m raypd.<stage> --address ...`, so this process never joins the cluster."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from raypd.config import load_config
from raypd.dataio import read_manifest
from tests.conftest import REPO, free_ports, run_cli, snapshot

RAY = str(Path(sys.executable).with_name("ray"))  # the CLI installed beside this interpreter
SMOKE = str(REPO / "tune_configs" / "smoke.yaml")


def fake_cluster_config(port: int, worker_types: dict) -> dict:
    """A cluster.yaml-like autoscaler config for the fake_multinode provider."""
    return {
        "cluster_name": "raypd-fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        # node ids double as IPs and no updater runs: nodes are local raylets (Ray's own example)
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **worker_types},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def worker_type(max_workers: int, **resources) -> dict:
    return {"resources": {**resources, "object_store_memory": 200_000_000}, "node_config": {},
            "min_workers": 0, "max_workers": max_workers}


class FakeCluster:
    def __init__(self, tmp: Path, worker_types: dict):
        self.port, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
        config = tmp / "autoscaler.yaml"
        config.write_text(yaml.safe_dump(fake_cluster_config(self.port, worker_types)))
        self.address = f"127.0.0.1:{self.port}"
        # A clean environment (no RAY_* of another instance), token auth as in cluster.yaml.
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        self.temp_dir = tempfile.mkdtemp(prefix="rpf", dir="/tmp")  # short: Unix socket paths are limited
        self.log = open(tmp / "head.log", "w")
        self.head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
             "--object-store-memory=200000000", f"--autoscaling-config={config}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--temp-dir={self.temp_dir}", "--block"],
            env={**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while self.nodes() is None:
            assert time.time() < deadline and self.head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            time.sleep(1)

    def run(self, *args, timeout=600):
        return run_cli(*args, "--address", self.address, env=self.env, timeout=timeout)

    def nodes(self):
        """ray.nodes() of the cluster, read by a separate process (this one stays out of it)."""
        probe = subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(address=%r, logging_level='ERROR', "
             "log_to_driver=False); print('NODES', json.dumps(ray.nodes()))" % self.address],
            env=self.env, capture_output=True, text=True, timeout=60)
        lines = [line for line in probe.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(lines[-1][6:]) if probe.returncode == 0 and lines else None

    def stop(self):
        """End the head's process group (the fake worker nodes are started by its autoscaler,
        inside that group); then anything still running from this cluster's temp dir."""
        # SIGTERM to all at once can leave the GCS and the autoscaler waiting on each other
        # for 20 s: a test cluster gets 5 s, then SIGKILL
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.head.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                pass
        left = processes_under(self.temp_dir)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        self.log.close()
        assert not left, f"processes of the fake cluster outlived its process group: {left}"


def processes_under(temp_dir: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if temp_dir.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory):
    """cluster.yaml's CPU shape: head CPU 0, one worker type of 1 CPU, 0..3 nodes."""
    cluster = FakeCluster(tmp_path_factory.mktemp("fake-cpu"), {"ray.worker.cpu": worker_type(3, CPU=1)})
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_generation_blocks_run_on_several_autoscaled_nodes(cpu_cluster, tmp_path):
    assert sum(n["Resources"].get("CPU", 0) for n in cpu_cluster.nodes() if n["Alive"]) == 0
    # ~10 s of one core's work (n=3: ~40 draws and ~1 ms per sample), longer than a fake
    # node takes to start: nodes added for the queued blocks get some of them
    result = cpu_cluster.run("raypd.generate", "--n-actions", "3", "--samples", "10000", "--seed", "5",
                             "--mu-range", "0", "0", "--block-size", "500", "--out", str(tmp_path / "ds"),
                             "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["samples"] == 10000 and manifest["generation_nodes"] >= 2


@pytest.mark.slow
def test_study_with_its_dataset_present_queues_trials_for_the_autoscaler(cpu_cluster, tmp_path):
    """The issue's case: the dataset is there, no worker is up (0 CPUs live). The study is
    sized from the node types (3 at a time), Tune queues the trials, the autoscaler adds
    nodes, and the trials run on more than one of them."""
    from raypd.config import dataset_dir

    root = tmp_path / "root"
    made = cpu_cluster.run("raypd.generate", "--n-actions", "1", "--samples", "600", "--seed", "42",
                           "--mu-range", "0", "0", "--time-span", "0", "100", "--time-points", "101",
                           "--out", str(dataset_dir(load_config(SMOKE), root)), "--no-progress")
    assert made.returncode == 0, made.stderr[-3000:]
    result = cpu_cluster.run("raypd.tune", "--study", "smoke", "--root", str(root), "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raypd.tune: 3 trial(s) at a time, each 1 CPU(s) and 0 GPU(s); from the autoscaler's node types" \
        in result.stderr
    assert "ray.worker.cpu (CPU 1) x3" in result.stderr
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    assert summary["num_trials"] == 4 and all(t["status"] == "TERMINATED" for t in summary["trials"])
    assert len({t["node_id"] for t in summary["trials"]}) >= 2


@pytest.mark.slow
def test_a_trial_no_node_type_can_hold_is_refused_before_any_ray_work(cpu_cluster, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    before = snapshot(root)
    result = cpu_cluster.run("raypd.tune", "--study", "smoke", "--root", str(root), "--set", "train.use_gpu=true",
                             timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("raypd.tune: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "no node can hold it" in lines[0] and "ray.head.default (CPU 0) x1; ray.worker.cpu (CPU 1) x3" in lines[0]
    assert snapshot(root) == before


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """cluster.yaml's full shape: head CPU 0, a CPU type and a (fake) GPU type, both 0..2."""
    cluster = FakeCluster(tmp_path_factory.mktemp("fake-gpu"), {
        "ray.worker.cpu": worker_type(2, CPU=1), "ray.worker.gpu": worker_type(2, CPU=1, GPU=1)})
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_with_a_gpu_node_type_but_no_gpu_up_trials_ask_for_gpus(gpu_cluster, tmp_path):
    """The GPUs are fake (no CUDA here): what is checked is what the trials asked for and
    where the autoscaler put them. Each trial lands on a GPU node, holds a GPU, and stops
    there because torch finds no CUDA device."""
    root = tmp_path / "root"
    result = gpu_cluster.run("raypd.tune", "--study", "smoke", "--root", str(root), "--set", "search.num_samples=2",
                             "--set", "search.max_failures=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raypd.tune: 2 trial(s) at a time, each 1 CPU(s) and 1 GPU(s)" in result.stderr
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    gpu_nodes = {n["NodeID"] for n in gpu_cluster.nodes() if n["Resources"].get("GPU", 0) == 1}
    assert gpu_nodes and summary["num_trials"] == 2
    for trial in summary["trials"]:
        assert trial["status"] == "ERROR" and "has no CUDA device" in trial["error"]
        assert "'GPU': 1.0" in trial["error"]  # the trial held a GPU ...
        node = trial["error"].split("node ")[1].split()[0]
        assert node in gpu_nodes  # ... on a node of the GPU type
