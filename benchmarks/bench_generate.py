"""Generation speed: raypd.generate end to end on Ray Data against a seed-style baseline, in
one run on this machine.

    python benchmarks/bench_generate.py                 # n=1 (200,000 samples) and n=3 (20,000)
    python benchmarks/bench_generate.py --memory        # also 1,000,000 n=1 samples, peak RSS
    python benchmarks/bench_generate.py --scaling 1,2,4,8,16   # samples/s for ray.init(num_cpus=k)

(a) baseline, as the seed's package generates: per sample, draw until the stability filter
    (called on that one draw) passes, then one scipy solve_ivp (RK45, rtol 1e-6, atol 1e-9)
    with a Python right-hand side; redraw if it diverges. Best of 3 runs of >= 100 samples
    (one slow run must not flatter the ratio).
(b) raypd.generate through Ray Data on local Ray with every CPU of the machine; Ray's
    start-up and the first job on fresh workers are timed separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypd import ode  # noqa: E402
from raypd.cli import init_ray  # noqa: E402
from raypd.config import DataConfig
from raypd.generate import generate  # noqa: E402
from tests.reference import split, stable_one  # noqa: E402  (the loop-per-draw filter)


def baseline_rate(config: DataConfig, samples: int) -> float:
    """Seed-style: per sample, draw until a per-draw stability check passes (loops over the
    equilibrium regimes, as the seed's compute_equilibria), then one solve_ivp RK45 with a
    Python right-hand side that builds the observables and splits them again (as the seed's
    preference_dynamics_rhs); redraw if the solution leaves |x| <= 1e5."""
    n = config.n_actions
    n_p = ode.num_params(n)
    lo, hi = config.bounds()
    times = config.times()
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    for _ in range(samples):
        while True:
            draw = lo + (hi - lo) * rng.random(lo.size)
            if not stable_one(draw[:n_p], n):
                continue
            g, mu, Pi, Gamma = split(draw[:n_p], n)

            def rhs(t, x):
                observed = np.concatenate([np.maximum(x[:n], mu), np.maximum(x[n:], 0.0)])
                u, a = observed[:n], observed[n:]
                return np.concatenate([g - Pi @ a, u - Gamma @ a])

            sol = solve_ivp(rhs, (times[0], times[-1]), draw[n_p:], method="RK45",
                            rtol=1e-6, atol=1e-9, t_eval=times)
            if sol.success and np.abs(sol.y).max() <= ode.DIVERGENCE_BOUND:
                break
    return samples / (time.perf_counter() - start)


class PeakRSS:
    """Peak resident memory (Linux VmHWM) of this process and of every Ray worker process,
    read from /proc every 0.2 s (a worker that exits keeps its last reading)."""

    def __init__(self):
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        me = os.getpid()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if int(proc.name) != me and "ray::" not in cmd and "default_worker.py" not in cmd:
                    continue
                status = (proc / "status").read_text()
            except OSError:
                continue
            hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines()
                        if line.startswith("VmHWM:")), 0)
            key = "driver" if int(proc.name) == me else f"worker {proc.name}"
            self.peak[key] = max(self.peak.get(key, 0), hwm)

    def _run(self):
        while not self._stop.is_set():
            self._read()
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._read()


def best_baseline_rate(config: DataConfig, samples: int, runs: int = 3) -> float:
    """The best of `runs` baseline runs, each on its own stretch of the random stream."""
    return max(baseline_rate(dataclasses.replace(config, seed=config.seed + r), samples) for r in range(runs))


def compile_cost() -> str:
    """First call of the compiled solver in a fresh process: with numba's on-disk cache
    (every run after the first) and with an empty one (the first run of an install)."""
    code = "import time; t = time.perf_counter(); from raypd import ode; print(time.perf_counter() - t, ode.warm_up(1))"
    out = []
    with tempfile.TemporaryDirectory() as cold:
        for label, env in (("cached", {}), ("empty cache", {"NUMBA_CACHE_DIR": cold})):
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    env={**os.environ, **env}, check=True)
            imp, first = map(float, result.stdout.split())
            out.append(f"{label}: import {imp:.2f} s + first call {first:.2f} s")
    return "; ".join(out)


def scaling(counts: list[int], samples_n1: int, samples_n3: int, rtol: float) -> None:
    """samples/s of raypd.generate on a local Ray limited to k CPUs, for each k."""
    import ray

    first = None
    for k in counts:
        ray.init(address="local", num_cpus=k, include_dashboard=False, logging_level="WARNING")
        with tempfile.TemporaryDirectory() as tmp:
            # start every worker: two blocks per CPU
            generate(DataConfig(samples=8 * k), Path(tmp) / "warm-up", block_size=4, progress=False)
            rates = []
            for n, samples in ((1, samples_n1), (3, samples_n3)):
                config = DataConfig(n_actions=n, samples=samples, seed=123, rtol=rtol, atol=rtol / 100)
                rates.append(raypd_rate(config, Path(tmp))[0])
        ray.shutdown()
        first = first or rates
        print(f"num_cpus={k:3d}: n=1 {rates[0]:10.1f} samples/s ({rates[0] / first[0]:5.1f}x) | "
              f"n=3 {rates[1]:9.1f} samples/s ({rates[1] / first[1]:5.1f}x)", flush=True)


def raypd_rate(config: DataConfig, workdir: Path) -> tuple[float, float]:
    start = time.perf_counter()
    manifest = generate(config, workdir / f"n{config.n_actions}-{config.samples}", progress=False)
    elapsed = time.perf_counter() - start
    return config.samples / elapsed, manifest["acceptance"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples-n1", type=int, default=200_000)
    ap.add_argument("--samples-n3", type=int, default=20_000)
    ap.add_argument("--baseline-samples", type=int, default=100, help="per baseline run, >= 100 (best of 3)")
    ap.add_argument("--rtol", type=float, default=DataConfig.rtol,
                    help="raypd's solver rtol (atol = rtol/100); default %(default)s as in DataConfig")
    ap.add_argument("--memory", action="store_true", help="also 1,000,000 n=1 samples, peak RSS")
    ap.add_argument("--scaling", help="comma-separated CPU counts k: samples/s with ray.init(num_cpus=k) "
                                      "(only this, no baseline)")
    args = ap.parse_args()
    if args.scaling:
        scaling([int(k) for k in args.scaling.split(",")], args.samples_n1, args.samples_n3, args.rtol)
        return

    print(f"compiled solver, first call: {compile_cost()}")

    start = time.perf_counter()
    init_ray(None)
    print(f"Ray start-up: {time.perf_counter() - start:.1f} s (not counted below)")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        # The first Ray Data job also starts and warms the worker processes (imports of
        # numpy, pyarrow, raypd; loading the compiled solver): part of start-up, timed here on
        # a tiny dataset of two blocks per CPU, so that every worker is started.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        start = time.perf_counter()
        generate(DataConfig(samples=8 * cpus), Path(tmp) / "warm-up", block_size=4, progress=False)
        print(f"first job on fresh workers ({8 * cpus} samples in {2 * cpus} blocks): "
              f"{time.perf_counter() - start:.1f} s (not counted below)")

    print(f"cluster CPUs: {ray.cluster_resources().get('CPU')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, samples in ((1, args.samples_n1), (3, args.samples_n3)):
            config = DataConfig(n_actions=n, samples=samples, seed=123, rtol=args.rtol, atol=args.rtol / 100)
            base = best_baseline_rate(config, max(args.baseline_samples, 100))
            fast, acceptance = raypd_rate(config, Path(tmp))
            rows.append((n, samples, base, fast, acceptance))
            print(f"n={n}: baseline {base:8.1f} samples/s | raypd.generate {fast:9.1f} samples/s "
                  f"({samples} samples, acceptance {acceptance:.3f}) | ratio {fast / base:6.1f}x")
        if args.memory:
            config = DataConfig(n_actions=1, samples=1_000_000, seed=123, rtol=args.rtol, atol=args.rtol / 100)
            with PeakRSS() as rss:
                fast, _ = raypd_rate(config, Path(tmp))
            top = sorted(rss.peak.items(), key=lambda kv: -kv[1])[:4]
            print(f"n=1, 1,000,000 samples: {fast:.1f} samples/s; peak RSS: "
                  + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in top))
    ray.shutdown()


if __name__ == "__main__":
    main()
