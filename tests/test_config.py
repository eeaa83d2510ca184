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


@pytest.mark.parametrize("text, message", [
    ("search: {space: {model.family: {choice: [cnn, resnet]}, model.width: {int: [8, 16]}}}",
     "search.space.model.width belongs to model.family resnet: the study searches model.family, so give it "
     "when: {model.family: resnet}"),
    ("search: {space: {model.width: {int: [8, 16]}}}",
     "search.space.model.width belongs to model.family resnet, and the study's model.family is cnn"),
    ("search: {space: {train.optimizer: {choice: [adam, sgd]}, train.momentum: {uniform: [0.8, 0.9], "
     "when: {train.optimizer: [adam, sgd]}}}}", "train.momentum belongs to train.optimizer sgd"),
    ("search: {space: {model.family: {choice: [cnn, resnet]}, w: {int: [8, 16]}}, derive: {model.filters: {list: [w]}}}",
     "search.derive.model.filters belongs to model.family cnn: the study searches model.family, so derive it "
     "from a variable with when: {model.family: cnn}"),
    ("search: {space: {model.family: {choice: [cnn, resnet]}, w: {int: [8, 16], when: {w2: 1}}}}",
     "search.space.w.when: 'w2' is not a choice of the space"),
    ("search: {space: {model.hidden: {choice: [[8], [16]]}}}", "choice values must be numbers"),
    ("search: {space: {train.lr: {uniform: [0.1, 0.2], when: model.family}}}", "search.space.train.lr.when must be"),
    ("model: {family: tcn}", "model.family must be one of cnn, resnet (got 'tcn')"),
    ("model: {norm: group}", "model.norm must be one of none, batch, layer"),
    ("model: {activation: elu}", "model.activation must be one of relu, gelu, silu, tanh"),
    ("model: {blocks: 0}", "model.blocks must be >= 1"),
    ("train: {optimizer: rmsprop}", "train.optimizer must be one of adam, adamw, sgd"),
    ("train: {warmup: 1.0}", "train.warmup must be a share in (0, 1)"),
])
def test_family_keys_and_conditions_are_checked(tmp_path, text, message):
    from raypd.tune import check_space

    (tmp_path / "study.yaml").write_text(text)
    with pytest.raises(ValueError) as error:
        check_space(load_config(str(tmp_path / "study.yaml")))
    assert message in str(error.value)


def test_a_conditional_space_that_fits():
    config = load_config(None, [
        "search.space={model.family: {choice: [cnn, resnet]}, w: {int: [8, 16], when: {model.family: cnn}}, "
        "model.blocks: {int: [2, 5], when: {model.family: resnet}}}", "search.derive={model.filters: {list: [w]}}"])
    assert config.search.space["model.blocks"]["when"] == {"model.family": "resnet"}


def test_settings_of_an_earlier_raypd_compare_with_the_new_keys_at_their_defaults():
    """A study.json or a checkpoint's model_config written before model families existed
    (no family, activation, norm, ... keys) reads as today's defaults, so the study or run
    resumes; something that is not a config of this raypd gives None."""
    from raypd.config import Config, ModelConfig, with_defaults

    today = to_dict(Config())
    earlier = to_dict(Config())
    for key in ("family", "activation", "norm", "blocks", "width", "kernel", "dilation", "average_relabellings"):
        del earlier["model"][key]
    for key in ("optimizer", "momentum", "schedule", "warmup", "relabel"):
        del earlier["train"][key]
    assert with_defaults(Config, earlier) == today
    assert with_defaults(ModelConfig, {"filters": [64, 128]})["family"] == "cnn"
    assert with_defaults(ModelConfig, {"filters": [64, 128], "colour": "red"}) is None
    assert with_defaults(Config, [1, 2]) is None
