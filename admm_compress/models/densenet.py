"""DenseNet-40 for CIFAR (Huang et al. 2017), as compressed by RASPA and HRank.

Depth 40, growth rate ``k = 12``, no bottleneck, no compression: a 3x3 stem convolution with
``2 k`` channels, three dense blocks of 12 layers each (a layer is BN-ReLU-Conv3x3 producing
``k`` channels that are concatenated to its input), two transitions (BN-ReLU-Conv1x1 keeping
the channel count, 2x2 average pool), a final BN-ReLU, global average pooling and a linear
classifier.  The dense-layer weights have the shapes listed in RASPA Table 10
(``(12, 24, 3, 3)``, ``(12, 36, 3, 3)``, ...).

Names: ``conv1``, ``dense{1,2,3}.{i}.bn1`` / ``.conv1``, ``trans{1,2}.bn1`` / ``.conv1``,
``bn``, ``fc``.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int
from ._init import he_init

__all__ = ["DenseLayer", "Transition", "DenseNet", "densenet40"]


class DenseLayer(nn.Module):
    """``cat([x, conv1(relu(bn1(x)))], dim=1)`` with a 3x3 convolution to ``growth_rate``."""

    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv1(self.relu(self.bn1(x)))], dim=1)


class Transition(nn.Module):
    """``avg_pool2x2(conv1x1(relu(bn1(x))))``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(self.relu(self.bn1(x))))


class DenseNet(nn.Module):
    """CIFAR DenseNet (no bottleneck) with ``(depth - 4) / 3`` layers per block.

    Parameters
    ----------
    depth : int
        Total depth, ``3 n + 4``.
    growth_rate : int
        Channels added by each dense layer (``k``).
    reduction : float
        Channel compression of the transitions, in ``(0, 1]`` (1 = none, DenseNet-40).
    num_classes, in_channels : int
        Classifier outputs and input image channels.
    """

    def __init__(self, depth: int = 40, growth_rate: int = 12, reduction: float = 1.0,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        depth = check_int("depth", depth, low=7)
        if (depth - 4) % 3:
            raise ValueError(f"depth={depth} is not allowed; DenseNet depth must be 3 n + 4")
        growth_rate = check_int("growth_rate", growth_rate, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        in_channels = check_int("in_channels", in_channels, low=1)
        if not 0.0 < float(reduction) <= 1.0:
            raise ValueError(f"reduction={reduction!r} is out of range; allowed: 0 < reduction <= 1")
        n = (depth - 4) // 3
        c = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        blocks = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth_rate))
                c += growth_rate
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                out = int(c * reduction)
                setattr(self, f"dense{b + 1}", blocks[-1])
                setattr(self, f"trans{b + 1}", Transition(c, out))
                c = out
            else:
                self.dense3 = blocks[-1]
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convolutions, BN ``(1, 0)``, zero linear bias."""
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.relu(self.bn(self.dense3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def densenet40(num_classes: int = 10, growth_rate: int = 12, in_channels: int = 3) -> DenseNet:
    """DenseNet-40 (k = 12, 3 blocks of 12 BN-ReLU-Conv3x3 layers, no compression)."""
    return DenseNet(40, growth_rate=growth_rate, reduction=1.0, num_classes=num_classes,
                    in_channels=in_channels)
