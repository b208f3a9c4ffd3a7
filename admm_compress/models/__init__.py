"""Model zoo: the architectures of the papers, with readable module names for specs.

=================  ==========================================================================
name               model
=================  ==========================================================================
resnet20 ... 110   CIFAR ResNets (He et al. 2016), shortcut option "A" (default) or "B"
vgg16              VGG-16 cfg D with BatchNorm, single Linear(512, num_classes)
vgg15              cfg D convolutions + Linear-BN-ReLU-Linear classifier (Decomposable-Net)
densenet40         DenseNet-40, growth rate 12 (RASPA)
fcn                LoRITa fully connected network (flat inputs)
vit                small ViT with q/k/v/out nn.Linear projections (LoRITa)
=================  ==========================================================================

``get_model(name, **kwargs)`` builds one by name; ``MODELS`` is the registry.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .densenet import DenseNet, densenet40
from .fcn import FCN, fcn
from .resnet_cifar import (BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet44,
                           resnet56, resnet110)
from .vgg import VGG, vgg15, vgg16
from .vit import ViT, vit

__all__ = ["MODELS", "get_model", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "vgg16", "vgg15", "densenet40", "fcn", "vit", "CifarResNet", "BasicBlock",
           "ShortcutA", "VGG", "DenseNet", "FCN", "ViT"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": vgg16,
    "vgg15": vgg15,
    "densenet40": densenet40,
    "fcn": fcn,
    "vit": vit,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS` with ``kwargs``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the valid names.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model name={name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
