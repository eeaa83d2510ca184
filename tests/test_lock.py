"""One writer per study, dataset and training folder (raypd.lock): a second process is refused
at once with one line naming the holder; a holder that died blocks nobody; the same study
started twice at once runs once."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.lock import STALE_SECONDS, hold
from raypd.train import dataset_dir
from tests.conftest import REPO, run_cli

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")

HOLD = "from raypd.lock import hold; import sys, time\nwith hold(sys.argv[1], 'the thing'):\n    print('held', flush=True); time.sleep(60)\n"


def test_a_second_holder_is_refused_with_the_holder_named_and_a_dead_one_blocks_nobody(tmp_path):
    lock = tmp_path / ".raypd.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError) as refused:
            with hold(lock, "study x in /r/tune/x"):
                pass
        message = str(refused.value)
        assert message.startswith("study x in /r/tune/x is in use by ")
        assert f"{socket.gethostname()} pid {holder.pid} since " in message
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # killed: it could not clean up; its pid is gone now
    with hold(lock, "study x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released


def test_a_lock_of_another_host_is_stale_only_once_its_heartbeat_stopped(tmp_path):
    lock = tmp_path / ".raypd.lock"
    lock.write_text(json.dumps({"host": "node-7", "pid": 1, "since": "then", "command": "raypd.tune"}))
    with pytest.raises(ValueError, match="in use by node-7 pid 1 since then"):
        with hold(lock, "dataset d"):
            pass
    old = time.time() - STALE_SECONDS - 5  # node-7 stopped touching it a minute ago
    os.utime(lock, (old, old))
    with hold(lock, "dataset d"):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


@pytest.mark.slow
def test_the_same_study_started_twice_at_once_runs_once(smoke_data, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(smoke_data, dataset_dir(load_config(SMOKE), root))
    args = [sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (root / "tune" / "smoke" / ".raypd.lock").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        started = time.time()
        second = run_cli("raypd.tune", "--study", "smoke", "--root", str(root), timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.time() - started < 60  # at once: not after the first has finished
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"raypd.tune: error: study smoke in {root / 'tune' / 'smoke'} is in use by "
                               f"{socket.gethostname()} pid {first.pid} since ")
        _, stderr = first.communicate(timeout=600)
        assert first.returncode == 0, stderr[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    assert summary["num_trials"] == 4
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("raypd-smoke").experiment_id])
    assert len(runs) == 4 and len(client.search_model_versions("name = 'raypd-smoke'")) == 1
    assert not (root / "tune" / "smoke" / ".raypd.lock").exists()
