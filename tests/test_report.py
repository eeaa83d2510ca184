"""raypd.report and raypd.predict on a real smoke study: the pictures show data, predict
round-trips the study's own test metrics, and bad prediction inputs end with exit 2."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.dataset import load_dataset
from raypd.report import make_report
from raypd.train import dataset_dir
from raypd.tune import run_study
from tests.conftest import REPO, run_cli, snapshot

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    config = load_config(SMOKE)
    run_study(config, "smoke", root)
    return root, config


def test_report_pictures_show_the_data(study):
    import matplotlib.image

    root, _ = study
    report = make_report("smoke", root)
    page = report.read_text()
    names = ["curves.png", "true_vs_predicted.png", "resimulated.png", "parallel_coordinates.png", "contour.png",
             "intervals.png"]
    for name in names:
        assert f"src='{name}'" in page
        pixels = matplotlib.image.imread(report.parent / name)[..., :3]
        ink = (pixels.mean(axis=2) < 0.9).mean()  # share of non-white pixels
        colours = len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0))
        assert ink > 0.02 and colours > 20, (name, ink, colours)  # drawn data, not empty axes
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    assert summary["resimulation_mse"] is not None and np.isfinite(summary["resimulation_mse"])
    for trial in summary["trials"]:
        assert trial["trial_id"] in page
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raypd-smoke")
    best = client.search_runs([experiment.experiment_id], filter_string="tags.best_trial = 'true'")[0]
    logged = {a.path for a in client.list_artifacts(best.info.run_id, "report")}
    assert {f"report/{n}" for n in names + ["report.html"]} <= logged
    assert str(root) in best.info.artifact_uri  # under ROOT, not ./mlruns

    # refined through the ODE: far better than the 3-epoch model, most series identified, and
    # both kinds of interval near their level (90 test series: a wide band)
    refined = summary["refined"]
    for kind in ("clean", "noise_2pct"):
        r = refined[kind]
        assert r["refined_mse"] < 0.5 * r["model_mse"] and r["identified"] >= 0.7, (kind, r)
        for cover in ("coverage_model", "coverage_refined"):
            assert 0.75 <= r[cover]["all"] <= 1.0, (kind, cover, r[cover])
    assert "Refined through the ODE" in page
    assert best.data.metrics["test_clean_refined_mse"] == pytest.approx(refined["clean"]["refined_mse"])
    assert best.data.metrics["test_noise_2pct_coverage_refined"] == pytest.approx(
        refined["noise_2pct"]["coverage_refined"]["all"])


def test_a_report_without_mlflow_db_under_root_creates_none(study, tmp_path):
    import shutil

    root, _ = study
    shutil.copytree(root / "tune" / "smoke", tmp_path / "tune" / "smoke")  # tracked elsewhere
    assert make_report("smoke", tmp_path).exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_predict_round_trips_the_study_test_metrics(study, tmp_path):
    root, config = study
    data = dataset_dir(config, root)
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(data),
                     "--out", str(tmp_path / "pred.parquet"), timeout=120)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "pred.parquet").to_pydict()
    dataset = load_dataset(data)
    summary = json.loads((root / "tune" / "smoke" / "summary.json").read_text())
    from raypd.dataset import split_ids

    test = split_ids(dataset.sample_id, config.train.split, config.train.split_seed)["test"]
    y_pred = np.concatenate([np.array(table["params_pred"]), np.array(table["ic_pred"])], axis=1)[test]
    assert np.mean((y_pred - dataset.targets[test]) ** 2) == pytest.approx(summary["best_test_metrics"]["mse"])
    resim = np.array(table["series_resim"])
    assert resim.shape == (dataset.series.shape[0], dataset.series.shape[1] * dataset.series.shape[2])

    # one series as CSV gives the same prediction as inside the dataset
    times = np.asarray(dataset.manifest["time_points"])
    csv = tmp_path / "one.csv"
    rows = np.column_stack([times, dataset.series[5].T])
    np.savetxt(csv, rows, delimiter=",", header="time,u_1,a_1", comments="")
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(csv),
                     "--out", str(tmp_path / "one.parquet"), timeout=120)
    assert result.returncode == 0, result.stderr
    one = pq.read_table(tmp_path / "one.parquet").to_pydict()
    np.testing.assert_allclose(one["params_pred"][0], table["params_pred"][5], rtol=1e-5, atol=1e-6)


def test_predict_refine_fits_each_series_and_gives_intervals(study, tmp_path):
    """--refine on the whole smoke dataset (600 series, Ray Data blocks): the refined columns,
    mostly identified and exact where identified, and intervals around every estimate."""
    root, config = study
    data = dataset_dir(config, root)
    out = tmp_path / "refined.parquet"
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(data),
                     "--out", str(out), "--refine", "--level", "0.8", "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "identified by refinement" in result.stdout
    table = pq.read_table(out)
    assert table.schema.metadata[b"raypd_interval_level"] == b"0.8"
    columns = table.to_pydict()
    dataset = load_dataset(data)

    def both(prefix):
        return np.concatenate([np.array(columns[f"params_{prefix}"]), np.array(columns[f"ic_{prefix}"])], axis=1)

    truth = dataset.targets
    model, refined = both("pred"), both("refined")
    identified = np.array(columns["identified"])
    assert identified.mean() >= 0.8
    assert np.mean((refined - truth) ** 2) < 0.3 * np.mean((model - truth) ** 2)
    assert np.median(np.abs(refined - truth)[identified]) < 1e-4
    assert (np.array(columns["residual"])[identified] < 1e-4).all()
    assert (np.array(columns["starts"]) >= 1).all()
    for prefix, centre in (("", model), ("refined_", refined)):
        lower, upper = both(f"{prefix}lower"), both(f"{prefix}upper")
        assert (lower <= upper).all()
        if prefix:  # identified: around the refined estimate; else the model-only interval
            assert ((lower[identified] <= centre[identified]) & (centre[identified] <= upper[identified])).all()
        else:
            assert ((lower <= centre) & (centre <= upper)).all()
    # not identified: an interval around the model's estimate (calibrated on the calibration
    # series refinement did not identify either, or the model-only one where those were few)
    middle = 0.5 * (both("refined_lower") + both("refined_upper"))
    np.testing.assert_allclose(middle[~identified], model[~identified], atol=1e-9)


def test_a_study_of_an_older_raypd_still_predicts_without_intervals(study, tmp_path):
    """A best checkpoint without the interval calibration (raypd before intervals): predict
    gives its estimates and says there are no intervals, report leaves refinement out; --refine,
    which needs them, is exit 2."""
    import shutil

    import torch

    root, config = study
    shutil.copytree(root / "tune" / "smoke", tmp_path / "tune" / "smoke")
    summary = json.loads((tmp_path / "tune" / "smoke" / "summary.json").read_text())
    state = tmp_path / "tune" / "smoke" / "trials" / summary["best_trial_id"] / "checkpoints" / "best" / "state.pt"
    payload = torch.load(state, weights_only=True)
    del payload["meta"]["intervals"]
    torch.save(payload, state)
    data = str(dataset_dir(config, root))
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(tmp_path), "--input", data,
                     "--out", str(tmp_path / "p.parquet"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "has no interval calibration (an older raypd ran the study): estimates without intervals" in result.stderr
    columns = pq.read_table(tmp_path / "p.parquet").column_names
    assert "params_pred" in columns and "params_lower" not in columns
    before = snapshot(tmp_path)
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(tmp_path), "--input", data,
                     "--out", str(tmp_path / "r.parquet"), "--refine", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no interval calibration" in lines[0], result.stderr
    assert snapshot(tmp_path) == before
    # and its report, without the refined section
    result = run_cli("raypd.report", "--study", "smoke", "--root", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the test split is not refined" in result.stderr
    assert "Not refined: the best model has no interval calibration" in (tmp_path / "tune" / "smoke" / "report.html").read_text()
    assert json.loads((tmp_path / "tune" / "smoke" / "summary.json").read_text())["refined"] is None


@pytest.mark.parametrize("level", ["1.5", "0", "-0.2", "nan"])
def test_a_level_outside_0_1_exits_2(study, tmp_path, level):
    root, config = study
    before = snapshot(tmp_path)
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input",
                     str(dataset_dir(config, root)), "--out", str(tmp_path / "p.parquet"), "--refine",
                     f"--level={level}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "interval level must be a number in (0, 1)" in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("csv_text, message", [
    ("time,u_1,a_1,u_2\n0,1,0,1\n1,1,0,1\n", "columns must be time, u_1, a_1 for this study's n=1"),
    ("time,u_1,a_1\n0,1,0\n", "1 time points: need at least 2"),
    ("time,u_1,a_1\n0,1,0\n1,nan,0\n2,1,0\n", "holds empty, NaN or infinite values"),
    ("time,u_1,a_1\n0,1,0\n0,1,0\n", "the time column must increase"),
    ("", "an empty file; a CSV needs a header time,u_1,a_1"),
])
def test_bad_prediction_input_exits_2(study, tmp_path, csv_text, message):
    root, _ = study
    (tmp_path / "in.csv").write_text(csv_text)
    before = snapshot(tmp_path)
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(tmp_path / "in.csv"),
                     "--out", str(tmp_path / "out.parquet"), timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_report_and_predict_read_the_study_folder_where_it_now_is(study, tmp_path):
    import shutil

    root, config = study
    shutil.copytree(root / "tune" / "smoke", tmp_path / "tune" / "smoke")
    summary_file = tmp_path / "tune" / "smoke" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["best_checkpoint"] = "/nowhere/checkpoints/best"  # as after moving ROOT
    summary_file.write_text(json.dumps(summary))
    assert make_report("smoke", tmp_path).exists()
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(tmp_path), "--input",
                     str(dataset_dir(config, root)), "--out", str(tmp_path / "p.parquet"), timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("damage, message", [
    ("summary a list", "summary.json must hold a JSON object (got list)"),
    ("no study.json", "study.json does not exist"),
    ("best checkpoint cut short", "not a readable checkpoint"),
    ("--out not parquet", "must name a .parquet file"),
])
def test_a_damaged_study_folder_exits_2_and_changes_nothing(study, tmp_path, damage, message):
    import shutil

    root, config = study
    study_dir = tmp_path / "tune" / "smoke"
    shutil.copytree(root / "tune" / "smoke", study_dir)
    summary = json.loads((study_dir / "summary.json").read_text())
    if damage == "summary a list":
        (study_dir / "summary.json").write_text("[]")
    elif damage == "no study.json":
        (study_dir / "study.json").unlink()
    elif damage == "best checkpoint cut short":
        state = study_dir / "trials" / summary["best_trial_id"] / "checkpoints" / "best" / "state.pt"
        state.write_bytes(state.read_bytes()[:200])
    before = snapshot(tmp_path)
    out = tmp_path / ("p.csv" if damage == "--out not parquet" else "p.parquet")
    for args in (["raypd.report"], ["raypd.predict", "--input", str(dataset_dir(config, root)), "--out", str(out)]):
        if damage == "--out not parquet" and args[0] == "raypd.report":
            continue
        result = run_cli(*args, "--study", "smoke", "--root", str(tmp_path), timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_report_of_a_missing_study_exits_2(tmp_path):
    result = run_cli("raypd.report", "--study", "smoke", "--root", str(tmp_path))
    assert result.returncode == 2 and "summary.json does not exist" in result.stderr
