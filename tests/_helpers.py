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
