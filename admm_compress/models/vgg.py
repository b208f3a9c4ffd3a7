"""VGG-16 (configuration D, with BatchNorm) for 32x32 inputs, and the VGG-15 variant.

``vgg16``: 13 3x3 convolutions (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M), each
followed by BatchNorm and ReLU, then one ``Linear(512, num_classes)`` — the CIFAR VGG-16 of
LoRITa (314.59 M FLOPs, 14.73 M params) and LRPET (313.2 M, 14.72 M).  Names:
``features.{i}`` (an ``nn.Sequential`` of conv / BN / ReLU / max-pool) and ``classifier``.

``vgg15``: the same 13 convolutions followed by ``Linear(512, 512)``, BatchNorm1d, ReLU and
``Linear(512, num_classes)`` (15 weight layers; the CIFAR VGG of Zagoruyko 2015 / Liu et al.
2017 used by Decomposable-Net), without the dropout layers of the original Torch code.
Names: ``features.{i}``, ``classifier.0`` (Linear 512->512), ``classifier.1`` (BN),
``classifier.3`` (Linear 512->num_classes).
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int
from ._init import he_init

__all__ = ["CFG_D", "VGG", "vgg16", "vgg15"]

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _features(cfg, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG feature extractor (conv-BN-ReLU, max-pools) on 32x32 inputs plus a classifier.

    Parameters
    ----------
    cfg : sequence of int or "M"
        Channels of each 3x3 convolution, ``"M"`` for a 2x2 max-pool.
    num_classes : int
        Output classes.
    in_channels : int
        Input image channels.
    hidden : int or None
        ``None``: classifier is a single ``Linear(last, num_classes)``; an int: ``Linear(last,
        hidden)``, BatchNorm1d, ReLU, ``Linear(hidden, num_classes)``.
    """

    def __init__(self, cfg=CFG_D, num_classes: int = 10, in_channels: int = 3,
                 hidden: int | None = None):
        super().__init__()
        num_classes = check_int("num_classes", num_classes, low=1)
        in_channels = check_int("in_channels", in_channels, low=1)
        convs = [v for v in cfg if v != "M"]
        if not convs:
            raise ValueError(f"cfg={cfg!r} must contain at least one convolution width")
        for v in convs:
            check_int("cfg entry", v, low=1)
        self.features = _features(cfg, in_channels)
        last = convs[-1]
        if hidden is None:
            self.classifier = nn.Linear(last, num_classes)
        else:
            hidden = check_int("hidden", hidden, low=1)
            self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.BatchNorm1d(hidden),
                                            nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convolutions with zero bias, BN ``(1, 0)``,
        ``N(0, 0.01)`` linear weights with zero bias."""
        he_init(self, lambda w: nn.init.normal_(w, 0.0, 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # 32x32 input -> 1x1 after five pools; flatten keeps other sizes usable
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 (cfg D) with BatchNorm and a single ``Linear(512, num_classes)`` classifier."""
    return VGG(CFG_D, num_classes=num_classes, in_channels=in_channels, hidden=None)


def vgg15(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-15: cfg D convolutions + ``Linear(512, 512)``-BN-ReLU-``Linear(512, num_classes)``."""
    return VGG(CFG_D, num_classes=num_classes, in_channels=in_channels, hidden=512)
