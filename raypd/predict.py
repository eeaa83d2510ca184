"""Predict the parameters and initial conditions of new time series with a study's best model,
and re-simulate the series from them.

    python -m raypd.predict --study NAME [--root runs] --input PATH --out FILE.parquet

PATH is a raypd dataset folder or a CSV of one series: a time column, then u_1..u_n,
a_1..a_n, one row per time point. The output holds, per series: sample_id, params_pred and
ic_pred (DESIGN §1 layout) and series_resim (the ODE solved from them at the input's times,
row-major (channel, time); NaN where the predicted system diverges).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raypd import ode
from raypd.cli import ArgumentParser, check_writable, run_main
from raypd.config import Config, from_dict
from raypd.dataio import read_json
from raypd.dataset import load_dataset
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


def predict(study: str, root: str | Path, input_path: str | Path, out: str | Path) -> dict:
    import pyarrow as pa

    from raypd.dataio import list_column, write_table_atomic
    from raypd.train import check_fits

    root, input_path, out = Path(root), Path(input_path), Path(out)
    config, _, checkpoint = load_best(study, root)
    # the checkpoint carries its normalisation and standardisation: the one inference path, as
    # the registered MLflow model's (an old study's checkpoint without them stops here)
    model = SavedModel.load(checkpoint)
    n = config.data.n_actions
    if input_path.is_dir():
        dataset = load_dataset(input_path)
        if dataset.n_actions != n:
            raise ValueError(f"{input_path}: n_actions {dataset.n_actions}, the study's model takes n={n}")
        series, times, ids = dataset.series, np.asarray(dataset.manifest["time_points"]), dataset.sample_id
    elif input_path.is_file():
        times, series = read_csv_series(input_path, n)
        ids = np.zeros(1, dtype=np.int64)
    else:
        raise ValueError(f"--input {input_path} does not exist")
    if series.shape[2] < 2:
        raise ValueError(f"{input_path}: {series.shape[2]} time points: need at least 2")
    try:
        check_fits(config, series.shape[2])
    except ValueError as exc:
        raise ValueError(f"{input_path}: {exc}") from None
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a folder; it must be a .parquet file")
    y_pred = model.predict(series)
    resim = resimulate(y_pred, times, n)
    n_p = ode.num_params(n)

    table = pa.table({"sample_id": pa.array(ids, type=pa.int64()),
                      "params_pred": list_column(y_pred[:, :n_p], pa.float64()),
                      "ic_pred": list_column(y_pred[:, n_p:], pa.float64()),
                      "series_resim": list_column(resim.astype(np.float32), pa.float32())})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table_atomic(table, out)
    return {"series": len(ids), "out": str(out), "diverged": int(np.isnan(resim).any(axis=(1, 2)).sum())}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.predict", description="Predict with a study's best model.")
    p.add_argument("--study", required=True, help="the study whose best model predicts")
    p.add_argument("--root", default="runs", help="the study's root (default %(default)s)")
    p.add_argument("--input", required=True, help="a raypd dataset folder or a CSV of one series")
    p.add_argument("--out", required=True, help="output .parquet file")
    args = p.parse_args(argv)

    def body() -> int:
        if Path(args.out).suffix != ".parquet":
            raise ValueError(f"--out {args.out} must name a .parquet file (predictions are written as Parquet)")
        check_writable(args.out, "--out", beside=True)
        result = predict(args.study, args.root, args.input, args.out)
        print(f"{result['out']}: {result['series']} series predicted, {result['diverged']} re-simulations diverged")
        return 0

    run_main("raypd.predict", body)


if __name__ == "__main__":
    main()
