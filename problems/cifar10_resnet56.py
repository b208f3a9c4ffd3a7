"""ResNet-56 (option A) on CIFAR-10 read from disk (GPU scale; the papers' setting)."""
import admm_compress as ac
from admm_compress.registry import Problem

NAME = "cifar10_resnet56"
DESCRIPTION = "ResNet-56 (option A) on CIFAR-10 from --set root=... (or $ADMM_COMPRESS_DATA); no download unless download=true"
DEFAULTS = {"epochs": 160, "pretrain_epochs": 0, "finetune_epochs": 0, "batch_size": 128, "lr": 0.1,
            "root": None, "download": False, "num_workers": 2}


def build(seed, device, epochs, pretrain_epochs, finetune_epochs, batch_size, lr, root, download, num_workers):
    import torch

    torch.manual_seed(seed)
    train, test = ac.data.cifar10(root=root, batch_size=batch_size, download=download,
                                  num_workers=num_workers, seed=seed)
    model = ac.models.resnet56(num_classes=10)
    return Problem(NAME, model, train, test, (3, 32, 32), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=("fc",),
                   meta={"model": "resnet56", "data": "cifar10"})
