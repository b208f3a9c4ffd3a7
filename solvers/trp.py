"""TRP (Xu et al., IJCAI 2019), the baseline LRPET compares to, as released (cifar-TRP.py):
energy-0.99 truncation of every non-stem, non-1x1 conv on the "VH" view before every iteration,
plus the nuclear-norm subgradient every iteration."""
from torch import nn

NAME = "trp"
KIND = "baseline"
DESCRIPTION = "TRP baseline as released: energy-e truncation (VH view) every iteration + nuclear subgradient"
PARAMS = {"energy": [0.95, 0.98, 0.99], "nuclear_weight": [0.0, 3e-4]}
DEFAULTS = {"energy": 0.99, "nuclear_weight": 3e-4, "every": 1, "view": "vh"}


def build(problem, energy, nuclear_weight, every, view):
    from admm_compress import methods
    from admm_compress._validation import check_choice

    check_choice("view", view, ("vh", "channel", "spatial"), where="trp")  # checked even where unused (no conv)
    keep = list(problem.keep_dense) if problem is not None else []
    has_conv = problem is None or any(isinstance(m, nn.Conv2d) for m in problem.model.modules())
    return methods.trp(energy, nuclear_weight, every, targets=nn.Conv2d if has_conv else nn.Linear,
                       view=view if has_conv else "auto", exclude=keep or None)
