"""raypd.generate: samples as a pure function of (seed, id), the Ray Data pipeline, the
Parquet and manifest contract, atomic publish and resume, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypd import ode
from raypd.config import DataConfig, to_dict
from raypd.dataio import LEGACY_MANIFEST, MANIFEST, content_hash, row_digests
from raypd.dataset import load_dataset
from raypd.generate import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, default_block_size, generate, generate_samples
from tests.conftest import REPO, run_cli, snapshot
from tests.reference import stable_one


def read_rows(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    tables = [pq.read_table(folder / f["path"]) for f in manifest["files"]]
    return manifest, tables


# --------------------------------------------------------------------------- pure function


@pytest.mark.parametrize("n", [1, 2])
def test_a_sample_depends_only_on_seed_and_id(n):
    cfg = DataConfig(n_actions=n, samples=20, seed=7)
    all_, draws = generate_samples(cfg, np.arange(0, 12))
    part, _ = generate_samples(cfg, np.array([9, 3, 4]))
    for key in ("params", "ic", "series"):
        assert np.array_equal(part[key], all_[key][[9, 3, 4]])
    assert draws >= 12
    other, _ = generate_samples(DataConfig(n_actions=n, samples=20, seed=8), np.arange(0, 12))
    assert not np.array_equal(other["params"], all_["params"])


def test_sample_streams_are_numpys_philox_keyed_by_seed_and_id():
    for seed, sample_id in ((0, 0), (42, 7), (2**64 - 1, 123_456_789)):
        key = np.array([seed, sample_id], dtype=np.uint64)
        expected = np.random.Generator(np.random.Philox(key=key)).random(23)
        assert np.array_equal(ode.sample_uniforms(seed, sample_id, 23), expected)


@pytest.mark.parametrize("n", [1, 3])
def test_a_sample_is_the_first_draw_of_its_stream_that_passes_the_filter_and_stays_bounded(n):
    """Rebuilt from numpy's Philox and the loop-per-draw reference filter."""
    cfg = DataConfig(n_actions=n, samples=5, seed=9)
    cols, draws = generate_samples(cfg, np.arange(5))
    lo, hi = cfg.bounds()
    n_p = ode.num_params(n)
    total = 0
    for i in range(5):
        rng = np.random.Generator(np.random.Philox(key=[cfg.seed, i]))
        while True:
            draw = lo + (hi - lo) * rng.random(lo.size)
            total += 1
            if stable_one(draw[:n_p], n) and ode.solve(draw[None, :n_p], draw[None, n_p:], cfg.times(), n)[1][0]:
                break
        assert np.array_equal(cols["params"][i], draw[:n_p]) and np.array_equal(cols["ic"][i], draw[n_p:])
    assert draws == total


def test_block_plan_follows_the_cluster():
    # the case: 10,000 samples on 8 CPUs make at least 8 blocks (here 16)
    assert -(-10_000 // default_block_size(10_000, 8)) >= 16
    for samples, cpus in [(10_000, 8), (50_000, 2), (1_000_000, 2), (1_000_000, 16), (100_000, 16),
                          (300, 2), (10, 64), (20_000, 1)]:
        size = default_block_size(samples, cpus)
        blocks = -(-samples // size)
        assert 1 <= size <= MAX_BLOCK_SIZE
        # at least 2 blocks per CPU, unless that makes blocks smaller than the minimum
        assert blocks >= min(2 * cpus, -(-samples // MIN_BLOCK_SIZE)), (samples, cpus, size)
    assert default_block_size(50_000, 2) == 6250  # 8 blocks: 4 whole rounds of 2, not 7 of 8192


def test_kept_samples_pass_the_filter_and_match_their_own_solution():
    cfg = DataConfig(n_actions=2, samples=10, seed=3)
    cols, draws = generate_samples(cfg, np.arange(10))
    n_p = ode.num_params(2)
    assert ode.is_stable(ode.Params.unpack(cols["params"], 2)).all()
    assert draws > 10  # n=2 keeps about a third of the draws
    series, ok = ode.solve(cols["params"], cols["ic"], cfg.times(), 2, cfg.rtol, cfg.atol)
    assert ok.all() and np.array_equal(series.astype(np.float32), cols["series"])
    lo, hi = cfg.bounds()
    values = np.concatenate([cols["params"], cols["ic"]], axis=1)
    assert ((values >= lo) & (values <= hi)).all()
    assert cols["params"].shape == (10, n_p) and cols["series"].dtype == np.float32


def test_a_seed_beyond_the_stream_key_is_refused():
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*64"):
        generate_samples(DataConfig(samples=1, seed=2**64), np.arange(1))


def test_fixed_mu_is_exactly_zero():
    cols, _ = generate_samples(DataConfig(samples=5, mu_range=(0.0, 0.0)), np.arange(5))
    assert (cols["params"][:, 1] == 0.0).all()


# --------------------------------------------------------------------------- on Ray Data


def test_dataset_is_identical_whatever_the_block_size(ray_local, tmp_path):
    cfg = DataConfig(n_actions=2, samples=37, seed=11)
    hashes = []
    for block_size in (5, 16, 64):
        manifest = generate(cfg, tmp_path / f"b{block_size}", block_size=block_size, progress=False)
        hashes.append(manifest["content_hash"])
        assert len(manifest["files"]) == -(-37 // block_size)
    assert len(set(hashes)) == 1
    # and the hash is that of the rows themselves, generated without Ray
    cols, _ = generate_samples(cfg, np.arange(37))
    assert hashes[0] == content_hash(row_digests(cols))


def test_parquet_and_manifest_contract(ray_local, tmp_path):
    cfg = DataConfig(n_actions=1, samples=30, seed=5, mu_range=(0.0, 0.0), time_points=51,
                     time_span=(0.0, 50.0))
    out = tmp_path / "ds"
    manifest = generate(cfg, out, block_size=8, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [f["path"] for f in manifest["files"]])
    assert not list(tmp_path.glob(".*staging*"))
    for key in ("n_actions", "samples", "seed", "ranges", "time_points", "series_shape",
                "content_hash", "raypd_version"):
        assert key in manifest
    assert manifest["series_shape"] == [2, 51] and manifest["time_points"][-1] == 50.0
    assert manifest["ranges"]["mu_range"] == [0.0, 0.0] and manifest["settings"] == to_dict(cfg)
    _, tables = read_rows(out)
    table = tables[0]
    assert str(table.schema.field("sample_id").type) == "int64"
    assert str(table.schema.field("params").type) == "list<element: double>"
    assert str(table.schema.field("ic").type) == "list<element: double>"
    assert str(table.schema.field("series").type) == "list<element: float>"
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    assert np.array_equal(ids, np.arange(30))
    series = np.concatenate([np.stack(t.column("series").to_numpy(zero_copy_only=False)) for t in tables])
    assert series.shape == (30, 2 * 51) and np.isfinite(series).all()
    # row-major (channel, time): channel 1 is a = max(m, 0) >= 0, channel 0 is u >= mu = 0
    cols, _ = generate_samples(cfg, np.arange(30))
    assert np.array_equal(series, cols["series"].reshape(30, -1))


def test_a_dataset_folder_opens_with_pandas_pyarrow_and_ray_data(ray_local, tmp_path):
    import pandas as pd
    import pyarrow.dataset as pads

    cfg = DataConfig(n_actions=2, samples=30, seed=6, time_points=21, time_span=(0.0, 20.0))
    out = tmp_path / "ds"
    generate(cfg, out, block_size=8, progress=False)
    assert (out / MANIFEST).is_file() and not (out / LEGACY_MANIFEST).exists()
    cols, _ = generate_samples(cfg, np.arange(30))

    frame = pd.read_parquet(out).sort_values("sample_id")
    assert list(frame.columns) == ["sample_id", "params", "ic", "series"]
    assert np.array_equal(frame["sample_id"], np.arange(30))
    assert np.array_equal(np.stack(frame["series"]), cols["series"].reshape(30, -1))
    table = pads.dataset(out, format="parquet").to_table()
    assert table.num_rows == 30 and sorted(table.column("sample_id").to_pylist()) == list(range(30))
    rows = ray_local.data.read_parquet(str(out)).take_all()
    assert sorted(r["sample_id"] for r in rows) == list(range(30))


def test_a_dataset_written_with_the_old_manifest_name_still_reads(ray_local, tmp_path):
    cfg = DataConfig(samples=12, seed=3, time_points=11, time_span=(0.0, 10.0))
    out = tmp_path / "ds"
    manifest = generate(cfg, out, progress=False)
    fresh = load_dataset(out)
    (out / MANIFEST).rename(out / LEGACY_MANIFEST)  # as earlier raypd wrote it
    old = load_dataset(out)
    assert old.manifest == manifest and np.array_equal(old.series, fresh.series)
    before = snapshot(tmp_path)
    assert generate(cfg, out, progress=False) == manifest  # recognised as this dataset, untouched
    with pytest.raises(ValueError, match="already holds a different dataset"):
        generate(DataConfig(samples=13, seed=3), out, progress=False)
    assert snapshot(tmp_path) == before


def test_a_folder_with_these_settings_from_the_earlier_sampler_is_not_this_dataset(ray_local, tmp_path):
    cfg = DataConfig(samples=12, seed=3, time_points=11, time_span=(0.0, 10.0))
    out = tmp_path / "ds"
    manifest = generate(cfg, out, progress=False)
    # earlier raypd: legacy manifest name, no sampler key (its rows came from SeedSequence streams)
    del manifest["sampler"]
    (out / LEGACY_MANIFEST).write_text(json.dumps(manifest))
    (out / MANIFEST).unlink()
    assert load_dataset(out).manifest == manifest  # still trains
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="drawn by an earlier raypd from other random streams"):
        generate(cfg, out, progress=False)
    assert snapshot(tmp_path) == before


def test_existing_same_dataset_returns_at_once_and_different_one_is_refused(ray_local, tmp_path):
    cfg = DataConfig(samples=12, seed=1)
    out = tmp_path / "ds"
    first = generate(cfg, out, progress=False)
    before = snapshot(tmp_path)
    import raypd.generate

    def planned(*args):  # "at once": the same dataset there plans (and generates) nothing
        raise AssertionError("generate planned blocks for a dataset that is there already")

    original, raypd.generate._block_plan = raypd.generate._block_plan, planned
    try:
        again = generate(cfg, out, progress=False)
    finally:
        raypd.generate._block_plan = original
    assert again == first
    with pytest.raises(ValueError, match="already holds a different dataset .*samples"):
        generate(DataConfig(samples=13, seed=1), out, progress=False)
    assert snapshot(tmp_path) == before


def test_too_few_stable_draws_is_a_clear_error(ray_local, tmp_path):
    # Pi and Gamma diagonals tiny, off-diagonals strongly reinforcing: nothing is stable
    cfg = DataConfig(n_actions=2, samples=4, pi_diag_range=(0.1, 0.1), gamma_diag_range=(0.1, 0.1),
                     gamma_offdiag_range=(-3.0, -3.0), pi_offdiag_range=(-3.0, -3.0),
                     g_range=(0.0, 0.0))
    with pytest.raises(ValueError, match="no draw in 20000 tries .* passes the stability filter"):
        generate(cfg, tmp_path / "ds", progress=False)
    assert list(tmp_path.iterdir()) == []
    # the per-sample limit inside the blocks stops just as clearly (without the probe)
    with pytest.raises(ValueError, match="found no stable, bounded draw in 20000 tries"):
        generate_samples(cfg, np.arange(1))


# --------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_interrupted_run_publishes_nothing_and_rerun_completes(tmp_path):
    """SIGKILL the CLI once some blocks are in staging; the same command then finishes, reusing
    them, with the content_hash of an uninterrupted run."""
    out = tmp_path / "ds"
    # n=3 (~40 draws per sample): blocks long enough that the kill lands mid-run
    args = ["raypd.generate", "--n-actions", "3", "--samples", "800", "--seed", "3",
            "--block-size", "80", "--out", str(out), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    staging = tmp_path / ".ds.staging"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray it started
    proc.wait()
    done_before = len(list(staging.glob("part-*.parquet")))
    assert 2 <= done_before < 10, done_before
    assert not out.exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    manifest, tables = read_rows(out)
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    assert np.array_equal(ids, np.arange(800))  # no sample twice, none missing
    cfg = DataConfig(n_actions=3, samples=800, seed=3)
    cols, _ = generate_samples(cfg, np.arange(800))
    assert manifest["content_hash"] == content_hash(row_digests(cols))


def test_ranges_chosen_to_diverge_never_put_nan_or_inf_in_a_dataset(ray_local, tmp_path):
    """Weak damping and strong mutual reinforcement: many stable-looking draws blow up (or
    fail the filter); the dataset still holds only finite, bounded series."""
    cfg = DataConfig(n_actions=2, samples=40, seed=2, gamma_diag_range=(0.1, 1.0), gamma_offdiag_range=(-3.0, -0.5))
    manifest = generate(cfg, tmp_path / "ds", progress=False)
    assert manifest["acceptance"] < 0.1  # most draws were rejected
    _, tables = read_rows(tmp_path / "ds")
    series = np.concatenate([np.stack(t.column("series").to_numpy(zero_copy_only=False)) for t in tables])
    assert series.shape[0] == 40 and np.isfinite(series).all() and np.abs(series).max() <= 1e5
    # where every draw that passes the filter blows up, nothing is written at all
    hopeless = DataConfig(n_actions=2, samples=4, gamma_diag_range=(0.1, 0.3), gamma_offdiag_range=(-3.0, -1.0),
                          pi_offdiag_range=(-3.0, -2.0))
    with pytest.raises(ValueError, match="stays bounded"):
        generate(hopeless, tmp_path / "hopeless", progress=False)
    assert not (tmp_path / "hopeless").exists()
