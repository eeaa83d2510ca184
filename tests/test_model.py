"""raypd.model and the training knobs beside it (issue 31): the families, activations and
norms, the optimisers and schedules, relabelling augmentation and test-time averaging over the
relabellings of the actions, checked against the solver (no Ray: seconds)."""

import math

import numpy as np
import pytest
import torch

from raypd.config import Config, ModelConfig, TrainConfig
from raypd.dataset import Prepared, Relabel
from raypd.model import CNN1D, ResNet1D, build_model, check_fits, min_time_points
from raypd.ode import channel_names, ic_names, param_names, relabellings, solve
from raypd.serve import SavedModel
from raypd.train import make_optimizer, make_schedule
from tests.conftest import TIMES, stable_draws

RESNET = dict(family="resnet", blocks=3, width=4, hidden=[8])


@pytest.mark.parametrize("family", ["cnn", "resnet"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_each_family_norm_and_activation_maps_series_to_targets(family, norm, activation):
    config = ModelConfig(family=family, norm=norm, activation=activation, filters=[4, 6], kernel_sizes=[3, 5],
                         blocks=3, width=4, dilation=2, hidden=[8])
    model = build_model(config, 4, 7)
    assert isinstance(model, {"cnn": CNN1D, "resnet": ResNet1D}[family])
    model.train()
    assert model(torch.randn(5, 4, 40)).shape == (5, 7)
    model.eval()
    assert model(torch.randn(2, 4, min_time_points(config))).shape == (2, 7)  # the fewest time points it takes
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"batch": "BatchNorm1d", "layer": "GroupNorm"}.get(norm, "Conv1d") in kinds
    assert norm != "none" or not kinds & {"BatchNorm1d", "GroupNorm"}
    assert {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}[activation] in kinds


def test_the_default_model_is_the_notebooks_layer_for_layer():
    """Defaults (cnn, relu, no norm): the notebook's layers at the indices older checkpoints
    were saved with, so they load as they are."""
    model = CNN1D(ModelConfig(filters=[64, 128], kernel_sizes=[3, 3], hidden=[128]), 2, 6)
    assert [type(m).__name__ for m in model.features] == ["Conv1d", "ReLU", "MaxPool1d", "Conv1d", "ReLU", "MaxPool1d",
                                                          "AdaptiveAvgPool1d", "Flatten", "Dropout"]
    assert list(model.state_dict()) == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                                        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]


def test_resnet_blocks_widths_dilation_and_poolings():
    model = ResNet1D(ModelConfig(family="resnet", blocks=4, width=8, dilation=2, hidden=[]), 2, 3)
    blocks = [m for m in model.blocks if type(m).__name__ == "ResidualBlock"]
    assert [b.conv1.out_channels for b in blocks] == [8, 8, 16, 16]
    assert [b.conv1.dilation[0] for b in blocks] == [1, 2, 4, 8]
    assert sum(type(m).__name__ == "MaxPool1d" for m in model.blocks) == 3
    assert type(blocks[0].skip).__name__ == "Identity" and type(blocks[2].skip).__name__ == "Conv1d"
    # the skip path carries the input: with the convs' weights at zero, a block is act(skip(x))
    block = blocks[0]
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.randn(3, 8, 20)
    assert torch.equal(block(x), torch.relu(x))
    assert min_time_points(model_config := ModelConfig(family="resnet", blocks=4)) == 8
    with pytest.raises(ValueError, match=r"model.blocks 4 residual blocks pool 3 times.*7 time points are too few"):
        check_fits(Config(model=model_config), 7)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizers(optimizer):
    train = TrainConfig(optimizer=optimizer, lr=0.01, momentum=0.8, weight_decay=0.1)
    opt = make_optimizer(torch.nn.Linear(3, 1), train)
    assert type(opt).__name__ == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[optimizer]
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.1
    assert optimizer != "sgd" or (group["momentum"] == 0.8 and group["nesterov"])


def rates(train: TrainConfig) -> list[float]:
    """The learning rate of each epoch, as the loop steps the schedule."""
    opt = make_optimizer(torch.nn.Linear(3, 1), train)
    schedule = make_schedule(opt, train)
    out = []
    for epoch in range(train.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if schedule is not None and epoch + 1 < train.epochs:
            schedule.step()
    return out


def test_schedules_over_the_epochs():
    assert rates(TrainConfig(lr=0.1, epochs=5)) == [0.1] * 5
    cosine = rates(TrainConfig(lr=0.1, epochs=10, schedule="cosine"))
    assert cosine == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 10)) for e in range(10)])
    onecycle = rates(TrainConfig(lr=0.1, epochs=20, schedule="onecycle", warmup=0.25))
    peak = int(np.argmax(onecycle))
    assert onecycle[peak] == pytest.approx(0.1) and peak == 4  # the top at 25% of 19 steps
    assert onecycle[0] < 0.01 and onecycle[-1] < 1e-5
    for epoch in (0, 7, 19, 25):  # a continued run's schedule, made at its epoch
        train = TrainConfig(lr=0.1, epochs=20, schedule="onecycle", warmup=0.25)
        opt = make_optimizer(torch.nn.Linear(3, 1), train)
        make_schedule(opt, train, epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(onecycle[min(epoch, 19)])
    assert all(a <= b for a, b in zip(onecycle[:peak], onecycle[1 : peak + 1]))
    assert all(a >= b for a, b in zip(onecycle[peak:], onecycle[peak + 1 :]))


# --------------------------------------------------------------------------- the actions' symmetry


@pytest.mark.parametrize("n", [2, 3])
def test_relabellings_are_the_permutations_of_the_names(n):
    names = np.array(param_names(n) + ic_names(n))
    channels = np.array(channel_names(n))
    perms = relabellings(n)
    assert len(perms) == math.factorial(n)
    assert (perms[0][0] == np.arange(len(names))).all() and (perms[0][1] == np.arange(2 * n)).all()
    for targets, chans in perms:
        # the action new index i stands for, read off each relabelled name
        s = [int(name[-1]) - 1 for name in channels[chans][:n]]
        renamed = {old: new for new, old in enumerate(s)}
        for new_name, old_name in zip(names, names[targets]):
            stem, index = old_name.split("_")
            moved = "".join(str(renamed[int(c) - 1] + 1) for c in index)
            assert new_name == f"{stem}_{moved}"


def test_relabel_augmentation_permutes_series_and_targets_as_the_solver_does():
    """A batch through train.relabel's Relabel: each sample's series is the solver's solution
    for its relabelled targets (and the standardised targets are the relabelled raw ones)."""
    n, times = 2, TIMES
    params, ic, series = stable_draws(n, 12, seed=3)
    raw = np.concatenate([params, ic], axis=1)
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    varying = std > 0
    data = Prepared(folder=None, files=[], targets={}, sample_ids={}, raw_targets={}, series={},
                    target_names=param_names(n) + ic_names(n), varying=varying, mean=mean, std=std,
                    input_norm={"kind": "sample"}, series_shape=series.shape[1:], time_points=list(times))
    relabel = Relabel(data, seed=5)
    series = series.astype(np.float32)
    out_series, out_targets = relabel(series, data.standardise(raw))
    relabelled_raw = data.to_raw(out_targets)
    swapped = 0
    for i in range(len(raw)):
        index = next(t for t, c in relabellings(n) if np.array_equal(series[i][c], out_series[i]))
        np.testing.assert_allclose(relabelled_raw[i], raw[i][index], rtol=1e-5, atol=1e-5)
        swapped += not np.array_equal(index, np.arange(len(index)))
    assert 0 < swapped < len(raw)  # random: some relabelled, some not
    # and the relabelled targets' own solution is the relabelled series
    p = relabelled_raw[:, : params.shape[1]]
    again, ok = solve(p, relabelled_raw[:, params.shape[1] :], times, n)
    scale = np.abs(series).max()
    assert ok.all() and np.abs(again - out_series).max() < 1e-4 * scale


def tta_model(n: int, input_norm: dict) -> SavedModel:
    torch.manual_seed(0)
    config = ModelConfig(**RESNET, average_relabellings=True)
    k = 2 * n + 2 * n * n + 2 * n
    channels = 4 * n if input_norm["kind"] == "sample+scale" else 2 * n
    net = build_model(config, channels, k)
    meta = {"format": "raypd-model/1", "series_shape": [2 * n, 50], "input_channels": channels,
            "input_norm": input_norm, "target_names": param_names(n) + ic_names(n), "target_mean": [0.5] * k,
            "target_std": [2.0] * k, "target_varying": [True] * k, "model_config": {**RESNET, "average_relabellings": True},
            "n_outputs": k}
    return SavedModel(meta, net.state_dict())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", ["sample", "sample+scale"])
def test_averaging_over_relabellings_makes_the_predictor_equivariant(n, kind):
    """model.average_relabellings: the mean over the n! relabellings, each relabelled back, is
    the plain predictions' mean; and relabelling a series' actions relabels its prediction."""
    norm = {"kind": kind, "groups": [list(range(n)), list(range(n, 2 * n))], "mean_shift": False}
    model = tta_model(n, norm)
    series = np.random.default_rng(1).normal(size=(6, 2 * n, 50)).astype(np.float32)
    averaged = model.predict(series)
    plain = SavedModel({**model.meta, "model_config": {**RESNET}}, model.net.state_dict())
    manual = np.zeros_like(averaged)
    for targets, chans in relabellings(n):
        manual[:, targets] += plain.predict(series[:, chans])
    np.testing.assert_allclose(averaged, manual / math.factorial(n), rtol=1e-6, atol=1e-6)
    assert np.abs(plain.predict(series) - averaged).max() > 1e-4  # a plain model is not equivariant
    for targets, chans in relabellings(n)[1:]:
        np.testing.assert_allclose(model.predict(series[:, chans]), averaged[:, targets], rtol=1e-5, atol=1e-5)

