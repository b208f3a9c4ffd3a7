"""LRPET (Guo et al., TNNLS; papers/001): projected SGD with energy transfer and BN rectification.

Every Conv2d is projected to rank ``int(n - n P)`` once per epoch (Eq. 2, 6-10); on a network
without convolutions (the FCN) the Linear layers are projected instead.  ``keep_dense`` layers
of the problem (the classifier) stay dense, as in the paper.
"""
from torch import nn

NAME = "lrpet"
DESCRIPTION = "LRPET: projection + energy transfer + BN rectification once per epoch (P = pruning ratio)"
PARAMS = {"pruning_ratio": [0.4, 0.6, 0.8], "energy_transfer": [True, False], "bn_rectification": [True, False]}
DEFAULTS = {"pruning_ratio": 0.6, "energy_transfer": True, "bn_rectification": True, "include_linear": False}


def build(problem, pruning_ratio, energy_transfer, bn_rectification, include_linear):
    from admm_compress import methods

    keep = list(problem.keep_dense) if problem is not None else []
    has_conv = problem is None or any(isinstance(m, nn.Conv2d) for m in problem.model.modules())
    if has_conv:
        return methods.lrpet(pruning_ratio, energy_transfer=energy_transfer, bn_rectification=bn_rectification,
                             include_linear=include_linear, exclude=keep or None)
    return methods.lrpet(pruning_ratio, energy_transfer=energy_transfer, bn_rectification=False,
                         targets=nn.Linear, exclude=keep or None)
