"""General ADMM with a matrix-rank constraint on every Conv2d ("channel" view) and Linear layer.

W-step: SGD on f(W) + rho/2 ||W - Z + U||^2; Z-step: truncated SVD; U-step: U += W - Z
(Boyd et al. 2011 Sec. 3.1.1; Zhang et al. 2018).  On an exact problem the problem's own
constraint (its ``spec``) is used, so the known answer checks the loop itself.
"""
from torch import nn

import admm_compress as ac

NAME = "admm_lowrank"
KIND = "admm"
CONSTRAINT = "lowrank"
DESCRIPTION = "ADMM, LowRank(ratio) per Conv2d (channel view) / Linear; geometric rho schedule"
# every: Z/U-step cadence in optimizer steps (network problems; measured on digits32_resnet20,
# 4 epochs with numeric rho: rho 0.01 once per epoch left ||W - Z||/||W|| at 1.17 and 73.9 % after
# fine-tuning, rho 0.1 every 5 steps 0.24 and 98.9 %, the dense accuracy).  rho: the solver's
# adaptive default (issue 14); numeric values stay in the grid (rho_growth > 1 for a schedule).
PARAMS = {"ratio": [0.2, 0.4, 0.6], "rho": ["auto", 1e-2, 1e-1]}  # the grid holds the default rho
DEFAULTS = {"ratio": 0.4, "rho": "auto", "rho_growth": 1.0, "rho_max": None, "every": 5, "view": "channel"}


def build(problem, ratio, rho, rho_growth, rho_max, view, every):
    if view != "auto":
        ac.views.get_view(view)  # a misspelt view stops the run now, even on a model without convolutions
    if problem is not None and problem.spec is not None:
        spec = problem.spec
    else:
        keep = tuple(problem.keep_dense) if problem is not None else ()
        spec = []
        if problem is None or any(isinstance(m, nn.Conv2d) for m in problem.model.modules()):
            spec.append(ac.Constrain(nn.Conv2d, ac.LowRank(ratio=ratio), view=view, exclude=keep or None,
                                     name="admm_lowrank:conv"))
        spec.append(ac.Constrain(nn.Linear, ac.LowRank(ratio=ratio), exclude=keep or None,
                                 name="admm_lowrank:linear"))
        spec = [s for s in spec if problem is None or s.select(problem.model)]
    return ac.Solver(spec, rho=rho, rho_growth=rho_growth, rho_max=rho_max, every=every)
