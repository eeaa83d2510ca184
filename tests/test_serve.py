"""A finished study's best model in use (issue 13): it carries its normalisation (predict and
report work with ROOT/data gone), it is registered in MLflow as raypd-<study> (idempotently),
and `mlflow models serve` and mlflow.pyfunc answer as raypd.predict does."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.dataset import load_dataset
from raypd.report import make_report
from raypd.dataio import file_digest
from raypd.serve import SavedModel
from raypd.tracking import register_best
from raypd.config import dataset_dir
from raypd.tune import run_study
from tests.conftest import REPO, free_port, run_cli, snapshot, stop_group

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")
N = 5  # series sent to the served model


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    """A small smoke study (2 trials, 1 epoch each), registered when it finishes."""
    root = tmp_path_factory.mktemp("root")
    config = load_config(SMOKE, ["search.num_samples=2", "train.epochs=1"])
    summary = run_study(config, "smoke", root)
    return root, config, summary


def versions(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return sorted(client.search_model_versions("name = 'raypd-smoke'"), key=lambda v: int(v.version))


def predicted(root: Path, input_path: Path, out: Path, study: str = "smoke") -> np.ndarray:
    result = run_cli("raypd.predict", "--study", study, "--root", str(root), "--input", str(input_path),
                     "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out).to_pydict()
    return np.concatenate([np.array(table["params_pred"]), np.array(table["ic_pred"])], axis=1)


@pytest.fixture(scope="module")
def predictions(study, tmp_path_factory):
    """raypd.predict's output on the study's whole dataset: (series, params then ic)."""
    root, config, _ = study
    data = dataset_dir(config, root)
    return load_dataset(data).series, predicted(root, data, tmp_path_factory.mktemp("pred") / "all.parquet")


def test_checkpoint_carries_its_normalisation(study):
    root, config, summary = study
    model = SavedModel.load(summary["best_checkpoint"])
    meta = model.meta
    assert meta["input_norm"] == {"kind": "sample+scale", "groups": [[0], [1]], "mean_shift": False}
    assert meta["input_channels"] == 4  # the series' 2 channels and their 2 scales
    assert meta["target_names"] == summary["best_test_metrics"]["target_names"]
    assert meta["series_shape"] == [2, 101] and len(meta["time_points"]) == 101
    assert meta["constant_targets"] == {"mu_1": 0.0} and meta["target_varying"][1] is False
    assert meta["model_config"]["filters"] == [16] and meta["n_outputs"] == 5
    # plain data only: the weights_only loader reads it
    assert torch.load(Path(summary["best_checkpoint"]) / "state.pt", weights_only=True)["meta"] == meta


def test_registered_once_and_again_only_when_the_best_model_changes(study):
    root, config, summary = study
    assert "MLFLOW_REGISTRY_URI" not in os.environ  # registering leaves MLflow's process-wide registry alone
    [v1] = versions(root)
    assert v1.tags["checkpoint_sha256"] == file_digest(Path(summary["best_checkpoint"]) / "state.pt")
    assert v1.tags["trial_id"] == summary["best_trial_id"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    best_run = client.get_run(v1.run_id)
    assert best_run.data.tags["best_trial"] == "true" and best_run.data.tags["registered_model"] == "raypd-smoke/1"
    model = client.get_logged_model(v1.source.removeprefix("models:/"))
    assert model.source_run_id == v1.run_id
    assert str(root / "mlartifacts") in model.artifact_location  # under ROOT, not ./mlruns
    assert (Path(model.artifact_location.removeprefix("file://")) / "MLmodel").exists()

    # re-running the finished study registers nothing new
    before = snapshot(root / "tune")
    assert run_study(config, "smoke", root)["best_checkpoint"] == summary["best_checkpoint"]
    assert [int(v.version) for v in versions(root)] == [1] and snapshot(root / "tune") == before

    # a changed best checkpoint is a new version (and then, again, nothing more)
    study_dir = root / "tune" / "smoke"
    checkpoint = Path(summary["best_checkpoint"]) / "state.pt"
    saved = checkpoint.read_bytes()
    try:
        payload = torch.load(checkpoint, weights_only=True)
        payload["model"] = {k: v * 1.01 for k, v in payload["model"].items()}
        torch.save(payload, checkpoint)
        register_best("smoke", summary, f"sqlite:///{root / 'mlflow.db'}", study_dir)
        register_best("smoke", summary, f"sqlite:///{root / 'mlflow.db'}", study_dir)
        assert [int(v.version) for v in versions(root)] == [1, 2]
    finally:
        checkpoint.write_bytes(saved)
        register_best("smoke", summary, f"sqlite:///{root / 'mlflow.db'}", study_dir)  # back to these weights
    assert [int(v.version) for v in versions(root)] == [1, 2, 3]


def test_pyfunc_gives_what_predict_writes(study, predictions):
    import mlflow

    root, _, _ = study
    series, y_predict = predictions
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/raypd-smoke/latest")
        y = model.predict(series[:N])
        with_intervals = model.predict(series[:N], params={"interval_level": 0.9})
        with pytest.raises(mlflow.exceptions.MlflowException, match=r"interval level must be a number in \(0, 1\)"):
            model.predict(series[:N], params={"interval_level": 1.5})
        with pytest.raises(mlflow.exceptions.MlflowException, match="NaN or infinite"):
            bad = series[:2].copy()
            bad[1, 0, 3] = np.nan
            model.predict(bad)
        with pytest.raises(mlflow.exceptions.MlflowException, match="does not match expected shape"):
            model.predict(series[:2, :1])
    finally:
        mlflow.set_tracking_uri(None)
    assert y.shape == (N, 6)
    np.testing.assert_allclose(y, y_predict[:N], rtol=1e-5, atol=1e-6)
    assert set(with_intervals) == {"estimate", "lower", "upper"}
    np.testing.assert_allclose(with_intervals["estimate"], y, rtol=1e-6)
    assert (with_intervals["lower"] <= y).all() and (y <= with_intervals["upper"]).all()
    assert (with_intervals["upper"] - with_intervals["lower"])[:, [0, 2, 3, 4, 5]].min() > 0  # mu_1 is constant


@pytest.mark.parametrize("norm", ["sample", "sample+scale", "global"])
def test_each_input_norm_round_trips_through_training_predict_and_the_mlflow_model(study, norm, tmp_path):
    """A one-trial study per train.input_norm on the smoke data: the checkpoint names the
    normalisation, and raypd.predict, the registered MLflow model and the study's own test
    metrics all agree. (The HTTP server runs the same pyfunc model: served once, below.)"""
    root, _, _ = study
    name = "norm-" + norm.replace("+", "-")
    config = load_config(SMOKE, ["search.num_samples=1", "train.epochs=1", f"train.input_norm={norm}"])
    summary = run_study(config, name, root)
    meta = SavedModel.load(summary["best_checkpoint"]).meta
    assert meta["input_norm"]["kind"] == norm
    assert meta["input_channels"] == (4 if norm == "sample+scale" else 2) and meta["series_shape"] == [2, 101]
    round_trip(root, name, config, summary, tmp_path)


def round_trip(root: Path, name: str, config, summary: dict, tmp_path: Path) -> np.ndarray:
    """raypd.predict on the study's whole dataset, the registered MLflow model and the
    study's own test metrics agree; returns predict's output."""
    import mlflow

    data = dataset_dir(config, root)
    dataset = load_dataset(data)
    y_predict = predicted(root, data, tmp_path / "pred.parquet", study=name)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        y_model = mlflow.pyfunc.load_model(f"models:/raypd-{name}/latest").predict(dataset.series[:N])
    finally:
        mlflow.set_tracking_uri(None)
    np.testing.assert_allclose(y_model, y_predict[:N], rtol=1e-5, atol=1e-6)
    test = pq.read_table(root / "tune" / name / "test_split.parquet").to_pydict()
    rows = np.searchsorted(dataset.sample_id, np.array(test["sample_id"]))
    mse = float(((y_predict[rows] - np.array(test["targets"])) ** 2).mean())
    assert mse == pytest.approx(summary["best_test_metrics"]["mse"], rel=1e-4)
    return y_predict


@pytest.fixture
def without_data(study, tmp_path):
    """ROOT/data moved away for the test (and back afterwards)."""
    root, config, _ = study
    data = dataset_dir(config, root)
    away = tmp_path / "moved" / data.name
    shutil.move(root / "data", tmp_path / "moved")
    try:
        yield away
    finally:
        shutil.move(tmp_path / "moved", root / "data")


def test_predict_and_report_work_without_the_dataset(study, predictions, without_data, tmp_path):
    root, _, summary = study
    assert not (root / "data").exists()
    series, y_predict = predictions
    # a dataset folder elsewhere, and one series as CSV
    y = predicted(root, without_data, tmp_path / "moved.parquet")
    np.testing.assert_allclose(y, y_predict, rtol=1e-5, atol=1e-6)
    times = np.asarray(load_dataset(without_data).manifest["time_points"])
    np.savetxt(tmp_path / "one.csv", np.column_stack([times, series[3].T]), delimiter=",", header="time,u_1,a_1",
               comments="")
    from raypd.predict import predict  # in this process: the CLI ran above

    predict("smoke", root, tmp_path / "one.csv", tmp_path / "one.parquet")
    table = pq.read_table(tmp_path / "one.parquet").to_pydict()
    y = np.concatenate([table["params_pred"][0], table["ic_pred"][0]])
    np.testing.assert_allclose(y, y_predict[3], rtol=1e-5, atol=1e-6)

    report = make_report("smoke", root)
    assert "re-simulation MSE" in report.read_text()
    after = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    assert np.isfinite(after["resimulation_mse"])
    assert after["best_test_metrics"] == summary["best_test_metrics"]


def test_a_checkpoint_without_saved_normalisation_exits_2(study, tmp_path):
    """A study run by an older raypd: its checkpoint has no `meta`."""
    root, config, summary = study
    old_root = tmp_path / "old"
    study_dir = old_root / "tune" / "smoke"
    best = study_dir / "trials" / summary["best_trial_id"] / "checkpoints" / "best"
    best.mkdir(parents=True)
    payload = torch.load(Path(summary["best_checkpoint"]) / "state.pt", weights_only=True)
    del payload["meta"]
    torch.save(payload, best / "state.pt")
    shutil.copy(root / "tune" / "smoke" / "study.json", study_dir / "study.json")
    (study_dir / "summary.json").write_text(json.dumps({**summary, "best_checkpoint": str(best)}))
    np.savetxt(tmp_path / "one.csv", np.column_stack([np.arange(101.0), np.ones((101, 2))]), delimiter=",",
               header="time,u_1,a_1", comments="")
    before = snapshot(tmp_path)
    for args in (["raypd.predict", "--input", str(tmp_path / "one.csv"), "--out", str(tmp_path / "p.parquet")],
                 ["raypd.report"]):
        result = run_cli(*args, "--study", "smoke", "--root", str(old_root), timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "checkpoint without its saved normalisation" in lines[0] and "re-run the study" in lines[0]
        assert snapshot(tmp_path) == before


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextlib.contextmanager
def serving(root: Path, name: str, tmp_path: Path):
    """`mlflow models serve -m models:/raypd-NAME/latest` on a free port of 127.0.0.1, ended by
    its process group."""
    port = free_port()
    cli = Path(sys.executable).with_name("mlflow")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "mlflow"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_REGISTRY_URI")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([*command, "models", "serve", "-m", f"models:/raypd-{name}/latest", "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(0.5)
        yield port
    finally:
        stop_group(proc, timeout=20)
        log.close()


@pytest.fixture
def served(study, tmp_path):
    with serving(study[0], "smoke", tmp_path) as port:
        yield port


@pytest.mark.slow
def test_served_model_answers_as_predict_does(served, predictions):
    series, y_predict = predictions
    status, answer = post(served, json.dumps({"inputs": series[:N].tolist()}).encode())
    assert status == 200, answer
    y = np.array(answer["predictions"])
    assert y.shape == (N, 6)
    np.testing.assert_allclose(y, y_predict[:N], rtol=1e-5, atol=1e-6)

    nan = series[:2].tolist()
    nan[1][0][3] = float("nan")  # json writes NaN, which Python's (and MLflow's) parser reads
    bad = {"wrong shape": json.dumps({"inputs": series[:2, :1].tolist()}).encode(),
           "NaN": json.dumps({"inputs": nan}).encode(),
           "not numbers": b'{"inputs": "x"}',
           "not JSON": b"{inputs",
           "other key": json.dumps({"series": series[:1].tolist()}).encode()}
    for what, body in bad.items():
        status, answer = post(served, body)
        assert 400 <= status < 600 and "error_code" in answer and answer["message"], (what, status, answer)
    status, answer = post(served, json.dumps({"inputs": series[:1].tolist()}).encode())
    assert status == 200 and np.allclose(answer["predictions"], y_predict[:1], rtol=1e-5, atol=1e-6)
    # intervals on request, through MLflow's inference params
    status, answer = post(served, json.dumps({"inputs": series[:2].tolist(),
                                              "params": {"interval_level": 0.9}}).encode())
    assert status == 200, answer
    got = {k: np.array(v) for k, v in answer["predictions"].items()}
    np.testing.assert_allclose(got["estimate"], y_predict[:2], rtol=1e-5, atol=1e-6)
    assert (got["lower"] <= got["estimate"]).all() and (got["estimate"] <= got["upper"]).all()
    status, answer = post(served, json.dumps({"inputs": series[:2].tolist(),
                                              "params": {"interval_level": 2.0}}).encode())
    assert 400 <= status < 500 and "interval level" in answer["message"], answer


# --------------------------------------------------------------------------- model families (issue 31)

FAMILY_SETS = {
    "fam-resnet": ["model.family=resnet", "model.blocks=3", "model.width=8", "model.norm=batch",
                   "model.activation=gelu", "train.optimizer=adamw", "train.schedule=onecycle"],
    "fam-cnn": ["model.filters=[8, 8]", "model.kernel_sizes=[3, 5]", "model.norm=layer", "model.activation=silu",
                "train.optimizer=sgd", "train.schedule=cosine", "train.lr=0.01"],
}


@pytest.fixture(scope="module")
def families(study):
    """A one-trial study per family at n=2 (on one dataset), trained with relabelling and
    predicting as the mean over relabellings, each registered when it finishes."""
    root, _, _ = study
    out = {}
    for name, sets in FAMILY_SETS.items():
        config = load_config(SMOKE, ["search.num_samples=1", "train.epochs=2", "data.n_actions=2", "train.relabel=true",
                                     "model.average_relabellings=true", *sets])
        out[name] = config, run_study(config, name, root)
    return out


@pytest.mark.parametrize("name", list(FAMILY_SETS))
def test_each_family_round_trips_through_training_predict_and_the_mlflow_model(study, families, name, tmp_path):
    """The checkpoint, raypd.predict, the registered MLflow model and the study's own test
    metrics agree for either family (and a model that averages over relabellings)."""
    root, _, _ = study
    config, summary = families[name]
    model = SavedModel.load(summary["best_checkpoint"])
    assert model.config == config.model and type(model.net).__name__ == {"fam-resnet": "ResNet1D",
                                                                         "fam-cnn": "CNN1D"}[name]
    assert model.meta["series_shape"] == [4, 101] and model.config.average_relabellings
    y_predict = round_trip(root, name, config, summary, tmp_path)
    assert y_predict.shape == (600, 16)
    series = load_dataset(dataset_dir(config, root)).series[:N]
    np.testing.assert_allclose(model.predict(series), y_predict[:N], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_served_residual_model_answers_as_predict_does(study, families, tmp_path):
    root, _, _ = study
    config, _ = families["fam-resnet"]
    data = dataset_dir(config, root)
    series = load_dataset(data).series[:N]
    y_predict = predicted(root, data, tmp_path / "pred.parquet", study="fam-resnet")[:N]
    with serving(root, "fam-resnet", tmp_path) as port:
        status, answer = post(port, json.dumps({"inputs": series.tolist()}).encode())
    assert status == 200, answer
    np.testing.assert_allclose(np.array(answer["predictions"]), y_predict, rtol=1e-5, atol=1e-6)
