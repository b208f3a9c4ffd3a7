"""Export: the compact model computes what the projected dense model computes, with fewer MACs,
and is a plain module tree that saves, traces and scripts."""
import io

import pytest
import torch
from torch import nn

import admm_compress as ac
from _helpers import projected as _projected
from admm_compress.layers import SparseConv2d, SparseLinear, SumBranches


class ConvNet(nn.Module):
    def __init__(self, stride=2, padding=1, dilation=1, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _check_equal(model, spec, x, atol=1e-5):
    model.eval()
    ref = _projected(model, spec).eval()
    compact = ac.export(model, spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref(x), atol=atol, rtol=1e-4)
    return compact


CASES = {
    "linear-lowrank": [ac.Constrain(nn.Linear, ac.LowRank(rank=3))],
    "conv-channel": [ac.Constrain("conv2", ac.LowRank(rank=4), view="channel")],
    "conv-spatial": [ac.Constrain("conv2", ac.LowRank(rank=4), view="spatial")],
    "schatten": [ac.Constrain("conv2", ac.SchattenP(p=0.5, weight=1.0))],
    "sparse": [ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.2), view="identity"),
               ac.Constrain(nn.Linear, ac.Cardinality(density=0.3), view="identity")],
    "filters": [ac.Constrain("conv2", ac.Cardinality(density=0.5, group_dim=0), view="identity")],
    "in-channels": [ac.Constrain("conv2", ac.Cardinality(density=0.5, group_dim=1), view="identity")],
    "sum": [ac.Constrain("conv2", ac.Sum(ac.LowRank(rank=2), ac.Cardinality(density=0.05)))],
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("geom", [dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2, bias=False)])
def test_exported_equals_projected_dense(name, geom):
    torch.manual_seed(0)
    model = ConvNet(**geom)
    _randomize_bn(model)
    x = torch.randn(2, 3, 12, 12)
    spec = CASES[name]
    if name == "schatten":
        # a penalty's export keeps the numerical rank of the weight: make it genuinely low rank
        with torch.no_grad():
            model.conv2.weight.copy_(ac.LowRank(rank=3).project(model.conv2.weight.reshape(32, -1)).reshape(32, 16, 3, 3))
    _check_equal(model, spec, x)


def test_kinds_of_exported_modules():
    model = ConvNet()
    c = ac.export(model, CASES["conv-channel"])
    first, second = c.conv2
    assert type(first) is nn.Conv2d and type(second) is nn.Conv2d
    assert first.kernel_size == (3, 3) and first.stride == (2, 2) and first.out_channels == 4 and first.bias is None
    assert second.kernel_size == (1, 1) and second.bias is not None
    s = ac.export(model, CASES["conv-spatial"]).conv2
    assert s[0].kernel_size == (1, 3) and s[0].stride == (1, 2) and s[1].kernel_size == (3, 1) and s[1].stride == (2, 1)
    assert isinstance(ac.export(model, CASES["sparse"]).conv2, SparseConv2d)
    assert isinstance(ac.export(model, CASES["sparse"]).fc, SparseLinear)
    assert isinstance(ac.export(model, CASES["sum"]).conv2, SumBranches)
    f = ac.export(model, CASES["filters"]).conv2
    assert f[0].out_channels == 16


def test_input_model_unchanged_unless_inplace():
    model = ConvNet()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ac.export(model, CASES["conv-channel"])
    assert type(model.conv2) is nn.Conv2d
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    out = ac.export(model, CASES["conv-channel"], inplace=True)
    assert out is model and isinstance(model.conv2, nn.Sequential)


def test_full_rank_layer_stays_dense():
    model = ConvNet()
    c = ac.export(model, [ac.Constrain("fc", ac.LowRank(rank=10))])
    assert type(c.fc) is nn.Linear


def test_fewer_macs_and_params_counted():
    model = ConvNet().eval()
    base = ac.complexity(model, (3, 16, 16))
    for name in ("conv-channel", "conv-spatial", "sparse", "filters", "in-channels"):
        comp = ac.complexity(ac.export(model, CASES[name]), (3, 16, 16))
        assert comp.macs < base.macs, name
    lr = ac.complexity(ac.export(model, CASES["conv-channel"]), (3, 16, 16))
    # conv2: 32*16*9 MACs per output pixel dense (8x8 output) vs rank 4: 4*16*9 + 32*4
    assert base.macs - lr.macs == (32 * 16 * 9 - (4 * 16 * 9 + 32 * 4)) * 64
    sp = ac.complexity(ac.export(model, CASES["sparse"]), (3, 16, 16))
    assert sp.macs < 0.5 * base.macs


def test_exported_model_saves_traces_scripts():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    for name in ("conv-channel", "conv-spatial", "sparse", "filters", "sum"):
        c = ac.export(model, CASES[name]).eval()
        ref = c(x)
        buf = io.BytesIO()
        torch.save(c.state_dict(), buf)
        buf.seek(0)
        c2 = ac.export(model, CASES[name]).eval()
        c2.load_state_dict(torch.load(buf, weights_only=True))
        torch.testing.assert_close(c2(x), ref)
        gm = torch.fx.symbolic_trace(c)
        torch.testing.assert_close(gm(x), ref)
        sm = torch.jit.script(c)
        torch.testing.assert_close(sm(x), ref)


def test_onnx_export_if_available(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = ConvNet().eval()
    c = ac.export(model, CASES["conv-channel"]).eval()
    torch.onnx.export(c, (torch.randn(1, 3, 12, 12),), str(tmp_path / "m.onnx"))
    assert (tmp_path / "m.onnx").stat().st_size > 0
