"""Prepare decides: structured sparsity on a conv means channels whatever the view, and layers that
would not shrink are named at prepare with the numbers (issue 13, items 3 and 6)."""
import logging

import pytest
import torch
from torch import nn

import admm_compress as ac


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("view", ["auto", "channel", "matrix", "identity"])
@pytest.mark.parametrize("group_dim", [0, 1])
def test_group_dim_on_conv_means_channels_whatever_the_view(view, group_dim):
    torch.manual_seed(0)
    model = ConvNet()
    spec = [ac.Constrain("conv2", ac.Cardinality(density=0.5, group_dim=group_dim), view=view)]
    solver = ac.Solver(spec, mode="projection")
    solver.prepare(model)
    solver.finalize(model)
    w = model.conv2.weight.detach()
    # whole input channels (dim 1) or filters (dim 0) are zero: exactly half of them
    norms = w.transpose(0, group_dim).reshape(w.shape[group_dim], -1).norm(dim=1)
    assert int((norms == 0).sum()) == w.shape[group_dim] // 2
    assert int((w != 0).sum()) == w.numel() // 2
    # and export really removes them: fewer MACs than the dense conv2, same outputs
    model.eval()
    compact = ac.export(model, solver, remove_channels=False).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-4)
    dense = ac.complexity(ConvNet(), (3, 8, 8), backend="pytorch").macs
    conv2_macs = 16 * 8 * 9 * 64
    assert ac.complexity(compact, (3, 8, 8), backend="pytorch").macs <= dense - conv2_macs // 2 + 16 * 64


def test_describe_reports_the_kept_channels():
    model = ConvNet()
    s = ac.Solver([ac.Constrain("conv2", ac.Cardinality(density=0.5, group_dim=1))], mode="projection")
    text = s.prepare(model).describe()
    assert "identity" in text and str(16 * 4 * 9) in text  # 4 of 8 input channels x (16 x 3 x 3)


def test_break_even_rank_is_a_warning_at_prepare(caplog):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    s = ac.Solver([ac.Constrain("0", ac.LowRank(ratio=0.6))], mode="projection")
    with caplog.at_level(logging.WARNING, logger="admm_compress"):
        s.prepare(model)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # rank 38 of 64 x 64: 38 * 128 = 4864 >= 4096
    assert any("layer '0'" in m and "rank 38" in m and "4864" in m and "4096" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="admm_compress"):
        ac.Solver([ac.Constrain("0", ac.LowRank(ratio=0.4))], mode="projection").prepare(model)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_unstructured_sparsity_works_on_depthwise_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    s = ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.3))], mode="projection")
    s.prepare(model)
    s.finalize(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(ac.export(model, s)(x), model(x), atol=1e-5, rtol=1e-4)


def test_spec_whose_layers_all_fail_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3, groups=2))
    spec = [ac.Constrain(nn.Conv2d, ac.LowRank(rank=1), skip_unexportable=True)]
    with pytest.raises(ac.SpecError, match=r"selects 2 layer\(s\).*could compress none"):
        ac.Solver(spec).prepare(model)
