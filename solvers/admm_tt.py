"""General ADMM with a tensor-train rank constraint per layer (TT-SVD Z-step; RASPA's L part alone).

Every Conv2d / Linear weight (except the problem's ``keep_dense`` layers) is constrained to
``TTRank(ranks)`` on a TT layout: ``layout="oki"`` (default) views it as ``(O, kh*kw, I)``
(``TTView.oki()``; exported as three stock convs / two Linears, fewer MACs than dense);
``layout="eq9"`` as a balanced ``TTView.auto(shape, d)`` (the literal RASPA Eq. 9; exported as
``TTConv2d``, which costs more MACs than dense at these ranks); ``layout="paired"`` as
``(o1 i1, kh*kw, o2 i2)`` (``TTView.paired()``; ``TTPairedConv``: the oki chain on square layers,
fewer parameters and more MACs on narrow ones).
"""
from torch import nn

import admm_compress as ac

REQUIRES = ["admm_compress.methods.raspa"]
NAME = "admm_tt"
KIND = "admm"
CONSTRAINT = "tt"
DESCRIPTION = "ADMM, TTRank(ranks) on a TT view (layout oki: (O, kh*kw, I); eq9: d-way; paired: (o1 i1, kh*kw, o2 i2)) of each Conv2d / Linear weight"
# every: Z/U-step cadence on network problems.  Once per epoch here: a TT-rank-8 set keeps only
# ~15 % of a trained 96 x 96 layer's energy (||W - Pi(W)|| / ||W|| = 0.85), and a Z/U-step every 5
# steps grew the duals faster than SGD could follow (digits FCN at chance, 10.3 %); per epoch with
# rho 0.1: 96.4 % (measured with `admm-compress run digits_fcn admm_tt`).  rho: the solver's
# adaptive default (issue 14); numeric values stay in the grid.
PARAMS = {"ranks": [4, 8, 16], "rho": ["auto", 1e-2, 1e-1]}  # the grid holds the default rho
DEFAULTS = {"ranks": 8, "d": 2, "rho": "auto", "rho_growth": 1.0, "rho_max": None, "every": "epoch"}
DEFAULTS["layout"] = "oki"  # admm_compress.views.TT_LAYOUTS; d applies to "eq9" only


def build(problem, ranks, d, rho, rho_growth, rho_max, every, layout="oki"):
    import admm_compress.methods.raspa  # noqa: F401  (ImportError: unavailable)
    from admm_compress.views import TT_LAYOUTS, TTView, tt_layout_view

    if layout not in TT_LAYOUTS:
        raise ValueError(f"admm_tt: layout={layout!r} is not one of {TT_LAYOUTS}")

    if problem is not None and problem.spec is not None:
        return ac.Solver(problem.spec, rho=rho, rho_growth=rho_growth, rho_max=rho_max)
    if problem is None:
        raise ValueError("admm_tt needs the problem (its model) to choose the TT views")
    keep = tuple(problem.keep_dense)
    spec = []
    import fnmatch

    for name, m in problem.model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(fnmatch.fnmatchcase(name, k) for k in keep):
            view = TTView.auto(tuple(m.weight.shape), d) if layout == "eq9" else tt_layout_view(layout)
            spec.append(ac.Constrain(name, ac.TTRank(ranks), view=view, name=f"admm_tt:{name}"))
    return ac.Solver(spec, rho=rho, rho_growth=rho_growth, rho_max=rho_max, every=every)
