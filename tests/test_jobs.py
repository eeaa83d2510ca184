"""`ray job submit` of a study to a head started here on 127.0.0.1 (`ray start --head`, token
auth), stopped by the test. A module of its own: no Ray instance of this process is alive
while the head starts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, free_ports

RAY = str(Path(sys.executable).with_name("ray"))  # the CLI installed beside this interpreter


@pytest.mark.slow
def test_ray_job_submit_runs_a_study(tmp_path):
    port, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    # A clean environment (a Ray instance of this process leaves RAY_* variables behind), with
    # token auth on the head, the client and (inherited) the job's driver, as in cluster.yaml.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    temp_dir = tempfile.mkdtemp(prefix="rpd", dir="/tmp")  # short: Unix socket paths are limited
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", "--block", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        root = tmp_path / "root"
        for _ in range(24):  # the dashboard answers before the head's job agent is ready
            job = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(REPO),
                 # this interpreter: a bare `python` may be another one (a venv run without activation)
                 "--", sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root),
                 "--set", "train.epochs=1"],
                env=env, capture_output=True, text=True, timeout=420)
            if "No available agent" not in job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
        assert summary["num_trials"] == 4
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` and the head it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
