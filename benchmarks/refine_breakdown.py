"""Which series refinement identifies, and why the others are not: issue 31/32's breakdown.

    python benchmarks/refine_breakdown.py --run RUN --data FRESH [--test 300] [--noise 0.0]

RUN: a raypd.train output folder; FRESH: series of its settings and another seed (`raypd.generate
--seed 7 ...`), whose true targets are known. Each of the first --test series is fitted in this
process (raypd.refine.fit_many, the model's estimate as the start, its restarts) and counted as

- identified: the fit explains the series and determines every free target;
- fitted, undetermined: the fit explains the series but leaves targets undetermined (the series
  cannot tell them: a desire that never rises above mu hides g_i, Pi_i. and v(0)_i); the sets of
  undetermined targets are counted;
- not fitted, sensitive: no start explains the series, and its own solution depends on the
  solver's tolerance (at the true targets, rtol 1e-8 against 1e-12 differ by more than 1e-3 of
  the series' scale, relative RMS): no fit to the identification threshold need exist;
- not fitted, optimiser failure: no start explains the series although the true targets do.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypd import ode  # noqa: E402
from raypd.config import DataConfig, from_dict  # noqa: E402
from raypd.dataset import load_dataset  # noqa: E402
from raypd.intervals import add_noise, channel_scale  # noqa: E402
from raypd.refine import FitProblem, _explains, _FitContext, _rms, fit_many  # noqa: E402
from raypd.serve import SavedModel  # noqa: E402

SENSITIVE = 1e-3  # relative RMS change of the true solution between rtol 1e-8 and 1e-12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a raypd.train output folder (checkpoints/best)")
    p.add_argument("--data", required=True, help="fresh series of the run's settings, another seed")
    p.add_argument("--test", type=int, default=300, help="the first TEST series of --data")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian observation noise (of each channel's std)")
    args = p.parse_args()

    fresh = load_dataset(args.data)
    problem = FitProblem.from_data_config(from_dict(DataConfig, fresh.manifest["settings"]))
    model = SavedModel.load(Path(args.run) / "checkpoints" / "best")
    count = min(args.test, len(fresh.sample_id))
    truth = fresh.targets[:count]
    series = fresh.series[:count].astype(np.float64)
    if args.noise:
        series = add_noise(series, args.noise, np.random.default_rng(2024))
    n, n_p = problem.n, ode.num_params(problem.n)
    ode.warm_up(n)
    starts = model.predict(series.astype(np.float32))[:, None, :]
    started = time.perf_counter()
    fits = fit_many(series, starts, problem, fresh.sample_id[:count])
    seconds = time.perf_counter() - started
    exact, _ = ode.solve(truth[:, :n_p], truth[:, n_p:], problem.times, n, 1e-12, 1e-14)
    tight, _ = ode.solve(truth[:, :n_p], truth[:, n_p:], problem.times, n, problem.rtol, problem.atol)
    scale = channel_scale(exact)[:, :, None]
    sensitivity = np.sqrt((((tight - exact) / scale) ** 2).mean(axis=(1, 2)))
    names = model.target_names
    kinds, undetermined, rows = collections.Counter(), collections.Counter(), []
    for i in range(count):
        ctx = _FitContext.of(series[i], starts[i], problem)
        x = fits["estimate"][i][problem.free]
        if fits["identified"][i]:
            kind = "identified"
        elif _explains(ctx, x, _rms(ctx, x)):
            kind = "fitted, undetermined"
            hidden = tuple(names[j] for j in np.flatnonzero(~fits["determined"][i]))
            undetermined[hidden] += 1
        elif sensitivity[i] > SENSITIVE:
            kind = "not fitted, sensitive"
        else:
            kind = "not fitted, optimiser failure"
        kinds[kind] += 1
        if kind != "identified":
            error = float(((fits["estimate"][i] - truth[i]) ** 2).mean())
            rows.append(f"  {int(fresh.sample_id[i]):>6} {kind:<30} residual {fits['residual'][i]:.1e}  "
                        f"solver sensitivity {sensitivity[i]:.1e}  starts {fits['starts'][i]}  target mse {error:.4f}")
    print(f"{count} series of {args.data} (n={n}, noise {args.noise:g}), model {args.run}: "
          f"{seconds / count * 1e3:.0f} ms per series in this process")
    for kind in ("identified", "fitted, undetermined", "not fitted, sensitive", "not fitted, optimiser failure"):
        print(f"{kind:>31}: {kinds[kind]:4d} ({kinds[kind] / count:.1%})")
    for hidden, c in undetermined.most_common():
        print(f"{'':>33}{c:3d} x undetermined {', '.join(hidden)}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
