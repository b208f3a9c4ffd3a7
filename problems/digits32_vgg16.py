"""VGG-16 (cfg D, BN) on the embedded digits upsampled to 3x32x32 (CPU, slow)."""
import admm_compress as ac
from admm_compress.registry import Problem

NAME = "digits32_vgg16"
DESCRIPTION = "VGG-16 (cfg D, BN) on digits upsampled to 3x32x32 — offline; slow on a CPU"
DEFAULTS = {"epochs": 3, "pretrain_epochs": 3, "finetune_epochs": 1, "batch_size": 64, "lr": 0.02}


def build(seed, device, epochs, pretrain_epochs, finetune_epochs, batch_size, lr):
    import torch

    torch.manual_seed(seed)
    model = ac.models.vgg16(num_classes=10)
    train, test = ac.data.digits32(batch_size=batch_size, seed=seed)
    return Problem(NAME, model, train, test, (3, 32, 32), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=("classifier",),
                   meta={"model": "vgg16 (cfg D, BN)", "data": "digits32"})
