"""The model families (model.family): the seed notebook's plain 1d CNN and a residual 1d CNN.

Both end the same way: global average pooling over time, dropout, hidden Linear layers, a
linear output layer (targets can be negative). `build_model` makes either from the config;
everything that trains, saves, serves or predicts a model goes through it.
"""

from __future__ import annotations

import torch
from torch import nn

from raypd.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def activation(config: ModelConfig) -> nn.Module:
    return ACTIVATIONS[config.activation]()


def norm(config: ModelConfig, channels: int) -> nn.Module:
    """model.norm over a conv's output (B, C, T): batch (BatchNorm1d), layer (one group over
    channels and time: GroupNorm(1, C), any T), none."""
    if config.norm == "batch":
        return nn.BatchNorm1d(channels)
    if config.norm == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def head(config: ModelConfig, channels: int, n_outputs: int) -> tuple[nn.Module, nn.Module]:
    """Global average pooling + dropout, then the hidden layers and the output layer."""
    pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(config.dropout))
    layers: list[nn.Module] = []
    for width in config.hidden:
        layers += [nn.Linear(channels, width), activation(config)]
        channels = width
    layers.append(nn.Linear(channels, n_outputs))
    return pool, nn.Sequential(*layers)


class CNN1D(nn.Module):
    """The notebook's CNN (family cnn): conv blocks (Conv1d 'same' -> [norm] -> activation ->
    MaxPool1d(2)), one per entry of model.filters, then the head. With the defaults (relu, no
    norm) it is the notebook's model, layer for layer."""

    def __init__(self, config: ModelConfig, in_channels: int, n_outputs: int):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for filters, kernel in zip(config.filters, config.kernel_sizes):
            blocks.append(nn.Conv1d(channels, filters, kernel, padding="same"))
            if config.norm != "none":  # none adds no module: the notebook's layer indices stay
                blocks.append(norm(config, filters))
            blocks += [activation(config), nn.MaxPool1d(2)]
            channels = filters
        pool, top = head(config, channels, n_outputs)
        self.features = nn.Sequential(*blocks, *pool)
        self.head = top  # registered after the features, as the notebook's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResidualBlock(nn.Module):
    """Two 'same' convs with norm and activation, added to the block's input (a 1x1 conv
    matches the channels where they change): act(norm(conv(act(norm(conv(x))))) + skip(x))."""

    def __init__(self, config: ModelConfig, channels_in: int, channels: int, dilation: int):
        super().__init__()
        conv = dict(kernel_size=config.kernel, padding="same", dilation=dilation)
        self.conv1, self.norm1 = nn.Conv1d(channels_in, channels, **conv), norm(config, channels)
        self.conv2, self.norm2 = nn.Conv1d(channels, channels, **conv), norm(config, channels)
        self.act1, self.act2 = activation(config), activation(config)
        self.skip = nn.Identity() if channels_in == channels else nn.Conv1d(channels_in, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(h)) + self.skip(x))


class ResNet1D(nn.Module):
    """The residual 1d CNN (family resnet): a stem conv to model.width channels, model.blocks
    residual blocks (the first half of model.width channels, the rest of twice that; block i
    dilates its convs by model.dilation**i), MaxPool1d(2) after each block but the last,
    then the head."""

    def __init__(self, config: ModelConfig, in_channels: int, n_outputs: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, config.width, config.kernel, padding="same"),
                                  norm(config, config.width), activation(config))
        layers: list[nn.Module] = []
        channels = config.width
        for i, width in enumerate(block_widths(config)):
            layers.append(ResidualBlock(config, channels, width, config.dilation**i))
            if i < config.blocks - 1:
                layers.append(nn.MaxPool1d(2))
            channels = width
        self.blocks = nn.Sequential(*layers)
        self.pool, self.head = head(config, channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


def block_widths(config: ModelConfig) -> list[int]:
    """Channels of each residual block: model.width for the first half, twice that after."""
    half = (config.blocks + 1) // 2
    return [config.width if i < half else 2 * config.width for i in range(config.blocks)]


FAMILIES = {"cnn": CNN1D, "resnet": ResNet1D}


def build_model(config: ModelConfig, in_channels: int, n_outputs: int) -> nn.Module:
    """The model of family model.family for inputs of `in_channels` channels."""
    return FAMILIES[config.family](config, in_channels, n_outputs)


def min_time_points(config: ModelConfig) -> int:
    """The fewest time points a model of `config` takes: each pooling halves the series."""
    pools = len(config.filters) if config.family == "cnn" else config.blocks - 1
    return 2**pools


def check_fits(config, time_points: int) -> None:
    """A ValueError unless the model of `config` (a raypd.config.Config) takes series of
    `time_points` time points."""
    least = min_time_points(config.model)
    if time_points < least:
        what = (f"model.filters has {len(config.model.filters)} conv blocks" if config.model.family == "cnn"
                else f"model.blocks {config.model.blocks} residual blocks pool {config.model.blocks - 1} times")
        raise ValueError(f"{what}, each halving the series: {time_points} time points are too few "
                         f"(need >= {least})")
