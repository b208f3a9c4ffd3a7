"""RASPA (papers/003): ADMM on W = L + S with a low-TT-rank L and a sparse S (Eq. 1-13)."""
from torch import nn

REQUIRES = ["admm_compress.methods.raspa"]
NAME = "raspa"
DESCRIPTION = "RASPA: ADMM on W = L + S, TTRank(tt_ranks) on L, Cardinality(density) on S"
PARAMS = {"tt_ranks": [4, 8, 16], "density": [0.02, 0.05, 0.1], "rho": ["auto", 1e-3, 1e-2]}
DEFAULTS = {"tt_ranks": 8, "density": 0.05, "rho": "auto", "rho_growth": 1.0, "rho_max": None, "init": "decompose"}
# TT layout (admm_compress.views.TT_LAYOUTS): "oki" = (O, kh*kw, I), exported as three stock convs
# (two Linears), fewer MACs than dense at these ranks; "eq9" = the literal Eq. 9 (TTConv2d, more MACs);
# "paired" = (o1 i1, kh*kw, o2 i2) (TTPairedConv; Table 10's DenseNet-40 ranks)
DEFAULTS["layout"] = "oki"


def build(problem, tt_ranks, density, rho, rho_growth, rho_max, init, layout="oki"):
    from admm_compress.methods.raspa import raspa

    keep = list(problem.keep_dense) if problem is not None else []
    has_conv = problem is None or any(isinstance(m, nn.Conv2d) for m in problem.model.modules())
    return raspa(tt_ranks, density, rho=rho, rho_growth=rho_growth, rho_max=rho_max,
                         targets=nn.Conv2d if has_conv else nn.Linear, exclude=keep or None, init=init,
                         layout=layout)
