"""fold_batchnorm: eval-mode BatchNorms folded into convs, chains and L + S sums, by equal outputs.

Tolerance: folding re-associates one multiply per conv output (``(a*W) z`` for ``a*(W z)``) and one
add for the shift, a few float32 roundings (2**-24 each) per layer, so the outputs of a net of
``D`` layers agree to about ``D * 2**-24`` relative to their scale times the layers' gain; the
tests use 1e-4 relative to the largest output, above that for the ~60 layers here and far below
any error a wrong fold makes (it changes the outputs by O(1): BatchNorm statistics are drawn away
from the identity below).
"""
import logging

import pytest
import torch
import torchvision
from torch import nn

import admm_compress as ac
from admm_compress.fold import fold_batchnorm
from admm_compress.graph import GraphError
from admm_compress.layers import SparseConv2d, SumBranches
from admm_compress.methods.raspa import raspa

RTOL = 1e-4


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics far from the identity, so that a missing or wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def raspa_resnet20():
    torch.manual_seed(0)
    model = ac.models.resnet20(num_classes=10).eval()
    solver = raspa(tt_ranks=(4, 4), density=0.05, decompose_iters=1)
    solver.prepare(model)
    solver.finalize(model)
    return randomize_bn(ac.export(model, solver)).eval()


def test_raspa_export_folds_every_batchnorm_behind_its_sums_exactly(raspa_resnet20):
    ex = raspa_resnet20
    sums = [m for m in ex.modules() if isinstance(m, SumBranches)]
    assert sums, "RASPA's export should contain L + S layers"
    masks = {id(m): m.mask.clone() for m in ex.modules() if isinstance(m, SparseConv2d)}
    folded = fold_batchnorm(ex)
    assert n_bn(ex) > 0 and n_bn(folded) == 0  # every BN of ResNet-20 follows a conv or an L + S sum
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_diff(ex(x), folded(x)) < RTOL
    # the sparse branches keep their support and stay zero off it
    sparse = [m for m in folded.modules() if isinstance(m, SparseConv2d)]
    assert len(sparse) == len(masks)
    for before, m in zip((m for m in ex.modules() if isinstance(m, SparseConv2d)), sparse):
        assert torch.equal(m.mask, masks[id(before)])
        assert not bool((m.weight * (m.mask == 0)).any())
    # one layer less per BN, no new MACs: BN's cost is gone, the folded shift is a bias add
    assert ac.complexity(folded, (3, 32, 32)).params < ac.complexity(ex, (3, 32, 32)).params


def test_folded_raspa_onnx_graph_has_no_batchnorm(raspa_resnet20, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from admm_compress.latency import onnx_session

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    folded = fold_batchnorm(raspa_resnet20)
    path = str(tmp_path / "m.onnx")
    run = onnx_session(folded, x, path=path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" not in ops
    y = run(x.numpy())
    with torch.no_grad():
        assert rel_diff(raspa_resnet20(x), torch.from_numpy(y)) < RTOL


def test_torchvision_resnet18_pruned_export_folds_exactly():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.2))], mode="projection")
    solver.prepare(model)
    solver.finalize(model)
    ex = randomize_bn(ac.export(model, solver)).eval()
    folded = fold_batchnorm(ex)
    assert n_bn(ex) == 20 and n_bn(folded) == 0
    assert sum(isinstance(m, SparseConv2d) for m in folded.modules()) == 20
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(ex(x), folded(x)) < RTOL


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_torchvision_depthwise_models_fold_exactly(name):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(num_classes=10)).eval()
    folded = fold_batchnorm(model)
    assert n_bn(folded) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) < RTOL


@pytest.mark.parametrize("conv,bn,shape", [
    (nn.Conv1d(4, 6, 3, bias=False), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8, affine=False), (2, 4, 7, 7)),
    (nn.Conv3d(3, 5, 2), nn.BatchNorm3d(5), (2, 3, 4, 4, 4)),
])
def test_conv_kinds_fold_to_one_conv(conv, bn, shape):
    net = randomize_bn(nn.Sequential(conv, bn, nn.ReLU())).eval()
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_diff(net(x), folded(x)) < RTOL


class DictHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return {"features": self.bn(self.conv(x)), "input": x}


def test_dict_outputs_and_inplace():
    net = randomize_bn(DictHead()).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = net(x)["features"].clone()
    out = fold_batchnorm(net, inplace=True)
    assert out is net and isinstance(net.bn, nn.Identity)
    with torch.no_grad():
        assert rel_diff(ref, net(x)["features"]) < RTOL


def test_copy_leaves_the_input_model_untouched():
    net = randomize_bn(DictHead()).eval()
    w = net.conv.weight.detach().clone()
    folded = fold_batchnorm(net)
    assert folded is not net and isinstance(net.bn, nn.BatchNorm2d) and torch.equal(net.conv.weight, w)


class Unfoldable(nn.Module):
    """Four BatchNorms that must stay: a conv output read twice, a Linear producer, batch statistics,
    a conv called twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)
        self.c3 = nn.Conv2d(3, 3, 1)
        self.bn3 = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3, 4)
        self.bn4 = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.c1(x)
        x = self.bn1(y) + y                    # c1's output is also read by the add
        x = self.shared(x)
        x = self.bn2(self.shared(x))           # shared is called twice
        x = self.bn3(self.c3(x))               # no running statistics
        return self.bn4(self.fc(x.mean((2, 3))))  # a Linear before BatchNorm1d is not folded


def test_unfoldable_batchnorms_stay_and_are_reported(caplog):
    net = randomize_bn(Unfoldable()).eval()
    x = torch.randn(3, 3, 4, 4)
    with caplog.at_level(logging.INFO, logger="admm_compress.fold"):
        folded = fold_batchnorm(net)
    assert all(isinstance(getattr(folded, f"bn{i}"), nn.modules.batchnorm._BatchNorm) for i in range(1, 5))
    msg = caplog.text
    assert "folded 0 BatchNorm" in msg
    for why in ("also read elsewhere", "more than once", "no running statistics", "Linear"):
        assert why in msg
    with torch.no_grad():
        assert torch.equal(net(x), folded(x))


def test_training_mode_is_refused_before_any_work():
    net = randomize_bn(DictHead())  # train mode
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        fold_batchnorm(net, inplace=True)
    assert isinstance(net.bn, nn.BatchNorm2d)
    net.eval()
    net.bn.train()
    with pytest.raises(ValueError, match="BatchNorm 'bn' is in training mode"):
        fold_batchnorm(net)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return x


def test_untraceable_model_raises_graph_error():
    with pytest.raises(GraphError, match="cannot trace Untraceable"):
        fold_batchnorm(Untraceable().eval())


def test_not_a_module_raises():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fold_batchnorm("resnet")
