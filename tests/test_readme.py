"""The README as a newcomer runs it: its commands, typed as they stand, from a fresh copy of the
repository as the current folder (relative paths, the default ROOT `runs`), small sizes only
through --set, and every study file in tune_configs/. Each command must end with exit 0, write
the files the README promises, and print only its own lines (no traceback, no Ray/Tune chatter
that does not help its user). Every command run here is checked to stand in the README verbatim,
so that the README and this test change together."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from raypd.config import load_config
from tests.conftest import REPO, free_port, stop_group

README = " ".join((REPO / "README.md").read_text().split())  # whitespace-normalised
SMOKE_DATA = "runs/data/n1-k600-s42-67969f8b89"  # the smoke study's dataset, as the README names it
# what no command should print: Ray's token and Ray Data's INFO lines, Tune's hints at tools
# raypd does not use, terminal colour codes in a log, Train's per-report lines
CHATTER = ["Traceback", "Token authentication is enabled", "INFO streaming_executor", "tensorboard --logdir",
           "Tuner.restore(", "\x1b[", "Reporting training result", "A new study created"]


def in_readme(command: str) -> str:
    assert " ".join(command.split()) in README, f"not in README.md: {command}"
    return command


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh copy of the repository (what `git clone` gives), the newcomer's current folder."""
    out = tmp_path_factory.mktemp("newcomer") / "raypd"
    shutil.copytree(REPO, out, ignore=shutil.ignore_patterns(".git", "runs", "mlflow.db", "mlruns", "__pycache__",
                                                             ".device", "*.egg-info", ".pytest_cache", "pred.parquet"))
    return out


def shell(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`command` as a user types it in bash, in `cwd`; never joins a cluster outside this test."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def own_output(result: subprocess.CompletedProcess, prog: str) -> None:
    """Exit 0; every line raypd prints is labelled with this command; none of Ray's chatter."""
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    # Ray Train's PlacementGroupCleaner actor calls Ray's state API without an address and
    # prints a traceback ("Found multiple active Ray instances") while another Ray runs on the
    # same machine (another test run, a second command): Ray's, and nothing failed
    text = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                     if not line.startswith("(PlacementGroupCleaner pid="))
    for word in CHATTER:
        assert word not in text, (word, text[-5000:])
    labels = set(re.findall(r"(?m)^(?:\(\S+ pid=\d+\) )?(raypd\.\w+):", text))
    assert labels <= {prog}, (labels, text[-3000:])


def serving(command: str, cwd: Path, url: str, seconds: float = 180) -> bytes:
    """Start a server command as a user would, wait for `url` to answer, return its body, stop it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    log = cwd / f"server-{free_port()}.log"
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + seconds
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return answer.read()
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"{command}: no answer at {url} in {seconds} s"
                time.sleep(0.5)
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def quickstart(clone):
    """The Quickstart's main job, as typed (the install is this test run's)."""
    command = in_readme("pip install -e . && python -m raypd.tune --study smoke").split(" && ")[1]
    result = shell(command, clone)
    own_output(result, "raypd.tune")
    return result


def test_the_quickstart_runs_a_small_study_and_says_what_its_figure_is(clone, quickstart):
    study = clone / "runs" / "tune" / "smoke"
    summary = json.loads((study / "summary.json").read_text())
    assert summary["num_trials"] == 4 and summary["best_test_metrics"]["mse"] > 0
    assert (clone / "runs" / "mlflow.db").exists() and (study / "optuna.db").exists()
    assert (clone / SMOKE_DATA / "_manifest.json").exists()  # the folder the README's next commands read
    assert f"best: {summary['best_trial_id']}" in quickstart.stdout
    assert "a smoke run's figure (600 samples, at most 3 epochs a trial)" in quickstart.stdout


def test_the_runs_show_in_mlflow_ui_optuna_dashboard_and_optunas_plots(clone, quickstart):
    in_readme("mlflow ui --backend-store-uri sqlite:///runs/mlflow.db")
    port = free_port()
    body = serving(f"mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --host 127.0.0.1 --port {port}", clone,
                   f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=raypd-smoke")
    assert json.loads(body)["experiment"]["name"] == "raypd-smoke"

    in_readme("optuna-dashboard sqlite:///runs/tune/NAME/optuna.db")
    port = free_port()
    body = serving(f"optuna-dashboard sqlite:///runs/tune/smoke/optuna.db --host 127.0.0.1 --port {port}", clone,
                   f"http://127.0.0.1:{port}/api/studies")
    assert "raypd-smoke" in body.decode()

    in_readme("`optuna.load_study(...)` gives the notebook's `plot_parallel_coordinate` / `plot_contour`")
    import optuna

    study = optuna.load_study(study_name="raypd-smoke", storage=f"sqlite:///{clone / 'runs/tune/smoke/optuna.db'}")
    summary = json.loads((clone / "runs/tune/smoke/summary.json").read_text())
    # the dashboard's value of a trial is summary.json's (its best val_loss), ASHA-stopped or not
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(t["val_loss"] for t in summary["trials"]))
    assert optuna.visualization.plot_parallel_coordinate(study) is not None  # plotly, from the install
    assert optuna.visualization.plot_contour(study) is not None


def test_report_predict_and_the_registered_model_as_the_readme_types_them(clone, quickstart):
    result = shell(in_readme("python -m raypd.report --study smoke"), clone)
    own_output(result, "raypd.report")
    report = clone / "runs" / "tune" / "smoke" / "report.html"
    assert Path(clone, result.stdout.strip().splitlines()[-1]).resolve() == report.resolve()
    for picture in ("curves.png", "true_vs_predicted.png", "resimulated.png", "parallel_coordinates.png",
                    "contour.png", "intervals.png"):
        assert (report.parent / picture).stat().st_size > 10_000, picture

    command = in_readme(f"python -m raypd.predict --study smoke --input {SMOKE_DATA} --out pred.parquet")
    result = shell(command, clone)
    own_output(result, "raypd.predict")
    import pyarrow.parquet as pq

    assert pq.read_table(clone / "pred.parquet").num_rows == 600

    command = in_readme(
        "MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db python -c \"import mlflow, raypd.dataset as d; X = "
        f"d.load_dataset('{SMOKE_DATA}').series[:3]; print(mlflow.pyfunc.load_model('models:/raypd-smoke/latest')"
        ".predict(X))\"")
    result = shell(command, clone)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"\[", result.stdout)) >= 4  # a (3, 6) array printed

    serve = in_readme("MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db mlflow models serve -m models:/raypd-smoke/latest "
                      "--env-manager local --host 127.0.0.1 --port 5001")
    ask = in_readme("python -c \"import json, raypd.dataset as d; print(json.dumps({'inputs': "
                    f"d.load_dataset('{SMOKE_DATA}').series[:3].tolist()}}))\" | curl -s -X POST -H "
                    "'Content-Type: application/json' --data @- http://127.0.0.1:5001/invocations")
    port = str(free_port())  # not 5001: another program may hold it on this machine
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen(["bash", "-c", serve.replace("5001", port)], cwd=clone, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow models serve did not answer"
                time.sleep(0.5)
        answer = shell(ask.replace("5001", port), clone, timeout=60)
        assert answer.returncode == 0 and len(json.loads(answer.stdout)["predictions"]) == 3, answer
    finally:
        stop_group(proc)


def test_the_training_command_as_typed_with_the_default_relative_root(clone):
    """`--root runs` (the default) is relative: Ray Train's storage wants an absolute path."""
    in_readme("python -m raypd.train --config tune_configs/base.yaml")
    result = shell("python -m raypd.train --config tune_configs/base.yaml --set data.samples=300 "
                   "--set train.epochs=2", clone)
    own_output(result, "raypd.train")
    out = clone / "runs" / "train" / "base"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2
    assert (out / "predictions.parquet").exists() and (out / "checkpoints" / "best" / "state.pt").exists()
    epoch_lines = [line for line in result.stderr.splitlines() if "raypd.train: epoch" in line]
    assert len(epoch_lines) == 2, result.stderr[-3000:]  # each epoch once (Train's print patch doubled them)


def test_generate_with_defaults_writes_under_runs_data(clone):
    result = shell("python -m raypd.generate --samples 300 --no-progress", clone)
    own_output(result, "raypd.generate")
    folder = Path(result.stdout.split(":")[0])
    assert folder.parent == clone / "runs" / "data" and folder.name.startswith("n1-k300-s42-")
    assert (folder / "_manifest.json").exists()


# every study file, small: a study must run as listed (base has no search space at all)
STUDIES = sorted(p.stem for p in (REPO / "tune_configs").glob("*.yaml"))
SMALL = ["data.samples=200", "train.epochs=1", "search.num_samples=1"]


@pytest.fixture(scope="module")
def studies_folder(tmp_path_factory) -> Path:
    """One current folder for every study file's run: studies of one data section share its
    dataset under runs/data, as a user's would."""
    return tmp_path_factory.mktemp("studies")


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_file_runs_from_a_relative_root(ray_local, studies_folder, monkeypatch, name):
    from raypd.tune import run_study

    in_readme(f"`{name}`")  # the README lists it
    monkeypatch.chdir(studies_folder)
    config = load_config(str(REPO / "tune_configs" / f"{name}.yaml"), SMALL)
    summary = run_study(config, name, "runs")
    assert summary["num_trials"] == 1 and summary["trials"][0]["status"] == "TERMINATED", summary["trials"]
    assert summary["best_test_metrics"] is not None
    assert (studies_folder / "runs" / "tune" / name / "summary.json").exists()
