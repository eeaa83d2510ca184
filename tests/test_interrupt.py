"""Interruptions, for real: a study killed (SIGKILL), stopped by Ctrl-C (SIGINT to its process
group, as a terminal sends it) or by SIGTERM at several points of its life, then the same
command again, which must finish it with every trial once in summary.json and in MLflow and
the winner registered once; and generate and train stopped by Ctrl-C and continued."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.config import dataset_dir
from raypd.train import read_state
from tests.conftest import REPO, run_cli

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")
STUDY = ["raypd.tune", "--study", "smoke"]
STOPPED = "interrupted; run the same command again to continue where it stopped"


def start(args, root: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    extra = ["--root", str(root)] if root else []
    return subprocess.Popen([sys.executable, "-m", *args, *extra], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def trials_with_a_checkpoint(study_dir: Path) -> int:
    return len(list((study_dir / "trials").glob("*/checkpoints/last/state.pt")))


POINTS = {
    # (what stops it, when)
    "before any trial": (signal.SIGKILL, lambda d: (d / "tuner.pkl").exists()),
    "during the first trial": (signal.SIGINT, lambda d: trials_with_a_checkpoint(d) >= 1),
    "between trials": (signal.SIGTERM, lambda d: trials_with_a_checkpoint(d) >= 3),
    "while the winner is registered": (signal.SIGKILL, lambda d: (d / "summary.json").exists()),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_study_stopped_at_any_point_is_finished_by_the_same_command(smoke_data, tmp_path, point):
    how, when = POINTS[point]
    root = tmp_path / "root"
    shutil.copytree(smoke_data, dataset_dir(load_config(SMOKE), root))
    study_dir = root / "tune" / "smoke"
    proc = start(STUDY, root)
    wait_for(lambda: when(study_dir), proc, point)
    if how == signal.SIGTERM:
        os.kill(proc.pid, how)  # a process manager's stop: the main process only
    else:
        os.killpg(proc.pid, how)  # SIGINT: what Ctrl-C sends to the terminal's process group
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how != signal.SIGKILL:  # a clean stop: one line saying how to continue, no summary
        assert proc.returncode == (143 if how == signal.SIGTERM else 130), stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == f"raypd.tune: {STOPPED}"
        assert not (study_dir / "summary.json").exists()
        assert "Traceback" not in stderr

    # what each trial had done when it stopped: a resumed trial continues from there
    stopped_at = {p.parents[2].name: read_state(p.parent)["history"]
                  for p in (study_dir / "trials").glob("*/checkpoints/last/state.pt")}
    result = run_cli(*STUDY, "--root", str(root), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if point == "before any trial":
        assert "ended (stopped or failed) before Tune saved its state: starting it afresh" in result.stderr
    summary = json.loads((study_dir / "summary.json").read_text())
    trial_ids = sorted(t["trial_id"] for t in summary["trials"])
    assert summary["num_trials"] == 4 and len(set(trial_ids)) == 4
    assert all(t["status"] == "TERMINATED" and t["epochs"] >= 1 for t in summary["trials"])
    for trial in summary["trials"]:  # continued, not restarted: the epochs before the stop kept as they were
        history = read_state(study_dir / "trials" / trial["trial_id"] / "checkpoints" / "last")["history"]
        assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
        before = stopped_at.get(trial["trial_id"], [])
        assert history[: len(before)] == before, trial["trial_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raypd-smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == trial_ids  # one run per trial
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name = 'raypd-smoke'")
    assert len(versions) == 1 and versions[0].tags["trial_id"] == summary["best_trial_id"]
    # the resumed search went on writing to its Optuna study in the folder
    import optuna

    study = optuna.load_study(study_name="raypd-smoke", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4


@pytest.mark.slow
def test_ctrl_c_stops_generate_and_train_cleanly_and_the_same_command_continues(smoke_data, tmp_path):
    # generate: Ctrl-C once blocks are written; the staging folder keeps them, nothing is published
    out = tmp_path / "data"
    gen = ["raypd.generate", "--samples", "200000", "--block-size", "2000", "--out", str(out), "--no-progress"]
    proc = start(gen)
    staging = tmp_path / ".data.staging"
    wait_for(lambda: len(list(staging.glob("part-*.parquet"))) >= 2, proc, "a generated block")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == f"raypd.generate: {STOPPED}", stderr[-2000:]
    assert not out.exists() and staging.exists()
    kept = {p.name: p.stat().st_mtime_ns for p in staging.glob("part-*.parquet")}
    result = run_cli(*gen, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    reused = [name for name, mtime in kept.items() if (out / name).stat().st_mtime_ns == mtime]
    assert len(reused) >= 2  # blocks finished before Ctrl-C were not made again
    assert json.loads((out / "_manifest.json").read_text())["samples"] == 200000

    # train (local mode): Ctrl-C after a few epochs; the same command continues from the last one
    run = tmp_path / "run"
    train = ["raypd.train", "--config", str(REPO / "tune_configs" / "base.yaml"), "--data", str(smoke_data),
             "--out", str(run), "--set", "train.epochs=300", "--set", "train.patience=300",
             "--set", "train.num_workers=0", "--set", "model.filters=[8]", "--set", "model.hidden=[8]"]
    proc = start(train)
    last = run / "checkpoints" / "last"

    def epochs_done() -> int:
        try:
            return read_state(last)["epoch"]
        except ValueError:  # not there yet, or caught mid-write
            return 0

    wait_for(lambda: epochs_done() >= 3, proc, "three epochs")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == f"raypd.train: {STOPPED}", stderr[-2000:]
    assert "raypd.train: epoch 1/300: train_loss" in stderr  # a progress line in a log
    stopped_at = read_state(last)
    assert not (run / "metrics.json").exists()
    result = run_cli(*train, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    done = read_state(last)
    assert done["epoch"] == 300 and done["history"][: stopped_at["epoch"]] == stopped_at["history"]
    assert f"raypd.train: epoch {stopped_at['epoch'] + 1}/300" in result.stderr


CHATTY_COMMAND = """
import sys
import time
from pathlib import Path
import ray
from raypd.cli import init_ray, run_main

started = Path(sys.argv[1])

def body():
    init_ray()

    @ray.remote
    def chatter():
        for i in range(4000):
            print(f"worker line {i}", file=sys.stderr, flush=True)
            if i == 50:
                started.touch()
            time.sleep(0.005)

    chatter.remote()
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # Ray is forwarding the task's lines to this process, and goes on
    raise KeyboardInterrupt

run_main("raypd.chatty", body)
"""


def test_the_closing_line_comes_after_every_line_ray_forwards_from_its_workers(tmp_path):
    # Ray forwards a worker's output to the driver from a thread, a moment late: a trial that
    # Tune stopped used to print "SystemExit: 1" below the command's closing line
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", CHATTY_COMMAND, str(tmp_path / "started")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert any("worker line" in line for line in lines), result.stderr[-2000:]  # Ray did forward them
    assert result.returncode == 130 and lines[-1] == f"raypd.chatty: {STOPPED}", result.stderr[-2000:]
