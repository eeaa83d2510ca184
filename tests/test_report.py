"""raypd.report and raypd.predict on a real smoke study: the pictures show data, predict
round-trips the study's own test metrics (Parquet and CSV, a column per target), refinement
flags the targets a series does not determine, and bad prediction inputs end with exit 2."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from raypd.config import load_config
from raypd.dataset import load_dataset
from raypd.report import make_report
from raypd.config import dataset_dir
from raypd.tune import run_study
from tests.conftest import REPO, run_cli, snapshot

SMOKE = str(REPO / "tune_configs" / "smoke.yaml")
NAMES = ["g_1", "mu_1", "Pi_11", "Gamma_11", "v0_1", "m0_1"]  # n=1, layout order


def both(columns: dict, prefix: str) -> np.ndarray:
    """(N, q) from the list columns params_<prefix> and ic_<prefix>."""
    return np.concatenate([np.array(columns[f"params_{prefix}"]), np.array(columns[f"ic_{prefix}"])], axis=1)


def per_target(columns: dict, suffix: str = "") -> np.ndarray:
    """(N, q) from the per-target columns <target><suffix>."""
    return np.column_stack([np.asarray(columns[f"{name}{suffix}"]) for name in NAMES])


def read_csv_columns(path) -> dict:
    """A predict CSV read with the csv module: the header, then {column: values} (floats as
    float, true/false as bool, empty as NaN)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    assert all(len(row) == len(header) for row in body)

    def value(cell):
        return {"true": True, "false": False}.get(cell, float(cell) if cell else np.nan)

    return {name: np.array([value(row[k]) for row in body]) for k, name in enumerate(header)}


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
        for cover in ("coverage_model", "coverage_refined"):  # not 1.0: unbounded intervals fail
            assert 0.75 <= r[cover]["all"] <= 0.985, (kind, cover, r[cover])
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

    # a column per target, named, equal to the list columns; the names in the file's metadata
    metadata = pq.read_schema(tmp_path / "pred.parquet").metadata
    assert json.loads(metadata[b"raypd_target_names"]) == NAMES
    np.testing.assert_array_equal(per_target(table), both(table, "pred"))
    np.testing.assert_array_equal(per_target(table, "_lower"), both(table, "lower"))
    np.testing.assert_array_equal(per_target(table, "_upper"), both(table, "upper"))
    np.testing.assert_array_equal(per_target(table, "_width"), both(table, "upper") - both(table, "lower"))

    # the same predictions as a CSV a spreadsheet opens: the csv module and pandas read the same
    # numbers, to the last bit, and no list column
    import pandas as pd

    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(data),
                     "--out", str(tmp_path / "pred.csv"), timeout=120)
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "pred.csv").read_text().splitlines()[0].split(",")
    assert header == ["sample_id"] + [f"{name}{kind}" for name in NAMES for kind in ("", "_lower", "_upper", "_width")]
    frame = pd.read_csv(tmp_path / "pred.csv")
    rows = read_csv_columns(tmp_path / "pred.csv")
    np.testing.assert_array_equal(frame["sample_id"], table["sample_id"])
    for suffix in ("", "_lower", "_upper", "_width"):
        np.testing.assert_array_equal(per_target(frame, suffix), per_target(table, suffix))
        np.testing.assert_array_equal(per_target(rows, suffix), per_target(table, suffix))

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
    assert json.loads(table.schema.metadata[b"raypd_target_names"]) == NAMES
    columns = table.to_pydict()
    dataset = load_dataset(data)

    truth = dataset.targets
    model, refined = both(columns, "pred"), both(columns, "refined")
    identified = np.array(columns["identified"])
    determined = per_target(columns, "_determined")
    assert determined.dtype == bool
    assert identified.mean() >= 0.8
    assert np.mean((refined - truth) ** 2) < 0.3 * np.mean((model - truth) ** 2)
    assert np.median(np.abs(refined - truth)[identified]) < 1e-4
    assert (np.array(columns["residual"])[identified] < 1e-4).all()
    assert (np.array(columns["starts"]) >= 1).all()
    # each series' status says what identified does, and a series not identified says why
    status, reason = np.array(columns["fit_status"]), np.array(columns["fit_reason"])
    np.testing.assert_array_equal(status == "identified", identified)
    assert set(status) <= {"identified", "undetermined", "not fitted"} and (reason[identified] == "").all()
    assert all(r for r in reason[~identified]), reason[~identified]
    # the per-target columns are the list columns
    for suffix, prefix in (("_refined", "refined"), ("_refined_lower", "refined_lower"),
                           ("_refined_upper", "refined_upper")):
        np.testing.assert_array_equal(per_target(columns, suffix), both(columns, prefix))
    np.testing.assert_array_equal(per_target(columns, "_refined_width"),
                                  both(columns, "refined_upper") - both(columns, "refined_lower"))
    # every estimate in its own interval, every row, both kinds
    for prefix, centre in (("", model), ("refined_", refined)):
        lower, upper = both(columns, f"{prefix}lower"), both(columns, f"{prefix}upper")
        assert ((lower <= centre) & (centre <= upper)).all(), prefix
    # identified: every target determined (mu, fixed, always); a target not determined keeps
    # the model's estimate, with an interval around it (calibrated on the calibration series
    # refinement did not identify either, or the model-only one where those were few)
    assert determined[identified].all() and determined[:, NAMES.index("mu_1")].all()
    np.testing.assert_array_equal(refined[~determined], model[~determined])
    middle = 0.5 * (both(columns, "refined_lower") + both(columns, "refined_upper"))
    np.testing.assert_allclose(middle[~determined], model[~determined], atol=1e-9)


def test_predict_refine_does_not_invent_what_a_series_does_not_show(study, tmp_path):
    """A series whose desire stays below mu = 0 (the smoke study fixes mu) for the whole span:
    u = 0 throughout, so g, Pi and v(0) leave no trace. Refined, v0_1 is flagged not
    determined and reported as the model's estimate inside its model-only interval (not the
    optimiser's v(0) = 0); Gamma and m(0), which the decaying effort shows, are determined and
    fitted where a start explains the series (the 3-epoch model's starts usually do; else
    they too keep the model's estimate); the CSV says the same to the last digit."""
    import pandas as pd

    from raypd import ode

    root, config = study
    times = config.data.times()
    theta = np.array([0.01, 0.0, 1.0, 0.5, -3.84, 2.0])  # g, mu, Pi, Gamma, v0, m0
    series, ok = ode.solve(theta[None, :4], theta[None, 4:], times, 1)
    assert ok[0] and np.all(series[0, 0] == 0.0)
    csv_in = tmp_path / "hidden.csv"
    np.savetxt(csv_in, np.column_stack([times, series[0].T]), delimiter=",", header="time,u_1,a_1", comments="",
               fmt="%.17g")
    for name in ("hidden.parquet", "hidden.csv"):
        result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(csv_in),
                         "--out", str(tmp_path / "out" / name), "--refine", "--no-progress", timeout=600)
        assert result.returncode == 0, result.stderr
    row = {k: v[0] for k, v in pq.read_table(tmp_path / "out" / "hidden.parquet").to_pydict().items()}
    flags = {name: row[f"{name}_determined"] for name in NAMES}
    explained = row["residual"] < 1e-4
    assert not row["identified"], row
    assert flags == {"g_1": False, "mu_1": True, "Pi_11": False, "Gamma_11": explained, "v0_1": False,
                     "m0_1": explained}, row
    hidden = ("g_1", "Pi_11", "v0_1") + (() if explained else ("Gamma_11", "m0_1"))
    if explained:  # and says why, in words
        assert row["fit_status"] == "undetermined", row
        assert row["fit_reason"] == "v_1 never above mu_1; not determined: g_1, Pi_11, v0_1", row
    else:
        assert row["fit_status"] == "not fitted" and row["fit_reason"], row
    for name in hidden:
        assert row[f"{name}_refined"] == row[name]  # the model's estimate
        assert row[f"{name}_refined_lower"] <= row[f"{name}_refined"] <= row[f"{name}_refined_upper"]
        assert row[f"{name}_refined_width"] > 0.1  # an honest, model-only width
    for j, name in ((3, "Gamma_11"), (5, "m0_1")) if explained else ():
        assert abs(row[f"{name}_refined"] - theta[j]) < 1e-6, row
        assert row[f"{name}_refined_lower"] <= row[f"{name}_refined"] <= row[f"{name}_refined_upper"]
        # a clean fit's interval is narrow, and its width is its own column, not two equal bounds
        assert 0 <= row[f"{name}_refined_width"] < 1e-4
        assert row[f"{name}_refined_width"] == row[f"{name}_refined_upper"] - row[f"{name}_refined_lower"]
    frame = pd.read_csv(tmp_path / "out" / "hidden.csv")
    assert len(frame) == 1 and "series_resim" not in frame and "params_pred" not in frame
    for column in frame.columns:
        assert frame[column][0] == row[column], column
    assert frame["v0_1_determined"].dtype == bool


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


@pytest.mark.parametrize("level, message", [(level, "interval level must be a number in (0, 1)")
                                            for level in ("1.5", "0", "-0.2", "nan")] + [
    ("0.9995", "interval level 0.9995 is above the highest calibrated level, 0.999")])  # refused, not clipped
def test_a_level_outside_the_calibrated_ones_exits_2(study, tmp_path, level, message):
    root, config = study
    before = snapshot(tmp_path)
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input",
                     str(dataset_dir(config, root)), "--out", str(tmp_path / "p.parquet"), "--refine",
                     f"--level={level}", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert message in lines[0], lines
    assert snapshot(tmp_path) == before


def test_a_series_noisier_than_the_calibration_is_predicted_with_a_warning(study, tmp_path):
    """The calibration's noisiest bin is 5% of each channel's std: a 30% noisy series takes it,
    and says so (its intervals may be too narrow)."""
    root, config = study
    data = load_dataset(dataset_dir(config, root))
    series = data.series[0].astype(np.float64)
    noisy = series + np.random.default_rng(0).normal(size=series.shape) * 0.3 * series.std(axis=1, keepdims=True)
    times = np.asarray(json.loads((dataset_dir(config, root) / "_manifest.json").read_text())["time_points"])
    rows = ["time,u_1,a_1"] + [f"{float(t)!r},{float(u)!r},{float(a)!r}" for t, u, a in zip(times, noisy[0], noisy[1])]
    (tmp_path / "noisy.csv").write_text("\n".join(rows) + "\n")
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(tmp_path / "noisy.csv"),
                     "--out", str(tmp_path / "p.parquet"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "raypd.predict: warning: 1 series are noisier than 2x the noisiest calibrated level" in result.stderr
    clean = np.column_stack([times, series[0], series[1]])
    (tmp_path / "clean.csv").write_text("time,u_1,a_1\n" + "\n".join(",".join(repr(float(v)) for v in r) for r in clean))
    result = run_cli("raypd.predict", "--study", "smoke", "--root", str(root), "--input", str(tmp_path / "clean.csv"),
                     "--out", str(tmp_path / "q.parquet"), timeout=120)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


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
    ("--out neither parquet nor csv", "must end in .parquet or .csv"),
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
    out = tmp_path / ("p.txt" if damage == "--out neither parquet nor csv" else "p.parquet")
    for args in (["raypd.report"], ["raypd.predict", "--input", str(dataset_dir(config, root)), "--out", str(out)]):
        if damage == "--out neither parquet nor csv" and args[0] == "raypd.report":
            continue
        result = run_cli(*args, "--study", "smoke", "--root", str(tmp_path), timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_predict_on_a_misspelled_study_says_it_does_not_exist_and_lists_those_that_do(study, tmp_path):
    root, config = study
    before = snapshot(root)
    result = run_cli("raypd.predict", "--study", "smok", "--root", str(root), "--input",
                     str(dataset_dir(config, root)), "--out", str(tmp_path / "p.parquet"), timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    line = lines[0]
    assert "study 'smok' does not exist" in line and "raypd.tune --study smok" not in line, line
    study_files = sorted(p.stem for p in (REPO / "tune_configs").glob("*.yaml"))
    assert f"tune_configs/ holds {', '.join(study_files)}" in line, line
    assert f"{root / 'tune'} holds the finished studies smoke" in line, line
    assert not (tmp_path / "p.parquet").exists() and snapshot(root) == before
    # a study file that has not been run yet still says how to run it
    result = run_cli("raypd.predict", "--study", "lr", "--root", str(tmp_path), "--input",
                     str(dataset_dir(config, root)), "--out", str(tmp_path / "p.parquet"), timeout=120)
    assert result.returncode == 2 and "run `python -m raypd.tune --study lr` first" in result.stderr


def test_report_of_a_missing_study_exits_2(tmp_path):
    result = run_cli("raypd.report", "--study", "smoke", "--root", str(tmp_path))
    assert result.returncode == 2 and "summary.json does not exist" in result.stderr


def test_report_and_predict_refine_wait_for_no_one_while_the_study_is_written(study, tmp_path):
    """Both write into the study folder (summary.json, refine_calibration.json): while another
    process holds the study's lock they are refused at once, naming it, and change nothing."""
    import shutil
    import subprocess
    import sys

    root, config = study
    shutil.copytree(root / "tune" / "smoke", tmp_path / "tune" / "smoke")
    (tmp_path / "tune" / "smoke" / "refine_calibration.json").unlink(missing_ok=True)
    hold = ("from raypd.lock import hold; import sys, time\n"
            "with hold(sys.argv[1], 'the study'):\n    print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "tune" / "smoke" / ".raypd.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        for args in (["raypd.report"], ["raypd.predict", "--input", str(dataset_dir(config, root)),
                                        "--out", str(tmp_path / "p.parquet"), "--refine"]):
            result = run_cli(*args, "--study", "smoke", "--root", str(tmp_path), timeout=120)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and "is in use by" in lines[-1] and f"pid {holder.pid}" in lines[-1], \
                result.stderr[-2000:]
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
