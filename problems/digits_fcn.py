"""LoRITa's fully connected network (8 layers of width 96) on the embedded 8x8 digits (CPU, seconds)."""
import admm_compress as ac
from admm_compress.registry import Problem

NAME = "digits_fcn"
DESCRIPTION = "FCN depth 8 / width 96 (LoRITa Table 1a) on the embedded 8x8 digits; ~1 s per 10 epochs"
DEFAULTS = {"epochs": 30, "pretrain_epochs": 30, "finetune_epochs": 5, "batch_size": 64, "lr": 0.02,
            "depth": 8, "width": 96}


def build(seed, device, epochs, pretrain_epochs, finetune_epochs, batch_size, lr, depth, width):
    import torch

    torch.manual_seed(seed)
    model = ac.models.fcn(depth=depth, width=width, in_features=64, num_classes=10)
    train, test = ac.data.digits(batch_size=batch_size, seed=seed)
    return Problem(NAME, model, train, test, (64,), epochs=epochs, pretrain_epochs=pretrain_epochs,
                   finetune_epochs=finetune_epochs, lr=lr, keep_dense=(f"layers.{depth - 1}",),
                   meta={"model": f"fcn(depth={depth}, width={width})", "data": "digits (sklearn, 8x8)"})
