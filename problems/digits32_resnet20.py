"""CIFAR ResNet-20 (option A) on the embedded digits upsampled to 3x32x32 (CPU, minutes)."""
import admm_compress as ac
from admm_compress.registry import Problem

NAME = "digits32_resnet20"
DESCRIPTION = "ResNet-20 (option A) on digits upsampled to 3x32x32 — CIFAR-shaped, offline, CPU"
DEFAULTS = {"epochs": 4, "pretrain_epochs": 4, "finetune_epochs": 1, "batch_size": 64, "lr": 0.05}


def build(seed, device, epochs, pretrain_epochs, finetune_epochs, batch_size, lr):
    import torch

    torch.manual_seed(seed)
    model = ac.models.resnet20(num_classes=10)
    train, test = ac.data.digits32(batch_size=batch_size, seed=seed)
    return Problem(NAME, model, train, test, (3, 32, 32), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=("fc",),
                   meta={"model": "resnet20 (option A)", "data": "digits32"})
