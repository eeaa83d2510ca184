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
from raypd.config import dataset_dir
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


def test_a_tracking_server_that_is_still_starting_is_waited_for(tmp_path, capsys):
    """`ray up` returns while the head's `mlflow server` is still starting, and the README's
    `ray job submit ... --tracking-uri` comes right after: raypd waits for it (one line), a
    bounded time, instead of refusing it."""
    from raypd.tracking import check_tracking_uri

    port = free_port()
    cli = Path(sys.executable).with_name("mlflow")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen([*command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        check_tracking_uri(f"http://127.0.0.1:{port}")  # returns once it answers (seconds after it started)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raypd.tune: no MLflow tracking server answers at"), lines
        assert "waiting up to 120 s" in lines[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            assert answer.status == 200
    finally:
        stop_group(server)
    os.environ["RAYPD_TRACKING_START_SECONDS"] = "1"  # and one that never comes is refused, after the wait
    try:
        with pytest.raises(ValueError, match="no MLflow tracking server answers there .*waited 1 s"):
            check_tracking_uri(f"http://127.0.0.1:{port}")
    finally:
        del os.environ["RAYPD_TRACKING_START_SECONDS"]


def tracked_study(smoke_data, tmp_path):
    """A `mlflow server` of the test's own, and the smoke study's command (5 epochs a trial,
    FIFO) tracked by it: (store, port, uri, server, root, args, env)."""
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(store, port, tmp_path / "server.log")
    root = tmp_path / "root"
    shutil.copytree(smoke_data, dataset_dir(load_config(SMOKE), root))
    args = [sys.executable, "-m", "raypd.tune", "--study", "smoke", "--root", str(root), "--tracking-uri", uri,
            "--set", "train.epochs=5", "--set", "search.scheduler=fifo"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return store, port, uri, server, root, args, env


def crash(server: subprocess.Popen) -> None:
    """The tracking server gone at once (SIGKILL to its group): a SIGTERM lets uvicorn finish
    the open keep-alive connections first, and a short study could end through them."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def start_and_wait_for_a_checkpoint(args, env, root) -> subprocess.Popen:
    study = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    trials = root / "tune" / "smoke" / "trials"
    deadline = time.time() + 240
    while not list(trials.glob("*/checkpoints/last/state.pt")):
        assert study.poll() is None and time.time() < deadline, study.stderr.read()[-2000:]
        time.sleep(0.05)
    return study


@pytest.mark.slow
def test_a_study_outlives_a_tracking_server_restart(smoke_data, tmp_path):
    store, port, uri, server, root, args, env = tracked_study(smoke_data, tmp_path)
    study = None
    try:
        study = start_and_wait_for_a_checkpoint(args, env, root)
        crash(server)  # the tracking server goes away while the first trials run ...
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
        if study is not None and study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
        stop_group(server)


def test_results_wait_on_disk_for_a_black_holed_server_and_the_next_run_sends_them(tmp_path, monkeypatch):
    """A tracking server that takes connections and never answers must not hold the study up
    (Tune's callbacks only queue); what it did not take is in the study's outbox file, which a
    later process (after a crash: nothing of the first is left in memory) sends, each epoch once."""
    import socket as sockets

    from ray.tune.experiment import Trial

    from raypd import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    hole = sockets.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes connections; nothing ever answers
    outbox = tmp_path / "study" / tracking.OUTBOX_FILE
    outbox.parent.mkdir()
    tags = {"study": "bh", "study_instance": "i1"}
    try:
        callback = tracking.mlflow_callback(f"http://127.0.0.1:{hole.getsockname()[1]}", "bh", tags, outbox)
        started = time.monotonic()
        trials = [Trial("raypd_trial", config={"train.lr": lr}, trial_id=f"t{k}", stub=True)
                  for k, lr in enumerate((0.01, 0.002))]
        for trial in trials:
            callback.log_trial_start(trial)
            for epoch in range(1, 6):
                callback.log_trial_result(epoch, trial, {"epoch": epoch, "val_loss": 1.0 / epoch,
                                                         "training_iteration": epoch})
            callback.log_trial_end(trial)
        assert time.monotonic() - started < 2.0  # 14 results queued, none waited for an answer
        assert len(tracking.read_outbox(outbox)) == 14
        callback.queue.close()  # the process ends (a crash, a SIGKILL): only the file is left
        tracking._senders.clear()
    finally:
        hole.close()

    port = free_port()
    server = mlflow_server(tmp_path, port, tmp_path / "server.log")
    try:
        uri = f"http://127.0.0.1:{port}"
        queue = tracking.sender(uri, "raypd-bh", "i1", outbox)
        assert queue.flush(60) == 0 and not outbox.exists()
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("raypd-bh").experiment_id])
        assert sorted(r.data.tags["trial_id"] for r in runs) == ["t0", "t1"]
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags["study_instance"] == "i1"
            history = client.get_metric_history(run.info.run_id, "val_loss")
            assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    finally:
        queue.close()
        tracking._senders.clear()
        stop_group(server)


def test_a_study_whose_tracking_server_never_answers_ends_in_one_line_and_keeps_its_results(tmp_path,
                                                                                               monkeypatch):
    """The give-up path: the trials are done, the server has not answered for the wait
    (RAYPD_TRACKING_WAIT_SECONDS), the study ends with a ValueError (exit 2, one line) and
    the results stay in the outbox for the next run."""
    from raypd import tracking
    from raypd.tracking import send_outbox

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("RAYPD_TRACKING_WAIT_SECONDS", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing there
    outbox = tmp_path / tracking.OUTBOX_FILE
    queue = tracking.sender(uri, "raypd-gone", "i2", outbox)
    try:
        queue.put(["end", "t0", "FINISHED"])
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"has not answered for 2 s: 1 results of study gone wait in"):
            send_outbox(uri, "gone", "i2", tmp_path)
        assert time.monotonic() - started < 10
        assert tracking.read_outbox(outbox) == [["end", "t0", "FINISHED"]]
    finally:
        queue.close()
        tracking._senders.clear()


@pytest.mark.slow
def test_sigterm_during_an_outage_ends_in_seconds_and_the_same_command_sends_what_waited(smoke_data, tmp_path):
    store, port, uri, server, root, args, env = tracked_study(smoke_data, tmp_path)
    study = None
    try:
        study = start_and_wait_for_a_checkpoint(args, env, root)
        crash(server)  # the tracking server goes away ...
        time.sleep(6)  # ... results pile up in the outbox ...
        stopped = time.time()
        os.kill(study.pid, signal.SIGTERM)  # ... and a process manager stops the study (30 s grace)
        _, stderr = study.communicate(timeout=60)
        assert time.time() - stopped < 30 and study.returncode == 143, stderr[-3000:]
        assert (root / "tune" / "smoke" / "mlflow_outbox.jsonl").exists()

        server = mlflow_server(store, port, tmp_path / "server.log")
        again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert not (root / "tune" / "smoke" / "mlflow_outbox.jsonl").exists()
        summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("raypd-smoke").experiment_id])
        assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in summary["trials"])
        for run in runs:  # every epoch once, at its own step, the run ended
            assert run.info.status == "FINISHED"
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
            assert steps == list(range(1, 6)), (run.data.tags["trial_id"], steps)
        versions = client.search_model_versions("name = 'raypd-smoke'")
        assert len(versions) == 1 and versions[0].tags["trial_id"] == summary["best_trial_id"]
    finally:
        if study is not None and study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
        stop_group(server)


def test_an_epoch_checkpointed_but_lost_before_tune_saw_it_reaches_mlflow_from_the_checkpoint(tmp_path):
    """A trial killed between saving epoch 5's checkpoint and reporting it resumes at epoch 6:
    Tune never sees epoch 5. At the study's end its checkpoint history fills the gap, every
    epoch once (CI caught the gap: [1, 2, 3, 4, 6])."""
    from ray.tune.experiment import Trial

    from raypd import tracking
    from raypd.tracking import send_outbox

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    callback = tracking.mlflow_callback(uri, "gap", {"study_instance": "i1"}, study_dir / tracking.OUTBOX_FILE)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.0 / e, "best_val_loss": 1.0 / e} for e in range(1, 7)]
    trial = Trial("raypd_trial", config={"train.lr": 0.01}, trial_id="t0", stub=True)
    try:
        callback.log_trial_start(trial)
        for h in history[:4] + history[5:]:
            callback.log_trial_result(h["epoch"], trial, {**h, "training_iteration": h["epoch"]})
        callback.log_trial_end(trial)
        send_outbox(uri, "gap", "i1", study_dir, {"t0": history})
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("raypd-gap").experiment_id])
        for key in ("epoch", "val_loss", "train_loss"):
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert got == [(h["epoch"], float(h[key])) for h in history], key
        assert not (study_dir / tracking.OUTBOX_FILE).exists()
    finally:
        callback.queue.close()
        tracking._senders.clear()
