"""General ADMM with a cardinality constraint (unstructured) on Conv2d / Linear weights.

``scope="layer"`` (default): every weight keeps ``density`` of its entries; ``scope="global"``:
one budget of ``density`` of all the bound entries (``Cardinality(scope="global")``).

Z-step = keep the ``density`` fraction of largest-magnitude entries (Zhang et al. 2018, ADMM
pruning; RASPA Eq. 12); export gives sparse layers whose MACs count the non-zeros.
"""
from torch import nn

import admm_compress as ac

NAME = "admm_sparse"
KIND = "admm"
CONSTRAINT = "sparse"
DESCRIPTION = "ADMM, Cardinality(density) per Conv2d / Linear weight (magnitude top-k Z-step)"
# every: Z/U-step cadence in optimizer steps on network problems (as admm_lowrank, where the
# measurement that chose it is written down).  rho: the solver's adaptive default (issue 14,
# docs/results/admm_vs_prune.md); the grid also sweeps numeric values (constant rho, or the
# geometric schedule when rho_growth > 1 is set).
PARAMS = {"density": [0.1, 0.25, 0.5], "rho": ["auto", 1e-2, 1e-1]}  # the grid holds the default rho
DEFAULTS = {"density": 0.25, "rho": "auto", "rho_growth": 1.0, "rho_max": None, "every": 5, "scope": "layer"}


def build(problem, density, rho, rho_growth, rho_max, every, scope):
    if problem is not None and problem.spec is not None:
        spec = problem.spec
    else:
        keep = tuple(problem.keep_dense) if problem is not None else ()
        spec = [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=density, scope=scope), exclude=keep or None,
                             name="admm_sparse")]
    return ac.Solver(spec, rho=rho, rho_growth=rho_growth, rho_max=rho_max, every=every)
