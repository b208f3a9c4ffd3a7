"""VGG-16 (cfg D, BN) on CIFAR-10 read from disk (GPU scale; the papers' setting)."""
import admm_compress as ac
from admm_compress.registry import Problem

NAME = "cifar10_vgg16"
DESCRIPTION = "VGG-16 (cfg D, BN) on CIFAR-10 from --set root=... (or $ADMM_COMPRESS_DATA); no download unless download=true"
DEFAULTS = {"epochs": 160, "pretrain_epochs": 0, "finetune_epochs": 0, "batch_size": 128, "lr": 0.05,
            "root": None, "download": False, "num_workers": 2}


def build(seed, device, epochs, pretrain_epochs, finetune_epochs, batch_size, lr, root, download, num_workers):
    import torch

    torch.manual_seed(seed)
    train, test = ac.data.cifar10(root=root, batch_size=batch_size, download=download,
                                  num_workers=num_workers, seed=seed)
    model = ac.models.vgg16(num_classes=10)
    return Problem(NAME, model, train, test, (3, 32, 32), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=("classifier",),
                   meta={"model": "vgg16", "data": "cifar10"})
