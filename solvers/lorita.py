"""LoRITa (papers/004): train every layer as a product of N matrices with weight decay (an implicit
Schatten-2/N penalty, Prop. 4.2), then collapse and truncate (LSVT / GSVT / ISVT) and fine-tune."""
from torch import nn

REQUIRES = ["admm_compress.methods.lorita"]
NAME = "lorita"
DESCRIPTION = "LoRITa: N-factor products + weight decay, then LSVT/GSVT/ISVT truncation"
PARAMS = {"n_factors": [1, 2, 3], "weight_decay": [1e-4, 5e-4], "rank_ratio": [0.25, 0.4, 0.5]}
# init "auto": the paper's random factors when the problem trains from scratch (pretrain_epochs=0),
# the SVD start of the pretrained dense model otherwise (random factors would discard it)
DEFAULTS = {"n_factors": 3, "weight_decay": 5e-4, "truncation": "lsvt", "rank_ratio": 0.4,
            "target_ratio": None, "lr_scale": 0.25, "init": "auto"}


def build(problem, n_factors, weight_decay, truncation, rank_ratio, target_ratio, lr_scale, init="auto"):
    # lr_scale is applied by the CLI: the factor products train with problem.lr * lr_scale
    from admm_compress.methods.lorita import lorita  # lazy: an absent module makes this entry unavailable

    from admm_compress._validation import check_float

    if target_ratio is not None:  # checked even when the truncation does not use it
        check_float("target_ratio", target_ratio, low=0.0, high=1.0, low_open=True, where="lorita")
    keep = list(problem.keep_dense) if problem is not None else []
    kw = {}
    if truncation == "lsvt":
        kw["rank_ratio"] = rank_ratio
    elif truncation == "gsvt":
        kw["keep"] = rank_ratio
    elif truncation == "isvt":
        kw["target_ratio"] = target_ratio if target_ratio is not None else rank_ratio
    if init == "auto":
        init = "svd" if problem is not None and getattr(problem, "pretrain_epochs", 0) > 0 else "random"
    return lorita(n_factors, weight_decay, targets=(nn.Conv2d, nn.Linear), exclude=keep or None,
                  truncation=truncation, init=init, **kw)
