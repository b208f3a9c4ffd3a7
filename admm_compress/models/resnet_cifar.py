"""CIFAR ResNets of He et al. (2016), Sec. 4.2: ResNet-20/32/44/56/110.

Architecture (input ``3 x 32 x 32``): a 3x3 stem convolution with 16 channels, three stages of
``n`` basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 has stride 2),
global average pooling and one linear classifier; depth ``= 6 n + 2``.

Two shortcut options for the blocks that change the shape:

* ``"A"`` — stride-2 subsampling plus zero-padding of the new channels, **no parameters**
  (the paper's CIFAR setting, used by LRPET, LoRITa and RASPA);
* ``"B"`` — a 1x1 convolution with stride 2 followed by BatchNorm (TRP, LRPET Table III "-B").

Module names are stable and readable, for glob specs: ``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1``, ``...bn1``, ``...conv2``, ``...bn2``, ``...shortcut`` (option B:
``...shortcut.0`` conv, ``...shortcut.1`` BN) and ``fc``.

Complexity with ptflops 0.7.5 (``admm_compress.complexity``, input 3x32x32, 10 classes) matches
the papers' baselines with the ``aten`` backend, see ``REFERENCE.md``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_int
from ._init import he_init

__all__ = ["BasicBlock", "ShortcutA", "CifarResNet", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet110"]


class ShortcutA(nn.Module):
    """Parameter-free shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded to ``out_channels``.

    The new channels are split evenly before and after the existing ones (as in the common
    CIFAR implementation); it costs no multiply-accumulates.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels={out_channels} must be >= "
                             f"in_channels={in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != channels:
            if shortcut == "A":
                self.shortcut = ShortcutA(in_channels, channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``blocks_per_stage`` basic blocks in each of 3 stages.

    Parameters
    ----------
    blocks_per_stage : int
        ``n`` in depth ``6 n + 2``.
    num_classes : int
        Output size of ``fc``.
    shortcut : {"A", "B"}
        Shortcut of the down-sampling blocks (see module docstring).
    in_channels : int
        Channels of the input image.
    base_width : int
        Channels of the first stage (16 in the paper); the stages use 1x, 2x, 4x.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "A",
                 in_channels: int = 3, base_width: int = 16):
        super().__init__()
        n = check_int("blocks_per_stage", blocks_per_stage, low=1)
        num_classes = check_int("num_classes", num_classes, low=1)
        in_channels = check_int("in_channels", in_channels, low=1)
        base_width = check_int("base_width", base_width, low=1)
        shortcut = check_choice("shortcut", shortcut, ("A", "B"))
        self.depth = 6 * n + 2
        self.shortcut_option = shortcut
        w = base_width
        self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(w, w, n, 1, shortcut)
        self.layer2 = self._stage(w, 2 * w, n, 2, shortcut)
        self.layer3 = self._stage(2 * w, 4 * w, n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        self.reset_parameters()

    @staticmethod
    def _stage(in_channels: int, channels: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, channels, stride, shortcut)]
        blocks += [BasicBlock(channels, channels, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convolutions, BN ``gamma = 1, beta = 0``,
        Kaiming-normal linear layer with zero bias."""
        he_init(self, nn.init.kaiming_normal_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _make(depth: int):
    n = (depth - 2) // 6

    def build(num_classes: int = 10, shortcut: str = "A", in_channels: int = 3) -> CifarResNet:
        return CifarResNet(n, num_classes=num_classes, shortcut=shortcut, in_channels=in_channels)

    build.__name__ = f"resnet{depth}"
    build.__qualname__ = build.__name__
    build.__doc__ = (f"ResNet-{depth} for CIFAR ({n} basic blocks per stage, He et al. 2016).\n\n"
                     "Parameters\n----------\nnum_classes : int\n    Classifier outputs.\n"
                     "shortcut : {'A', 'B'}\n    'A': parameter-free subsample + zero-pad; "
                     "'B': 1x1 conv + BN.\nin_channels : int\n    Input image channels.\n")
    return build


resnet20 = _make(20)
resnet32 = _make(32)
resnet44 = _make(44)
resnet56 = _make(56)
resnet110 = _make(110)
