"""The weight initialization the CIFAR models share (He et al. 2015, as in the papers' code)."""
from __future__ import annotations

from typing import Callable

from torch import nn


def he_init(model: nn.Module, linear_weight: Callable | None = None) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions with zero bias, BatchNorm ``(1, 0)``, Linear
    bias 0 and Linear weight initialized by ``linear_weight`` (None: left as constructed).

    Modules are visited in ``model.modules()`` order, so the random draws are reproducible."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_weight is not None:
                linear_weight(m.weight)
            nn.init.zeros_(m.bias)
