"""The typed config schema: defaults, unknown keys, wrong types, ranges."""

from pathlib import Path

import pytest

from raypd.config import DataConfig, from_dict, load_config, to_dict


def test_defaults_are_design_ranges():
    cfg = DataConfig()
    assert cfg.mu_range == (-10.0, 0.0) and cfg.gamma_offdiag_range == (-3.0, 3.0)
    assert cfg.times()[0] == 0.0 and cfg.times()[-1] == 200.0 and cfg.times().size == 201


def test_from_dict_round_trips_and_coerces():
    cfg = from_dict(DataConfig, {"samples": 5, "mu_range": [0, 0], "rtol": 1})
    assert cfg.samples == 5 and cfg.mu_range == (0.0, 0.0) and cfg.rtol == 1.0
    assert from_dict(DataConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("values, message", [
    ({"sampels": 5}, "unknown key sampels (allowed: n_actions, samples"),
    ({"samples": "5"}, "samples must be int"),
    ({"samples": 5.0}, "samples must be int"),
    ({"samples": True}, "samples must be int"),
    ({"mu_range": [0]}, "mu_range must be a list of 2 values"),
    ({"mu_range": ["a", 0]}, "mu_range[0] must be float"),
    ([1, 2], "config must be a mapping"),
])
def test_from_dict_rejects_with_the_key(values, message):
    with pytest.raises(ValueError, match=None) as info:
        from_dict(DataConfig, values)
    assert message in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"samples": 0}, "samples must be >= 1"),
    ({"n_actions": 0}, "n_actions must be 1, 2 or 3"),
    ({"n_actions": 4}, "n_actions must be 1, 2 or 3"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"mu_range": (1.0, 0.0)}, "mu_range must have LOW <= HIGH"),
    ({"g_range": (0.0, float("inf"))}, "g_range must be two finite numbers"),
    ({"pi_diag_range": (0.0, 1.0)}, "pi_diag_range must be > 0"),
    ({"time_points": 1}, "time_points must be >= 2"),
    ({"time_span": (5.0, 5.0)}, "time_span must be T0 < T1"),
    ({"time_span": (10.0, 0.0)}, "time_span must be T0 < T1"),
    ({"rtol": 0.0}, "rtol must be in (0, 1)"),
])
def test_validate_names_what_is_wrong(change, message):
    with pytest.raises(ValueError) as info:
        DataConfig(**change).validate()
    assert message in str(info.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_study_file_is_valid_and_its_space_fits(path):
    from raypd.tune import check_space

    check_space(load_config(str(path)))
