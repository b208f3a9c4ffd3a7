"""One export protocol for every compressor (issue 16): after ``fit`` (which finalizes),
``ac.export(model, compressor)`` builds the compact model from ``compressor.export_spec()`` and
computes what the finalized model computes, with fewer MACs.

Everything runs in float64: the exported model evaluates the same linear maps from factors of
the finalized weights in another order, so the outputs agree to a few ulps of float64 times the
depth and widths (~1e-13 relative here); a wrong rank, a dropped layer or a re-selected rank
differs by orders of magnitude more than the 1e-9 asserted.
"""
import copy

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import methods


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


COMPRESSORS = {
    "admm_lowrank": lambda: ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(ratio=0.25))]),
    "admm_sparse": lambda: ac.Solver([ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=0.2))]),
    "projection_lowrank": lambda: ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(ratio=0.25))],
                                            mode="projection"),
    "lrpet": lambda: methods.lrpet(0.6),
    "trp": lambda: methods.trp(),
    "raspa": lambda: methods.raspa(),
    "lorita": lambda: methods.lorita(rank_ratio=0.25),
    "decomposable_net": lambda: methods.decomposable_net(),
}


def _data(n_batches=2, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n_batches)]


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_export_of_the_compressor_equals_the_finalized_model(name):
    torch.manual_seed(0)
    model = Net().double()
    dense = copy.deepcopy(model).float().eval()
    comp = COMPRESSORS[name]()
    assert isinstance(comp, ac.Compressor)
    comp.fit(model, _data(), epochs=2, lr=1e-3, progress=False)
    model.eval()
    compact = ac.export(model, comp).eval()
    reference = model
    if name == "decomposable_net":
        # the model stays full rank (any size after training): its finalized model at the
        # configured size is the weights projected to export_spec()'s ranks
        reference = copy.deepcopy(model)
        for b in ac.resolve(comp.export_spec(), reference):
            with torch.no_grad():
                b.param.copy_(b.from_view(b.constraint.project(b.to_view(b.param.detach()))))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref, out = reference(x), compact(x)
    assert torch.isfinite(ref).all()
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 1e-9, f"{name}: exported model differs from the finalized one by {rel:.2e}"
    c0 = ac.complexity(dense, (3, 8, 8), backend="pytorch")
    c1 = ac.complexity(compact.float(), (3, 8, 8), backend="pytorch")
    if name == "trp":  # the energy rule picks the ranks from the data: smaller is not promised
        assert c1.params <= c0.params
    else:
        assert c1.params < c0.params, f"{name}: {c1.params} >= {c0.params} parameters"
