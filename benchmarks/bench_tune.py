"""Per-trial overhead of a study: wall time of a study of 10 two-epoch trials minus that of
a study of 2 such trials, divided by 8 (1,000 samples, a small model), in one run.

    python benchmarks/bench_tune.py [--workers 0]

--workers 0 (the studies' default) runs each trial's loop in the trial's own process;
--workers 1 gives every trial a real Ray Train worker group, for comparison. Ray's start-up,
the dataset and MLflow's database set-up are paid before both studies and not counted.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd.cli import init_ray  # noqa: E402
from raypd.config import load_config  # noqa: E402
from raypd.tune import run_study  # noqa: E402

SMOKE = str(Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml")


def study(root: Path, name: str, trials: int, workers: int) -> tuple[float, dict]:
    config = load_config(SMOKE, ["data.samples=1000", "train.epochs=2", f"search.num_samples={trials}",
                                 "search.scheduler=fifo", f"train.num_workers={workers}"])
    start = time.perf_counter()
    summary = run_study(config, name, root)
    return time.perf_counter() - start, summary


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


if __name__ == "__main__":
    main()
