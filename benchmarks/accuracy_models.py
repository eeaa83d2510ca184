"""Model-only accuracy of trained runs on fresh series, with and without test-time averaging
over the relabellings of the actions (model.average_relabellings): issue 31's tables.

    python benchmarks/accuracy_models.py --data FRESH --run RUN [RUN ...] [--test 1500] [--json OUT]

FRESH: series of the runs' settings and another seed (`raypd.generate --seed 7 ...`). For
each run (a raypd.train output folder) and its best checkpoint: the test MSE in raw units
(all targets, mu included, as metrics.json), R², clean and with 2% Gaussian observation noise
(of each channel's std), as trained and (n >= 2) with the prediction averaged over the n!
relabellings; the same noise draw for every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd.dataset import load_dataset  # noqa: E402
from raypd.intervals import add_noise  # noqa: E402
from raypd.serve import SavedModel  # noqa: E402


def scores(estimate: np.ndarray, truth: np.ndarray) -> dict:
    mse = float(((estimate - truth) ** 2).mean())
    variance = truth.var(axis=0)
    varying = variance > 0
    r2 = 1 - ((estimate - truth) ** 2).mean(axis=0)[varying] / variance[varying]
    return {"mse": round(mse, 4), "r2": round(float(r2.mean()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="fresh series (the runs' settings, another seed)")
    p.add_argument("--run", nargs="+", required=True, help="raypd.train output folders")
    p.add_argument("--test", type=int, default=1500, help="the first TEST series of --data")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()

    fresh = load_dataset(args.data)
    count = min(args.test, len(fresh.sample_id))
    truth, clean = fresh.targets[:count], fresh.series[:count]
    noisy = add_noise(clean, 0.02, np.random.default_rng(2024)).astype(np.float32)
    n = clean.shape[1] // 2
    print(f"{count} series of {args.data} (n={n}, seed {fresh.manifest['seed']})")
    print(f"{'run':<40} {'averaged':>8} {'clean mse':>10} {'r2':>6} {'2% mse':>8} {'r2':>6}")
    table = []
    for run in args.run:
        model = SavedModel.load(Path(run) / "checkpoints" / "best")
        for averaged in ([False, True] if n > 1 else [False]):
            model.config = dataclasses.replace(model.config, average_relabellings=averaged)
            row = {"run": run, "family": model.config.family, "averaged": averaged,
                   "clean": scores(model.predict(clean), truth), "noise_2pct": scores(model.predict(noisy), truth)}
            table.append(row)
            print(f"{Path(run).name:<40} {str(averaged):>8} {row['clean']['mse']:>10.4f} {row['clean']['r2']:>6.3f} "
                  f"{row['noise_2pct']['mse']:>8.4f} {row['noise_2pct']['r2']:>6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
