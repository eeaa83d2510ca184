"""A tracking server that goes away in the middle of a study, for real: a `mlflow server`
started by the test is stopped while trials run and started again; the study goes on, the
results that waited are sent when it is back, every trial has exactly one complete MLflow run
and the winner is registered once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.train import dataset_dir
from tests.conftest import REPO, free_port, stop_group

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")


def mlflow_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("mlflow")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "mlflow"]
    proc = subprocess.Popen([*command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                             "--artifacts-destination", str(store / "artifacts")],
                            cwd=store, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, "mlflow server did not answer in 120 s"
            time.sleep(0.3)


@pytest.mark.slow
def test_a_study_outlives_a_tracking_server_restart(smoke_data, tmp_path):
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(store, port, tmp_path / "server.log")
    root = tmp_path / "root"
    shutil.copytree(smoke_data, dataset_dir(load_config(SMOKE), root))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    study = subprocess.Popen([sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root),
                              "--tracking-uri", uri, "--set", "train.epochs=5", "--set", "search.scheduler=fifo"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        trials = root / "tune" / "smoke" / "trials"
        deadline = time.time() + 240
        while not list(trials.glob("*/checkpoints/last/state.pt")):
            assert study.poll() is None and time.time() < deadline, study.stderr.read()[-2000:]
            time.sleep(0.05)
        stop_group(server)  # the tracking server goes away while the first trials run ...
        time.sleep(8)
        assert study.poll() is None  # ... and the study goes on
        server = mlflow_server(store, port, tmp_path / "server.log")  # back, same store
        _, stderr = study.communicate(timeout=600)
        assert study.returncode == 0, stderr[-3000:]
        assert "does not answer" in stderr and "answers again" in stderr, stderr[-3000:]

        summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("raypd-smoke").experiment_id])
        assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
        epochs = {t["trial_id"]: t["epochs"] for t in summary["trials"]}
        for run in runs:  # complete: every epoch's result arrived, once, and the run ended
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run.info.run_id, "val_loss")
            assert len(history) == epochs[run.data.tags["trial_id"]] == 5
            assert run.data.params["train.lr"]
        versions = client.search_model_versions("name = 'raypd-smoke'")
        assert len(versions) == 1 and versions[0].tags["trial_id"] == summary["best_trial_id"]
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
        stop_group(server)
