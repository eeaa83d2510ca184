"""Predict the parameters and initial conditions of new time series with a study's best model,
with intervals, and (--refine) refine them through the ODE.

    python -m raypd.predict --study NAME [--root runs] --input PATH --out FILE.parquet|FILE.csv
        [--refine] [--level 0.9] [--address ADDR] [--no-progress]

PATH is a raypd dataset folder or a CSV of one series: a time column, then u_1..u_n,
a_1..a_n, one row per time point. The Parquet output holds, per series: sample_id,
params_pred and ic_pred (DESIGN §1 layout), series_resim (the ODE solved from them at the
input's times, row-major (channel, time); NaN where the predicted system diverges), and the
model-only intervals at --level: params_lower, params_upper, ic_lower, ic_upper. With
--refine also (raypd.refine): params_refined and ic_refined, their intervals
(params_refined_lower, ...), residual (relative RMS), identified, starts, noise (the
series' estimated noise), fit_status (identified; undetermined: the fit explains the series but
not every target is determined; not fitted: no start explains it) and fit_reason (why not
identified, in words: "v_2 never above mu_2; not determined: g_2, Pi_21, Pi_22, v0_2",
"sensitive: ...", "no start explains the series: ...").

Then one float column per target, named by the model's target names (g_1, mu_1, Pi_11,
Gamma_11, v0_1, m0_1 for n=1): `<target>` (the model's estimate), `<target>_lower`,
`<target>_upper` and `<target>_width` (upper - lower: an interval 1e-7 wide shows as such),
and with --refine `<target>_refined`, `<target>_refined_lower`, `<target>_refined_upper`,
`<target>_refined_width` and `<target>_determined` (bool: the fit determined that target; one
it did not keeps the model's estimate and model-only interval, raypd.refine). The schema's
metadata holds raypd_interval_level and raypd_target_names (a JSON list, layout order).

`--out FILE.csv` writes those per-target columns, sample_id and the scalar refine columns
(residual, identified, starts, noise, fit_status, fit_reason) as a CSV instead: a header row, comma-separated, floats
with the digits that read back the same double (Python's repr), empty for NaN, true/false.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from raypd import ode
from raypd.cli import ArgumentParser, check_writable, run_main
from raypd.config import Config, from_dict
from raypd.dataio import atomic_file, read_json, write_json
from raypd.dataset import open_dataset
from raypd.intervals import DEFAULT_LEVEL, check_level
from raypd.serve import SavedModel


def load_best(study: str, root: str | Path) -> tuple[Config, dict, Path]:
    """The study's resolved config for its best trial, its summary and best checkpoint."""
    from raypd.tune import STUDIES, SUMMARY_FILE, STUDY_FILE, resolve

    study_dir = Path(root) / "tune" / study
    if not (study_dir / SUMMARY_FILE).exists():
        if not (STUDIES / f"{study}.yaml").exists() and not study_dir.exists():
            raise ValueError(unknown_study(study, Path(root)))
        raise ValueError(f"{study_dir / SUMMARY_FILE} does not exist: run `python -m raypd.tune --study {study}` "
                         "first (or pass its --root)")
    damaged = " (the study folder is damaged: re-run the study under another --root)"
    summary = read_json(study_dir / SUMMARY_FILE, damaged)
    if not summary.get("best_trial_id"):
        raise ValueError(f"study {study} in {study_dir} has no successful trial to predict with")
    config = resolve(from_dict(Config, read_json(study_dir / STUDY_FILE, damaged)), summary["best_config"])
    # from the study folder, not the absolute path in the summary: ROOT may have moved
    return config, summary, study_dir / "trials" / summary["best_trial_id"] / "checkpoints" / "best"


def unknown_study(study: str, root: Path) -> str:
    """What to say of a study that neither tune_configs/ nor ROOT/tune has: the ones they have."""
    from raypd.tune import STUDIES, SUMMARY_FILE

    files = sorted(p.stem for p in STUDIES.glob("*.yaml"))
    finished = sorted(p.parent.name for p in (root / "tune").glob(f"*/{SUMMARY_FILE}"))
    return (f"study {study!r} does not exist: tune_configs/ holds {', '.join(files) or 'no study file'} "
            f"(run one with `python -m raypd.tune --study NAME`), {root / 'tune'} holds "
            f"{'the finished studies ' + ', '.join(finished) if finished else 'no finished study'}")


OUT_SUFFIXES = (".parquet", ".csv")


def output_format(out: str | Path) -> str:
    """"parquet" or "csv" from --out's suffix; another suffix is a ValueError naming both."""
    suffix = Path(out).suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out} must end in .parquet or .csv (the formats predictions are written in; "
                         f"got {suffix or 'no suffix'})")
    return suffix[1:]


INTERVAL_SUFFIXES = ("_lower", "_upper", "_width")
REFINED_SUFFIXES = ("_refined", "_refined_lower", "_refined_upper", "_refined_width", "_determined")


def target_column_names(names: list[str], intervals: bool, refined: bool) -> list[str]:
    """The per-target columns' names, in target_columns' order."""
    kinds = ("",) + (INTERVAL_SUFFIXES if intervals else ()) + (REFINED_SUFFIXES if refined else ())
    return [f"{name}{kind}" for name in names for kind in kinds]


def target_columns(names: list[str], estimate: np.ndarray, lower: np.ndarray | None = None,
                   upper: np.ndarray | None = None, fitted: dict | None = None) -> dict[str, np.ndarray]:
    """One column per target and kind, target by target: <t>, <t>_lower, <t>_upper, <t>_width
    (model-only), then with refinement (`fitted`, refine_with_intervals' columns)
    <t>_refined, <t>_refined_lower, <t>_refined_upper, <t>_refined_width, <t>_determined."""
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        columns[name] = estimate[:, j].astype(np.float64)
        if lower is not None:
            columns.update({f"{name}_lower": lower[:, j].astype(np.float64),
                            f"{name}_upper": upper[:, j].astype(np.float64),
                            f"{name}_width": (upper[:, j] - lower[:, j]).astype(np.float64)})
        if fitted is not None:
            low, high = fitted["lower"][:, j], fitted["upper"][:, j]
            columns.update({f"{name}_refined": fitted["estimate"][:, j].astype(np.float64),
                            f"{name}_refined_lower": low.astype(np.float64),
                            f"{name}_refined_upper": high.astype(np.float64),
                            f"{name}_refined_width": (high - low).astype(np.float64),
                            f"{name}_determined": fitted["determined"][:, j].astype(bool)})
    return columns


def csv_cells(values: np.ndarray) -> list[str]:
    """A column's CSV cells: floats as the shortest text that reads back the same double
    (repr: 0.1, 1e-07, two bounds 1e-7 apart stay distinct), NaN empty, bools true/false, text
    as it is (the csv module quotes it where it holds a comma)."""
    values = np.asarray(values)
    if values.dtype == bool:
        return ["true" if v else "false" for v in values.tolist()]
    if np.issubdtype(values.dtype, np.integer):
        return [str(v) for v in values.tolist()]
    if values.dtype == object or values.dtype.kind == "U":  # text (fit_status, fit_reason): as it is
        return [str(v) for v in values.tolist()]
    return ["" if v != v else repr(v) for v in values.astype(np.float64).tolist()]


def write_csv_atomic(header: list[str], chunks, path: Path) -> None:
    """Write a CSV (header, then the rows of each chunk: a dict of equal-length columns named
    as the header) whole or not at all: a temporary file beside it, then a rename."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for columns in chunks:
            writer.writerows(zip(*(csv_cells(columns[name]) for name in header)))


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
                        progress: bool = True, prog: str = "raypd.predict", locked: bool = False) -> dict:
    """The refined intervals' calibration for the study's best model: from ROOT/tune/NAME/
    refine_calibration.json when it is this checkpoint's, else computed (raypd.refine.
    calibrate_refined, on the study's saved validation split) and saved there, under the
    study's lock (locked: the caller holds it)."""
    from raypd.lock import hold
    from raypd.dataio import file_digest
    from raypd.tune import LOCK_FILE

    digest = file_digest(Path(model.source))
    path = study_dir / REFINE_CALIBRATION_FILE

    def saved() -> dict | None:
        if path.is_file():
            found = read_json(path, " (remove it: it is made again)")
            if found.get("checkpoint_sha256") == digest:
                return found["calibration"]
        return None

    found = saved()
    if found is not None:
        return found
    if locked:
        return _calibrate_refined(study_dir, model, problem, address, progress, prog, digest)
    with hold(study_dir / LOCK_FILE, f"study {study_dir.name} in {study_dir}"):
        return saved() or _calibrate_refined(study_dir, model, problem, address, progress, prog, digest)


def _calibrate_refined(study_dir: Path, model: SavedModel, problem, address, progress, prog: str,
                       digest: str) -> dict:
    from raypd.refine import CALIBRATION_SERIES, calibrate_refined
    from raypd.serve import CALIBRATION_SPLIT_FILE, VAL_SPLIT_FILE, read_test_split

    path = study_dir / REFINE_CALIBRATION_FILE
    source = study_dir / CALIBRATION_SPLIT_FILE
    if not source.exists() and (study_dir / VAL_SPLIT_FILE).exists():  # a study of an earlier raypd
        source = study_dir / VAL_SPLIT_FILE
    ids, targets, series = read_test_split(source, model.series_shape)
    chosen = np.random.default_rng(0).permutation(len(ids))[:CALIBRATION_SERIES]
    print(f"{prog}: calibrating the refined intervals on {len(chosen)} calibration-split series, clean and "
          "noisy (once per best model)", file=sys.stderr)
    calibration = calibrate_refined(model.predict, series[chosen], targets[chosen], problem, seed=1,
                                    address=address, progress=progress)
    write_json(path, {"checkpoint_sha256": digest, "calibration": calibration})
    return calibration


def predict(study: str, root: str | Path, input_path: str | Path, out: str | Path, refine: bool = False,
            level: float = DEFAULT_LEVEL, address: str | None = None, progress: bool = True) -> dict:
    import pyarrow as pa

    from raypd.dataio import list_column, write_tables_atomic
    from raypd.model import check_fits

    level = check_level(level)
    root, input_path, out = Path(root), Path(input_path), Path(out)
    fmt = output_format(out)
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
        raise ValueError(f"--out {out} is a folder; it must be a .parquet or .csv file")
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
    names = model.target_names
    refine_scalars = ("residual", "identified", "starts", "noise", "fit_status", "fit_reason")

    def split(name: str, values: np.ndarray) -> dict:
        """params_<name> and ic_<name> columns from (N, n_targets) values."""
        return {f"params_{name}": list_column(values[:, :n_p], pa.float64()),
                f"ic_{name}": list_column(values[:, n_p:], pa.float64())}

    def predicted(ids: np.ndarray, series: np.ndarray) -> tuple[dict, dict]:
        """One chunk of series: (its list columns for Parquet, its scalar columns by name)."""
        if model.calibration is None:
            y_pred, lower, upper = model.predict(series), None, None
        else:
            y_pred, lower, upper = model.predict_with_intervals(series, level)
        result["series"] += len(ids)
        if model.calibration is not None:
            from raypd.intervals import beyond_calibration, noise_level

            result["noisier"] += int(beyond_calibration(noise_level(series), model.calibration).sum())
        lists = split("pred", y_pred)
        if fmt == "parquet":  # the CSV leaves the re-simulated series out: no solve for it
            resim = resimulate(y_pred, times, n)
            lists["series_resim"] = list_column(resim.astype(np.float32), pa.float32())
            result["diverged"] += int(np.isnan(resim).any(axis=(1, 2)).sum())
        if lower is not None:
            lists.update({**split("lower", lower), **split("upper", upper)})
        scalars = {"sample_id": np.asarray(ids, dtype=np.int64)}
        fitted = None
        if refine:
            fitted = refine_with_intervals(models, series, problem, calibration, level, seeds=ids, address=address,
                                           progress=progress)
            lists.update({**split("refined", fitted["estimate"]), **split("refined_lower", fitted["lower"]),
                          **split("refined_upper", fitted["upper"])})
            result["identified"] = result.get("identified", 0) + int(fitted["identified"].sum())
        scalars.update(target_columns(names, y_pred, lower, upper, fitted))
        if fitted is not None:
            scalars.update({"residual": fitted["residual"].astype(np.float64),
                            "identified": fitted["identified"].astype(bool),
                            "starts": fitted["starts"].astype(np.int64),
                            "noise": fitted["noise"].astype(np.float64),
                            "fit_status": np.asarray(fitted["status"], dtype=object),
                            "fit_reason": np.asarray(fitted["reason"], dtype=object)})
        return lists, scalars

    def table(ids: np.ndarray, series: np.ndarray):
        """The Parquet rows of one chunk: the list columns (today's names), then per target."""
        lists, scalars = predicted(ids, series)
        columns = {"sample_id": pa.array(scalars.pop("sample_id"), type=pa.int64()), **lists}
        for name in refine_scalars:
            if name in scalars:
                columns[name] = pa.array(scalars.pop(name))
        columns.update({name: pa.array(values) for name, values in scalars.items()})
        return pa.table(columns).replace_schema_metadata(
            {"raypd_interval_level": str(level), "raypd_target_names": json.dumps(names)})

    result = {"series": 0, "out": str(out), "diverged": 0, "noisier": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        write_tables_atomic((table(ids, series) for ids, series in chunks), out)
    else:
        header = (["sample_id"] + target_column_names(names, model.calibration is not None, refine)
                  + (list(refine_scalars) if refine else []))
        write_csv_atomic(header, (predicted(ids, series)[1] for ids, series in chunks), out)
        result["diverged"] = None
    return result


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m raypd.predict", description="Predict with a study's best model.")
    p.add_argument("--study", required=True, help="the study whose best model predicts")
    p.add_argument("--root", default="runs", help="the study's root (default %(default)s)")
    p.add_argument("--input", required=True, help="a raypd dataset folder or a CSV of one series")
    p.add_argument("--out", required=True, help="output .parquet file, or .csv (one column per target, no series)")
    p.add_argument("--refine", action="store_true",
                   help="also fit each series through the ODE from the model's estimate (raypd.refine)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL,
                   help="coverage of the intervals, in (0, 1) (default %(default)s)")
    p.add_argument("--address", help="Ray cluster for --refine (default $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def body() -> int:
        output_format(args.out)
        check_level(args.level)
        check_writable(args.out, "--out", beside=True)
        result = predict(args.study, args.root, args.input, args.out, args.refine, args.level, args.address,
                         not args.no_progress)
        refined = f", {result['identified']} identified by refinement" if args.refine else ""
        diverged = "" if result["diverged"] is None else f", {result['diverged']} re-simulations diverged"
        print(f"{result['out']}: {result['series']} series predicted{diverged}{refined}")
        if result["noisier"]:
            from raypd.intervals import NOISE_LEVELS, NOISIER

            print(f"raypd.predict: warning: {result['noisier']} series are noisier than {NOISIER:g}x the noisiest "
                  f"calibrated level ({max(NOISE_LEVELS):.0%} of each channel's std): their intervals use that "
                  "level's calibration and may be too narrow", file=sys.stderr)
        return 0

    run_main("raypd.predict", body)


if __name__ == "__main__":
    main()
