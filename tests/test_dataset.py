"""raypd.dataset: reading back with checks, split, normalisation, target standardisation,
raw-unit metrics."""

import numpy as np
import pytest

from raypd.config import DataConfig, TrainConfig
from raypd.dataio import MANIFEST
from raypd.dataset import load_dataset, normalise_inputs, prepare, split_ids
from raypd.intervals import metrics
from raypd.generate import generate, generate_samples
from tests.conftest import COLUMN_DAMAGE, corrupt

CONFIG = DataConfig(samples=40, seed=4, mu_range=(0.0, 0.0), time_points=33, time_span=(0.0, 32.0))


@pytest.fixture(scope="module")
def dataset_dir(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    generate(CONFIG, out, block_size=16, progress=False)
    return out


def test_reads_back_what_was_generated(dataset_dir):
    ds = load_dataset(dataset_dir)
    cols, _ = generate_samples(CONFIG, np.arange(40))
    assert np.array_equal(ds.sample_id, np.arange(40))
    assert np.array_equal(ds.params, cols["params"]) and np.array_equal(ds.ic, cols["ic"])
    assert np.array_equal(ds.series, cols["series"])
    assert ds.target_names == ["g_1", "mu_1", "Pi_11", "Gamma_11", "v0_1", "m0_1"]


CASES = [("no manifest", f"no {MANIFEST}"), ("truncated", "not a readable raypd Parquet file"),
         ("missing file", f"listed in {MANIFEST} but missing"),
         ("foreign parquet", "not a readable raypd Parquet file"), ("row count", f"rows, {MANIFEST} says"),
         ("shape", "does not match n_actions"), ("nan", "column series holds NaN"),
         ("manifest not json", f"{MANIFEST} is not valid JSON"),
         ("entry without rows", "files must be a list of {path: file name, rows: count}"),
         ("files not a list", "files must be a list of"),
         ("no content_hash", "content_hash must be a string (got null)"),
         ("no param_names", "param_names must be a list of 4 names"),
         ("time_points cut short", "time_points must be a list of 33 times"),
         ("manifest a list", "must hold a JSON object (got list)"),
         ("params as plain numbers", "column params is double; it must hold lists of floating-point numbers"),
         ("series as strings", "column series is list<element: string>; it must hold lists of floating-point")]


@pytest.mark.parametrize("how, message", CASES)
def test_a_damaged_dataset_is_named(dataset_dir, tmp_path, how, message):
    bad, first = corrupt(dataset_dir, tmp_path, how)
    with pytest.raises(ValueError) as info:
        load_dataset(bad)
    assert message in str(info.value)
    in_part_file = how in ("truncated", "missing file", "foreign parquet", "row count", "nan", *COLUMN_DAMAGE)
    named = first.name if in_part_file else MANIFEST
    assert named in str(info.value)


def test_split_is_deterministic_disjoint_and_70_15_15_with_half_the_validation_set_apart():
    ids = np.arange(1000)
    a = split_ids(ids, (0.7, 0.15, 0.15), seed=3)
    b = split_ids(ids[::-1].copy(), (0.7, 0.15, 0.15), seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the calibration split is half of the validation 15% (train.calibration 0.5)
    assert [a[k].size for k in ("train", "val", "calib", "test")] == [700, 75, 75, 150]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), ids)  # disjoint and complete
    assert not np.array_equal(split_ids(ids, (0.7, 0.15, 0.15), seed=4)["test"], a["test"])
    # train and test are the seeded permutation's cuts as they were before there was a
    # calibration split (figures on the test split stay comparable)
    order = np.random.default_rng(3).permutation(ids)
    assert np.array_equal(a["train"], np.sort(order[:700])) and np.array_equal(a["test"], np.sort(order[850:]))
    assert np.array_equal(np.sort(np.concatenate([a["val"], a["calib"]])), np.sort(order[700:850]))
    assert split_ids(ids, (0.7, 0.15, 0.15), seed=3, calibration=0.2)["calib"].size == 30


def test_normalisation_is_per_sample_and_group_without_mean_shift():
    rng = np.random.default_rng(0)
    series = rng.random((5, 4, 30)).astype(np.float32) + 3.0
    series[1, 2:] = 7.0  # a flat effort group stays as it is
    out = normalise_inputs(series)
    for i in range(5):
        for group in (slice(0, 2), slice(2, 4)):
            std = series[i, group].std(dtype=np.float64)
            if std > 0:
                assert out[i, group].std(dtype=np.float64) == pytest.approx(1.0, rel=1e-5)
                np.testing.assert_allclose(out[i, group] * std, series[i, group], rtol=1e-6)
    assert (out[1, 2:] == 7.0).all()
    assert out[0].mean() > 1  # no mean shift


def test_constant_target_is_left_out_and_predicted_exactly(dataset_dir):
    data = prepare(load_dataset(dataset_dir), TrainConfig())
    assert data.varying.tolist() == [True, False, True, True, True, True]  # mu fixed to 0
    assert data.n_outputs == 5
    y = data.targets["train"]
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=0), 1, atol=1e-5)
    raw = data.to_raw(data.targets["test"].astype(np.float64))
    np.testing.assert_allclose(raw, data.raw_targets["test"], atol=1e-5)
    assert (raw[:, 1] == 0.0).all()


def test_metrics_on_known_cases():
    y = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    perfect = metrics(y, y.copy(), ["a", "b"])
    assert perfect["mse"] == 0 and perfect["r2"] == 1.0 and perfect["per_target"]["b"]["r2"] is None
    off = metrics(y, y + np.array([1.0, 2.0]), ["a", "b"])
    assert off["mse"] == pytest.approx((1 + 4) / 2) and off["mae"] == pytest.approx(1.5)
    assert off["rmse"] == pytest.approx(np.sqrt(2.5))
    mean = metrics(y, np.tile(y.mean(axis=0), (3, 1)), ["a", "b"])
    assert mean["per_target"]["a"]["r2"] == pytest.approx(0.0)


def test_input_norms_drop_or_keep_the_scale():
    """sample: a series and 3x it give the same inputs (the level is gone); sample+scale adds
    log(1 + each channel's divisor) as inputs; global divides by train-split scales, so
    levels survive."""
    from raypd.dataset import apply_input_norm, fit_input_norm

    rng = np.random.default_rng(0)
    series = (rng.normal(size=(5, 2, 30)) * np.array([1, 4, 2, 0.5, 3])[:, None, None]).astype(np.float32)
    series[2, 1] = 0.0  # a flat effort group (no action ever)
    sample = apply_input_norm(series, fit_input_norm("sample", series))
    np.testing.assert_allclose(apply_input_norm(3 * series, fit_input_norm("sample", series)), sample, rtol=1e-5)
    with_scale = apply_input_norm(series, fit_input_norm("sample+scale", series))
    assert with_scale.shape == (5, 4, 30)
    np.testing.assert_array_equal(with_scale[:, :2], sample)
    np.testing.assert_allclose(with_scale[:, 2:], np.log1p(series.std(axis=2, dtype=np.float64))[:, :, None]
                               * np.ones(30), rtol=1e-5)
    assert (with_scale[2, 3] == 0).all()
    norm = fit_input_norm("global", series[:3])
    np.testing.assert_allclose(norm["scale"], series[:3].std(axis=(0, 2), dtype=np.float64), rtol=1e-6)
    kept = apply_input_norm(series, norm)
    np.testing.assert_allclose(kept * np.array(norm["scale"])[None, :, None], series, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channel scales"):
        apply_input_norm(np.zeros((1, 4, 30), dtype=np.float32), norm)
