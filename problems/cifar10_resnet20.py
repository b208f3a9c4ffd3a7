"""ResNet-20 (option A) on CIFAR-10 read from disk (GPU scale; the papers' setting)."""
import admm_compress as ac
from admm_compress.registry import cifar10_problem

NAME = "cifar10_resnet20"
DESCRIPTION = "ResNet-20 (option A) on CIFAR-10 from --set root=... (or $ADMM_COMPRESS_DATA); no download unless download=true"
DEFAULTS = {"epochs": 160, "pretrain_epochs": 0, "finetune_epochs": 0, "batch_size": 128, "lr": 0.1,
            "root": None, "download": False, "num_workers": 2}


def build(seed, device, **params):
    return cifar10_problem(NAME, lambda: ac.models.resnet20(num_classes=10), "resnet20", ("fc",), seed=seed, **params)
