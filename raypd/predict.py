"""Predict the parameters and initial conditions of new time series with a study's best model,
with intervals, and (--refine) refine them through the ODE.

    python -m raypd.predict --study NAME [--root runs] --input PATH --out FILE.parquet
        [--refine] [--level 0.9] [--address ADDR] [--no-progress]

PATH is a raypd dataset folder or a CSV of one series: a time column, then u_1..u_n,
a_1..a_n, one row per time point. The output holds, per series: sample_id, params_pred and
ic_pred (DESIGN §1 layout), series_resim (the ODE solved from them at the input's times,
row-major (channel, time); NaN where the predicted system diverges), and the model-only
intervals at --level: params_lower, params_upper, ic_lower, ic_upper. With --refine also
(raypd.refine): params_refined and ic_refined, their intervals (params_refined_lower, ...),
residual (relative RMS), identified, starts and noise (the series' estimated noise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from raypd import ode
from raypd.cli import ArgumentParser, check_writable, run_main
from raypd.config import Config, from_dict
from raypd.dataio import read_json
from raypd.dataset import open_dataset, write_json
from raypd.intervals import DEFAULT_LEVEL, check_level
from raypd.serve import SavedModel


def load_best(study: str, root: str | Path) -> tuple[Config, dict, Path]:
    """The study's resolved config for its best trial, its summary and best checkpoint."""
    from raypd.tune import SUMMARY_FILE, STUDY_FILE, resolve

    study_dir = Path(root) / "tune" / study
    if not (study_dir / SUMMARY_FILE).exists():
        raise ValueError(f"{study_dir / SUMMARY_FILE} does not exist: run `python -m raypd.tune --study {study}` "
                         "first (or pass its --root)")
    damaged = " (the study folder is damaged: re-run the study under another --root)"
    summary = read_json(study_dir / SUMMARY_FILE, damaged)
    if not summary.get("best_trial_id"):
        raise ValueError(f"study {study} in {study_dir} has no successful trial to predict with")
    config = resolve(from_dict(Config, read_json(study_dir / STUDY_FILE, damaged)), summary["best_config"])
    # from the study folder, not the absolute path in the summary: ROOT may have moved
    return config, summary, study_dir / "trials" / summary["best_trial_id"] / "checkpoints" / "best"


def read_csv_series(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(times (T,), series (1, 2n, T)) from a CSV: time, u_1..u_n, a_1..a_n."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: an empty file; a CSV needs a header time,{','.join(ode.channel_names(n))} "
                         "and one row per time point")
    try:
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None
    names = list(table.dtype.names or [])
    expected = ["time"] + ode.channel_names(n)
    if names != expected:
        raise ValueError(f"{path}: columns must be {', '.join(expected)} for this study's n={n} (got "
                         f"{', '.join(names) or 'none'})")
    values = np.atleast_1d(table)
    columns = np.stack([values[name] for name in names])
    if not np.isfinite(columns).all():
        raise ValueError(f"{path}: holds empty, NaN or infinite values")
    if np.any(np.diff(columns[0]) <= 0):
        raise ValueError(f"{path}: the time column must increase")
    return columns[0], columns[1:][None].astype(np.float32)


def resimulate(y_pred: np.ndarray, times: np.ndarray, n: int) -> np.ndarray:
    """Series (N, 2n, T) of the ODE solved from predicted parameters and initial conditions;
    NaN rows where the predicted system diverges."""
    n_p = ode.num_params(n)
    series, _ = ode.solve(y_pred[:, :n_p], y_pred[:, n_p:], times, n)
    return series


NEXT_BEST_STARTS = 2  # refinement also starts from the estimates of the study's next-best models
REFINE_CALIBRATION_FILE = "refine_calibration.json"  # in ROOT/tune/NAME, for its best checkpoint


def next_best_models(summary: dict, study_dir: Path, count: int = NEXT_BEST_STARTS) -> list[SavedModel]:
    """The study's next-best trials' models (by validation loss), those whose checkpoints load."""
    ranked = sorted((t for t in summary["trials"] if t.get("val_loss") is not None and
                     t["trial_id"] != summary["best_trial_id"]), key=lambda t: t["val_loss"])
    models = []
    for trial in ranked:
        if len(models) == count:
            break
        try:
            models.append(SavedModel.load(study_dir / "trials" / trial["trial_id"] / "checkpoints" / "best"))
        except ValueError:  # a trial stopped before its first checkpoint
            continue
    return models


def refined_calibration(study_dir: Path, model: SavedModel, problem, address: str | None = None,
                        progress: bool = True) -> dict:
    """The refined intervals' calibration for the study's best model: from ROOT/tune/NAME/
    refine_calibration.json when it is this checkpoint's, else computed (raypd.refine.
    calibrate_refined, on the study's saved validation split) and saved there."""
    from raypd.refine import CALIBRATION_SERIES, calibrate_refined
    from raypd.serve import VAL_SPLIT_FILE, file_digest, read_test_split

    digest = file_digest(Path(model.source))
    path = study_dir / REFINE_CALIBRATION_FILE
    if path.is_file():
        saved = read_json(path, " (remove it: it is made again)")
        if saved.get("checkpoint_sha256") == digest:
            return saved["calibration"]
    ids, targets, series = read_test_split(study_dir / VAL_SPLIT_FILE, model.series_shape)
    chosen = np.random.default_rng(0).permutation(len(ids))[:CALIBRATION_SERIES]
    print(f"raypd.predict: calibrating the refined intervals on {len(chosen)} validation series, clean and "
          "noisy (once per best model)", file=sys.stderr)
    calibration = calibrate_refined(model.predict, series[chosen], targets[chosen], problem, seed=1,
                                    address=address, progress=progress)
    write_json(path, {"checkpoint_sha256": digest, "calibration": calibration})
    return calibration


def predict(study: str, root: str | Path, input_path: str | Path, out: str | Path, refine: bool = False,
            level: float = DEFAULT_LEVEL, address: str | None = None, progress: bool = True) -> dict:
    import pyarrow as pa

    from raypd.dataio import list_column, write_tables_atomic
    from raypd.train import check_fits

    level = check_level(level)
    root, input_path, out = Path(root), Path(input_path), Path(out)
    config, summary, checkpoint = load_best(study, root)
    # the checkpoint carries its normalisation and standardisation: the one inference path, as
    # the registered MLflow model's (an old study's checkpoint without them stops here)
    model = SavedModel.load(checkpoint)
    n = config.data.n_actions
    if input_path.is_dir():
        dataset = open_dataset(input_path)
        if dataset.series_shape[0] != 2 * n:
            raise ValueError(f"{input_path}: n_actions {dataset.series_shape[0] // 2}, the study's model takes n={n}")
        times, steps = np.asarray(dataset.manifest["time_points"]), dataset.series_shape[1]
        # a file at a time: memory holds one file's series, whatever the size of the dataset
        chunks = ((ids, columns["series"].reshape(len(ids), *dataset.series_shape))
                  for ids, columns in dataset.parts(columns=("series",)))
    elif input_path.is_file():
        times, series = read_csv_series(input_path, n)
        steps, chunks = series.shape[2], iter([(np.zeros(1, dtype=np.int64), series)])
    else:
        raise ValueError(f"--input {input_path} does not exist")
    if steps < 2:
        raise ValueError(f"{input_path}: {steps} time points: need at least 2")
    try:
        check_fits(config, steps)
    except ValueError as exc:
        raise ValueError(f"{input_path}: {exc}") from None
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; it must be a .parquet file")
    if model.calibration is None and refine:
        raise ValueError(f"{checkpoint}: the study's best model has no interval calibration (an older raypd "
                         "ran the study): re-run it with this raypd, under another --root, to refine")
    if model.calibration is None:  # a study of an older raypd: its estimates, without intervals
        print(f"raypd.predict: {checkpoint} has no interval calibration (an older raypd ran the study): "
              "estimates without intervals", file=sys.stderr)
    if refine:
        from raypd.refine import FitProblem, refine_with_intervals

        study_dir = root / "tune" / study
        problem = FitProblem.from_data_config(config.data, times)
        calibration = refined_calibration(study_dir, model, problem, address, progress)
        models = [model] + next_best_models(summary, study_dir)
    n_p = ode.num_params(n)

    def split(name: str, values: np.ndarray) -> dict:
        """params_<name> and ic_<name> columns from (N, n_targets) values."""
        return {f"params_{name}": list_column(values[:, :n_p], pa.float64()),
                f"ic_{name}": list_column(values[:, n_p:], pa.float64())}

    def table(ids: np.ndarray, series: np.ndarray):
        """The output rows of one chunk of series."""
        if model.calibration is None:
            y_pred, lower, upper = model.predict(series), None, None
        else:
            y_pred, lower, upper = model.predict_with_intervals(series, level)
        resim = resimulate(y_pred, times, n)
        columns = {"sample_id": pa.array(ids, type=pa.int64()), **split("pred", y_pred),
                   "series_resim": list_column(resim.astype(np.float32), pa.float32())}
        if lower is not None:
            columns.update({**split("lower", lower), **split("upper", upper)})
        result["series"] += len(ids)
        result["diverged"] += int(np.isnan(resim).any(axis=(1, 2)).sum())
        if refine:
            fitted = refine_with_intervals(models, series, problem, calibration, level, seeds=ids, address=address,
                                           progress=progress)
            columns.update({**split("refined", fitted["estimate"]), **split("refined_lower", fitted["lower"]),
                            **split("refined_upper", fitted["upper"]),
                            "residual": pa.array(fitted["residual"], type=pa.float64()),
                            "identified": pa.array(fitted["identified"], type=pa.bool_()),
                            "starts": pa.array(fitted["starts"], type=pa.int64()),
                            "noise": pa.array(fitted["noise"], type=pa.float64())})
            result["identified"] = result.get("identified", 0) + int(fitted["identified"].sum())
        return pa.table(columns).replace_schema_metadata({"raypd_interval_level": str(level)})

    result = {"series": 0, "out": str(out), "diverged": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tables_atomic((table(ids, series) for ids, series in chunks), out)
    return result


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.predict", description="Predict with a study's best model.")
    p.add_argument("--study", required=True, help="the study whose best model predicts")
    p.add_argument("--root", default="runs", help="the study's root (default %(default)s)")
    p.add_argument("--input", required=True, help="a raypd dataset folder or a CSV of one series")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--refine", action="store_true",
                   help="also fit each series through the ODE from the model's estimate (raypd.refine)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL,
                   help="coverage of the intervals, in (0, 1) (default %(default)s)")
    p.add_argument("--address", help="Ray cluster for --refine (default $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def body() -> int:
        if Path(args.out).suffix != ".parquet":
            raise ValueError(f"--out {args.out} must name a .parquet file (predictions are written as Parquet)")
        check_level(args.level)
        check_writable(args.out, "--out", beside=True)
        result = predict(args.study, args.root, args.input, args.out, args.refine, args.level, args.address,
                         not args.no_progress)
        refined = f", {result['identified']} identified by refinement" if args.refine else ""
        print(f"{result['out']}: {result['series']} series predicted, {result['diverged']} re-simulations "
              f"diverged{refined}")
        return 0

    run_main("raypd.predict", body)


if __name__ == "__main__":
    main()
