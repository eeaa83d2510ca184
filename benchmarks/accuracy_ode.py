"""Accuracy of raypd's batched solver against scipy DOP853, for n=1, 2, 3.

    python benchmarks/accuracy_ode.py [--samples-n1 300 --samples-n2 150 --samples-n3 60]

For generated samples (raypd.generate.generate_samples: stable, bounded draws from the default
ranges), the error is max |series - reference| / max |reference| per sample, the reference
being DOP853 at rtol 1e-10, atol 1e-12 (DESIGN §1). Some n>=2 systems are chaotic: there,
DOP853 at rtol 1e-10 and 1e-12 disagree themselves, so the script also counts the samples
whose two references differ by more than 1e-4 ("ill-conditioned") and gives the error on the
others against the tighter reference.
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
            scale = max(np.abs(tight).max(), 1e-12)
            err.append(np.abs(s - ref).max() / scale)
            err_tight.append(np.abs(s - tight).max() / scale)
            conditioned.append(np.abs(ref - tight).max() / scale < 1e-4)
        err, err_tight, conditioned = map(np.array, (err, err_tight, conditioned))
        print(f"n={n} ({count} samples, rtol {config.rtol}, series stored as float32):")
        print(f"  vs DOP853 rtol 1e-10: {stats(err)}")
        print(f"  ill-conditioned (the two references differ > 1e-4): {(~conditioned).sum()}")
        print(f"  well-conditioned, vs DOP853 rtol 1e-12: {stats(err_tight[conditioned])}")
        print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
