"""Accuracy of raypd's compiled per-sample solver against scipy DOP853, for n=1, 2, 3.

    python benchmarks/accuracy_ode.py [--samples-n1 300 --samples-n2 150 --samples-n3 60]

For generated samples (raypd.generate.generate_samples: stable, bounded draws from the default
ranges), the error is max |series - reference| / max |reference| per sample, the reference
being DOP853 at rtol 1e-10, atol 1e-12 (docs/science.md §5). Some n>=2 systems are (nearly) chaotic:
a relative change of 1e-9 in the initial conditions moves their series by far more than 1e-6
of its scale, and no solver at rtol 1e-8 can follow them. The script counts these
"sensitive" samples, and gives the error on the others against DOP853 at rtol 1e-12.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd.config import DataConfig  # noqa: E402
from raypd.generate import generate_samples  # noqa: E402
from tests.reference import dop853_series  # noqa: E402


def stats(errors: np.ndarray) -> str:
    if errors.size == 0:
        return "n/a"
    q = np.percentile(errors, [50, 90, 99])
    return f"median {q[0]:.1e}  p90 {q[1]:.1e}  p99 {q[2]:.1e}  max {errors.max():.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples-n1", type=int, default=300)
    ap.add_argument("--samples-n2", type=int, default=150)
    ap.add_argument("--samples-n3", type=int, default=60)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    for n, count in ((1, args.samples_n1), (2, args.samples_n2), (3, args.samples_n3)):
        config = DataConfig(n_actions=n, samples=count, seed=args.seed)
        start = time.perf_counter()
        cols, _ = generate_samples(config, np.arange(count))
        times = config.times()
        err, err_tight, conditioned = [], [], []
        for p, x0, s in zip(cols["params"], cols["ic"], cols["series"].astype(np.float64)):
            ref = dop853_series(p, x0, times, n, rtol=1e-10, atol=1e-12)
            tight = dop853_series(p, x0, times, n, rtol=1e-12, atol=1e-14)
            nudged = dop853_series(p, x0 * (1 + 1e-9), times, n, rtol=1e-12, atol=1e-14)
            scale = max(np.abs(tight).max(), 1e-12)
            err.append(np.abs(s - ref).max() / scale)
            err_tight.append(np.abs(s - tight).max() / scale)
            conditioned.append(np.abs(nudged - tight).max() / scale < 1e-6)
        err, err_tight, conditioned = map(np.array, (err, err_tight, conditioned))
        print(f"n={n} ({count} samples, rtol {config.rtol}, series stored as float32):")
        print(f"  vs DOP853 rtol 1e-10: {stats(err)}")
        print(f"  sensitive (ic * (1 + 1e-9) moves the series > 1e-6): {(~conditioned).sum()}")
        print(f"  the others, vs DOP853 rtol 1e-12: {stats(err_tight[conditioned])}")
        print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
