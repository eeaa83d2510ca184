"""The 1d CNN of the seed notebook, with a linear output layer (targets can be negative)."""

from __future__ import annotations

import torch
from torch import nn

from raypd.config import ModelConfig


class CNN1D(nn.Module):
    """Conv blocks (Conv1d 'same' -> ReLU -> MaxPool1d(2)), global average pooling, dropout,
    hidden Linear + ReLU layers, then Linear to the outputs."""

    def __init__(self, config: ModelConfig, in_channels: int, n_outputs: int):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for filters, kernel in zip(config.filters, config.kernel_sizes):
            blocks += [nn.Conv1d(channels, filters, kernel, padding="same"), nn.ReLU(), nn.MaxPool1d(2)]
            channels = filters
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(config.dropout))
        head: list[nn.Module] = []
        for width in config.hidden:
            head += [nn.Linear(channels, width), nn.ReLU()]
            channels = width
        head.append(nn.Linear(channels, n_outputs))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_fits(config, time_points: int) -> None:
    """A ValueError unless the model of `config` (a raypd.config.Config) takes series of
    `time_points` time points."""
    pools = len(config.model.filters)
    if time_points < 2**pools:
        raise ValueError(f"model.filters has {pools} conv blocks, each halving the series: "
                         f"{time_points} time points are too few (need >= {2**pools})")
