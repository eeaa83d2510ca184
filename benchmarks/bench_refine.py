"""Refinement through the ODE (raypd.refine): accuracy, intervals and speed, for a trained run.

    python -m raypd.train --config tune_configs/base.yaml --out runs/train/n1 --set ...   # first
    python benchmarks/bench_refine.py --run runs/train/n1 [--data DIR] [--test 1500] [--sizes 100 400]

Prints, for the run's test split (the first --test series), clean and with 2% Gaussian
observation noise: the model-only and refined test MSE (raw units, all targets), the share
identified, and the coverage of the 90% intervals per target (model-only: calibrated on the
validation split when the run was trained, or here if its checkpoint has none; refined:
calibrated on --calibration calibration-split series, raypd.refine.calibrate_refined).

Speed: wall time of refine() on Ray Data for two sizes of clean test series (--data's when given),
with refine's own number of perturbed restarts (--restarts), differenced
(sizes far apart, so Ray's start-up and the last task's tail cancel), times the CPUs Ray
used = seconds per series per core; against a baseline measured in the same run: the same
fits by scipy's least_squares with its own 2-point finite-difference Jacobian (one solve per
target per iteration, the probe of issue 19), from the model's estimate, one start, in this
process, per series.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd import ode  # noqa: E402
from raypd.config import DataConfig, TrainConfig, from_dict  # noqa: E402
from raypd.dataset import load_dataset, split_ids  # noqa: E402
from raypd.intervals import DEFAULT_LEVEL, add_noise, coverage  # noqa: E402
from raypd.refine import (CALIBRATION_SERIES, RESTARTS, FitProblem, calibrate_refined, refine,  # noqa: E402
                          refine_with_intervals)
from raypd.serve import SavedModel, add_calibration  # noqa: E402


def baseline_fit(observed, start, problem):
    """The probe's fit: least_squares with scipy's 2-point finite differences, one start."""
    from scipy.optimize import least_squares

    n, n_p = problem.n, ode.num_params(problem.n)
    free = problem.free
    weights = 1.0 / np.maximum(observed.std(axis=-1), 1e-3 * observed.std(axis=-1).max() + 1e-12)[:, None]

    def residual(x):
        theta = start.copy()
        theta[free] = x
        series, ok = ode.solve(theta[None, :n_p], theta[None, n_p:], problem.times, n, problem.rtol, problem.atol)
        return ((series[0] - observed) * weights).ravel() if ok[0] else np.full(observed.size, 1e3)

    lo, hi = problem.lower[free], problem.upper[free]
    x0 = np.clip(start[free], lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
    least_squares(residual, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=60 * (free.sum() + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a raypd.train output folder (metrics.json, checkpoints/best)")
    p.add_argument("--data", help="refine the first --test series of this dataset (the run's settings, another "
                                  "seed: series nothing was tuned on) instead of the run's test split")
    p.add_argument("--test", type=int, default=1500, help="test series refined for the accuracy table")
    p.add_argument("--sizes", type=int, nargs=2, default=[100, 400], help="series for the differenced timing")
    p.add_argument("--baseline", type=int, default=40, help="series fitted by the finite-difference baseline")
    p.add_argument("--calibration", type=int, default=CALIBRATION_SERIES,
                   help="calibration-split series (per noise level) that calibrate the refined intervals")
    p.add_argument("--restarts", type=int, default=RESTARTS, help="perturbed restarts in the timed refine (refine's own)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="skip the calibration and the accuracy table")
    args = p.parse_args()

    import ray

    run = Path(args.run)
    metrics = json.loads((run / "metrics.json").read_text())
    dataset = load_dataset(metrics["dataset"])
    config = from_dict(DataConfig, dataset.manifest["settings"])
    split = split_ids(dataset.sample_id, TrainConfig().split, TrainConfig().split_seed, TrainConfig().calibration)
    saved_test = __import__("pyarrow.parquet", fromlist=["x"]).read_table(run / "predictions.parquet")
    assert np.array_equal(saved_test.column("sample_id").to_numpy(), split["test"]), "not the default split"
    rows = {k: np.searchsorted(dataset.sample_id, v) for k, v in split.items()}
    targets, series = dataset.targets, dataset.series
    best = run / "checkpoints" / "best"
    model = SavedModel.load(best)
    if model.calibration is None:
        add_calibration(best, series[rows["calib"]], targets[rows["calib"]], seed=int(split["calib"][0]))
        model = SavedModel.load(best)
    problem = FitProblem.from_data_config(config)
    names = model.target_names
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    cpus = ray.cluster_resources()["CPU"]
    print(f"run {run}: n={config.n_actions}, {len(split['test'])} test series, model test mse {metrics['mse']:.4f}; "
          f"Ray with {cpus:g} CPUs")

    if not args.timing_only:
        started = time.perf_counter()
        val = np.random.default_rng(0).permutation(rows["calib"])[: args.calibration]  # the calibration split
        calibration = calibrate_refined(model.predict, series[val], targets[val], problem, seed=1, progress=False)
        print(f"refined calibration: {len(val)} calibration-split series x {len(calibration['noise_levels'])} noise "
              f"levels in {time.perf_counter() - started:.1f} s; identified "
              f"{np.round(calibration['identified'], 3).tolist()}")

    test_ids = split["test"][: args.test]
    if args.data:  # fresh series: the run's settings, another seed
        fresh = load_dataset(args.data)
        theirs = {k: v for k, v in fresh.manifest["settings"].items() if k not in ("seed", "samples")}
        ours = {k: v for k, v in dataset.manifest["settings"].items() if k not in ("seed", "samples")}
        assert theirs == ours and fresh.manifest["seed"] != dataset.manifest["seed"], "not the run's settings"
        targets, series, test_ids = fresh.targets, fresh.series, fresh.sample_id[: args.test]
        test = np.arange(min(args.test, len(fresh.sample_id)))
        print(f"test series: the first {len(test)} of {args.data} (seed {fresh.manifest['seed']})")
    else:
        test = rows["test"][: args.test]
    rng = np.random.default_rng(2024)
    table = {}
    for kind, noise in () if args.timing_only else (("clean", 0.0), ("2% noise", 0.02)):
        observed = add_noise(series[test], noise, rng)
        started = time.perf_counter()
        out = refine_with_intervals([model], observed, problem, calibration, DEFAULT_LEVEL,
                                    seeds=test_ids, progress=False)
        seconds = time.perf_counter() - started
        estimate, lower, upper = out["model_estimate"], out["model_lower"], out["model_upper"]
        r_lower, r_upper = out["lower"], out["upper"]
        truth = targets[test]
        table[kind] = {
            "series": len(test), "seconds": round(seconds, 1),
            "model_mse": float(((estimate - truth) ** 2).mean()),
            "refined_mse": float(((out["estimate"] - truth) ** 2).mean()),
            "identified": float(out["identified"].mean()), "starts": float(out["starts"].mean()),
            "status": {str(k): int(v) for k, v in zip(*np.unique(out["status"].astype(str), return_counts=True))},
            "coverage_model": coverage(lower, upper, truth, names),
            "coverage_refined": coverage(r_lower, r_upper, truth, names)}
        t = table[kind]
        print(f"{kind:>9}: model mse {t['model_mse']:.4f} -> refined {t['refined_mse']:.5f}; identified "
              f"{t['identified']:.1%}, {t['starts']:.2f} starts per series; {len(test)} series in {seconds:.1f} s; "
              f"fit_status {t['status']}")
        for cover in ("coverage_model", "coverage_refined"):
            per = ", ".join(f"{k} {v:.3f}" for k, v in t[cover]["per_target"].items() if v is not None)
            print(f"{'':>11}{cover} {t[cover]['all']:.3f} ({per})")

    if not args.no_timing:
        small, large = args.sizes
        clean = (series[:large] if args.data else dataset.series[rows["test"]][:large]).astype(np.float64)
        starts = model.predict(clean)[:, None, :]
        walls = {}
        # untimed first: Ray's workers start and load the compiled code (or compile it, the first time)
        refine(clean[:small], starts[:small], problem, restarts=args.restarts, progress=False, local=False)
        for size in (small, large):
            started = time.perf_counter()
            refine(clean[:size], starts[:size], problem, restarts=args.restarts, progress=False, local=False)
            walls[size] = time.perf_counter() - started
        per_core = (walls[large] - walls[small]) / (large - small) * cpus
        started = time.perf_counter()
        for s, st in zip(clean[: args.baseline], starts[: args.baseline, 0]):
            baseline_fit(s, st, problem)
        base = (time.perf_counter() - started) / args.baseline
        one_start = refine(clean[: args.baseline], starts[: args.baseline], problem, restarts=0, local=True)
        started = time.perf_counter()
        refine(clean[: args.baseline], starts[: args.baseline], problem, restarts=0, local=True)
        ours = (time.perf_counter() - started) / args.baseline
        print(f"speed: refine on Ray Data ({args.restarts} restarts) {small} series {walls[small]:.2f} s, {large} series "
              f"{walls[large]:.2f} s -> "
              f"{per_core * 1e3:.1f} ms per series per core (x{cpus:g} CPUs, differenced)")
        print(f"       one start, in this process: {ours * 1e3:.1f} ms per series (exact Jacobian) vs "
              f"{base * 1e3:.1f} ms (scipy's finite differences): {base / ours:.2f}x; identified "
              f"{one_start['identified'].mean():.1%}")
        table["speed"] = {"per_series_per_core_ms": per_core * 1e3, "walls": walls, "one_start_ms": ours * 1e3,
                          "baseline_ms": base * 1e3}
    ray.shutdown()
    print(json.dumps(table, default=float)[:200] + " ...")


if __name__ == "__main__":
    main()
