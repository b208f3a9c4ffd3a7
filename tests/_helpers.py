"""Small helpers shared by test modules (imported as ``from _helpers import ...``)."""
import copy

import torch

import admm_compress as ac


def projected(model, spec):
    """A copy of ``model`` whose constrained weights are replaced by their projections (the dense
    model an export must reproduce)."""
    dense = copy.deepcopy(model)
    for b in ac.specs.resolve(spec, dense):
        with torch.no_grad():
            b.param.copy_(b.from_view(b.constraint.project(b.to_view(b.param))))
    return dense


def scaled_gd_mixed_model():
    """Layers of three kinds and two ranks: low rank (ranks 2 and 3: two Gram sizes), TT cores
    on the (O, kh*kw, I) view and RASPA's L + S -- one batched factorization for all."""
    from torch import nn

    from admm_compress.parametrizations import structure
    from admm_compress.views import tt_layout_view

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    solver = ac.Solver([ac.Constrain("0", ac.LowRank(rank=2)),
                        ac.Constrain("2", ac.TTRank((2, 3)), view=tt_layout_view("oki")),
                        ac.Constrain("4", ac.Sum(ac.TTRank((2, 2)), ac.Cardinality(density=0.1)),
                                     view=tt_layout_view("oki")),
                        ac.Constrain("8", ac.LowRank(rank=3)), ac.Constrain("10", ac.LowRank(rank=2))],
                       mode="projection")
    solver.prepare(net)
    solver.finalize(net)
    structure(solver.bindings)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return net, solver, x
