"""Overheads of a study, as the user waits for them, in one run:

- per trial: wall time of a study of 10 two-epoch trials minus that of a study of 2 such
  trials, divided by 8 (1,000 samples, a small model);
- per epoch: wall time of a one-trial study of 60 epochs minus one of 10 epochs, divided by
  50, against the trial's own epoch_seconds (600 samples, the smoke model: ~0.05 s epochs,
  as small studies on a GPU have). Measured with raypd's MLflow callback (one log_batch per
  result) and, as the baseline, with Ray's MLflowLoggerCallback.log_trial_result (one
  log_metric call per metric).

    python benchmarks/bench_tune.py [--workers 0]

--workers 0 (the studies' default) runs each trial's loop in the trial's own process;
--workers 1 gives every trial a real Ray Train worker group, for comparison. Ray's start-up,
the dataset and MLflow's database set-up are paid before both studies and not counted.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd.cli import init_ray  # noqa: E402
from raypd.config import load_config  # noqa: E402
import raypd.tune  # noqa: E402
from raypd.tune import run_study  # noqa: E402

SMOKE = str(Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml")


def study(root: Path, name: str, trials: int, workers: int) -> tuple[float, dict]:
    config = load_config(SMOKE, ["data.samples=1000", "train.epochs=2", f"search.num_samples={trials}",
                                 "search.scheduler=fifo", f"train.num_workers={workers}"])
    start = time.perf_counter()
    summary = run_study(config, name, root)
    return time.perf_counter() - start, summary


def epoch_study(root: Path, name: str, epochs: int, ray_logging: bool) -> float:
    config = load_config(SMOKE, ["data.samples=600", f"train.epochs={epochs}", "train.patience=1000",
                                 "search.num_samples=1", "search.scheduler=fifo", "train.num_workers=0"])
    made = raypd.tune.mlflow_callback
    if ray_logging:  # the baseline: Ray's own MLflowLoggerCallback
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        def stock(tracking_uri, study_name, tags, outbox=None):
            return MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=f"raypd-{study_name}", tags=tags,
                                        save_artifact=False)

        raypd.tune.mlflow_callback = stock
    try:
        start = time.perf_counter()
        run_study(config, name, root)
        return time.perf_counter() - start
    finally:
        raypd.tune.mlflow_callback = made


def per_epoch(root: Path, ray_logging: bool) -> tuple[float, float]:
    """(wall seconds per epoch, the trial's own seconds per epoch)."""
    label = "ray" if ray_logging else "raypd"
    short = epoch_study(root, f"{label}-10", 10, ray_logging)
    long = epoch_study(root, f"{label}-60", 60, ray_logging)
    inner = [json.loads(line)["epoch_seconds"] for path in (root / "tune" / f"{label}-60").glob("*/result.json")
             for line in path.read_text().splitlines()]
    return (long - short) / 50, sum(inner) / len(inner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study(root, "warm-up", 1, args.workers)  # dataset, MLflow database, worker processes
        two, _ = study(root, "two", 2, args.workers)
        ten, summary = study(root, "ten", 10, args.workers)
        assert summary["num_trials"] == 10 and summary["total_epochs"] == 20
        print(f"train.num_workers={args.workers}: study of 2 trials {two:.1f} s, of 10 trials {ten:.1f} s")
        print(f"per-trial overhead (incl. 2 epochs of a small model): {(ten - two) / 8:.2f} s per trial")
        epoch_study(root, "warm-up-600", 2, ray_logging=False)  # its dataset
        ours, inner = per_epoch(root, ray_logging=False)
        theirs, inner_theirs = per_epoch(root, ray_logging=True)
        print(f"per epoch, one trial: wall {ours:.4f} s (the trial's own epoch {inner:.4f} s: {ours / inner:.2f}x); "
              f"with Ray's per-metric MLflow logging {theirs:.4f} s (epoch {inner_theirs:.4f} s: "
              f"{theirs / inner_theirs:.2f}x); {theirs / ours:.2f}x less wall per epoch")


if __name__ == "__main__":
    main()
