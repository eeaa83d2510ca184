"""ASHA's efficiency: the lr study with ASHA and with FIFO (no early stopping by the
scheduler) on the same data, searcher and seed; total epochs each ran and the best
validation loss each found.

    python benchmarks/asha_vs_fifo.py [--samples 2000] [--epochs 60]

A smaller dataset and epoch budget than the study file's (10,000 samples, 200 epochs) keep
this to minutes on 2 cores; both runs use the same ones. Patience-based early stopping stays
on in both (it is part of training, not of the scheduler).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd.cli import init_ray  # noqa: E402
from raypd.config import load_config  # noqa: E402
from raypd.tune import run_study  # noqa: E402

LR = str(Path(__file__).resolve().parents[1] / "tune_configs" / "lr.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    init_ray(None)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in ("fifo", "asha"):
            config = load_config(LR, [f"data.samples={args.samples}", f"train.epochs={args.epochs}",
                                      f"search.scheduler={scheduler}"])
            summary = run_study(config, f"lr-{scheduler}", tmp)
            found[scheduler] = (summary["total_epochs"], summary["best_val_loss"], summary["best_config"])
            print(f"{scheduler}: {summary['total_epochs']} epochs in all, best val_loss "
                  f"{summary['best_val_loss']:.4f} at {summary['best_config']}")
    (fifo_epochs, fifo_best, _), (asha_epochs, asha_best, _) = found["fifo"], found["asha"]
    print(f"ASHA ran {asha_epochs / fifo_epochs:.0%} of FIFO's epochs; its best val_loss is "
          f"{(asha_best - fifo_best) / fifo_best:+.1%} from FIFO's")


if __name__ == "__main__":
    main()
