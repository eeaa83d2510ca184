"""raypd.generate's default block plan follows the cluster: on a local Ray with 8 logical CPUs,
10,000 samples become at least 8 blocks and at least 8 generation tasks run at once (Ray's
timeline), while the dataset stays the one a single process makes."""

import numpy as np
import pytest

from raypd.config import DataConfig
from raypd.dataio import content_hash, row_digests
from raypd.generate import generate, generate_samples


@pytest.fixture(scope="module")
def ray_8_cpus():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


@pytest.mark.slow  # ~1 min on 2 cores: eight worker processes start
def warm_workers(ray, count: int, n: int) -> None:
    """Start `count` worker processes with the compiled solver loaded, so that the overlap
    measured below is that of the plan, not of worker start-up (seconds each on 2 cores)."""

    @ray.remote(num_cpus=1)
    def load(barrier):
        import time

        from raypd import ode

        ode.warm_up(n)
        ray.get(barrier.arrive.remote())
        while ray.get(barrier.count.remote()) < count:
            time.sleep(0.05)

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.arrived = 0

        def arrive(self):
            self.arrived += 1

        def count(self):
            return self.arrived

    barrier = Barrier.remote()
    ray.get([load.remote(barrier) for _ in range(count)])


def test_ten_thousand_samples_spread_over_eight_cpus(ray_8_cpus, tmp_path):
    # n=3: ~40 draws per sample make each block long (~0.5 s of CPU) next to task launch
    cfg = DataConfig(n_actions=3, samples=10_000, seed=21)
    warm_workers(ray_8_cpus, 8, cfg.n_actions)
    manifest = generate(cfg, tmp_path / "ds", progress=False)
    assert len(manifest["files"]) >= 8
    # one timeline event per task execution, categorised by the task's name
    tasks = [(e["ts"], e["ts"] + e["dur"]) for e in ray_8_cpus.timeline()
             if e.get("ph") == "X" and e.get("cat") == "task::MapBatches(generate_block)"]
    assert len(tasks) == len(manifest["files"])
    start = min(s for s, _ in tasks)
    assert overlap(tasks) >= 8, [(round((s - start) / 1e6, 2), round((e - start) / 1e6, 2)) for s, e in sorted(tasks)]
    cols, _ = generate_samples(cfg, np.arange(10_000))
    assert manifest["content_hash"] == content_hash(row_digests(cols))
