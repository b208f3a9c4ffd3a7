"""LRPET (papers/001) as projected SGD on the general Solver: rank rule, energy transfer, BN
rectification (checked against its definition and a brute-force search), export, TRP baseline."""
import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import methods
from admm_compress.methods.lrpet import lrpet_rank


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 6, 1)  # no BN after it
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.conv3(x)
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = 0.2 + torch.rand(m.num_features, generator=g) * 2
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1


def _bn_scale(bn):
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()


@pytest.mark.parametrize("n,P,r", [(16, 0.6, 6), (64, 0.5, 32), (10, 0.7, 3), (3, 0.9, 1), (27, 0.0, 27)])
def test_rank_rule_is_int_n_minus_nP(n, P, r):
    assert lrpet_rank(n, P) == r


def test_targets_every_conv_and_leaves_fc_dense_and_reports_unpaired_conv():
    model = ConvBN()
    solver = methods.lrpet(0.5).prepare(model)
    assert [b.name for b in solver.bindings] == ["conv1", "conv2", "conv3"]
    assert solver.unpaired == ["conv3.weight"]
    assert "conv3" in solver.describe()
    with_fc = methods.lrpet(0.5, include_linear=True).prepare(ConvBN())
    assert "fc" in [b.name for b in with_fc.bindings]


def test_projection_rank_and_energy_transfer_in_the_rectified_metric():
    torch.manual_seed(0)
    model = ConvBN()
    _randomize_bn(model)
    P = 0.5
    solver = methods.lrpet(P, every=1).prepare(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    solver.update()
    for name, bn in (("conv1", model.bn1), ("conv2", model.bn2)):
        conv = getattr(model, name)
        a = _bn_scale(bn)
        W0 = before[name].reshape(conv.out_channels, -1)
        W1 = conv.weight.detach().reshape(conv.out_channels, -1)
        r = lrpet_rank(min(W0.shape), P)
        DW1 = a[:, None] * W1
        assert torch.linalg.matrix_rank(DW1, rtol=1e-5).item() <= r
        # Eq. 6 in the rectified metric: ||D W'|| = ||D W|| up to the 1e-5 regularization of Eq. 10
        n0 = torch.linalg.norm(a[:, None] * W0)
        rel = abs(float(torch.linalg.norm(DW1) - n0)) / float(n0)
        assert rel <= float((1e-5 / (a.pow(2) + 1e-5)).max()) + 1e-6
    # conv3 has no BN: plain projection with energy transfer
    W0 = before["conv3"].reshape(6, -1)
    W1 = model.conv3.weight.detach().reshape(6, -1)
    assert torch.linalg.matrix_rank(W1, rtol=1e-5).item() <= lrpet_rank(6, P)
    torch.testing.assert_close(torch.linalg.norm(W1), torch.linalg.norm(W0), rtol=1e-5, atol=0)


def _brute_force_weighted_lowrank(W, a, r, starts=20, iters=3000):
    """min ||diag(a)(A B^T - W)||_F over A (m x r), B (n x r) by Adam from random starts."""
    best = float("inf")
    g = torch.Generator().manual_seed(0)
    for _ in range(starts):
        A = torch.randn(W.shape[0], r, generator=g, dtype=torch.float64).requires_grad_()
        B = torch.randn(W.shape[1], r, generator=g, dtype=torch.float64).requires_grad_()
        opt = torch.optim.Adam([A, B], lr=0.05)
        for _ in range(iters):
            loss = (a[:, None] * (A @ B.T - W)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        best = min(best, float(loss.detach().sqrt()))
    return best


def test_bn_rectified_projection_minimizes_the_weighted_error_brute_force():
    """Without energy transfer, the rectified projection is argmin_{rank W' <= r} ||D (W' - W)||
    (exact for invertible D, up to the 1e-5 of the regularized inverse)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 5, 1, bias=False).double()
    bn = nn.BatchNorm2d(5).double()
    _randomize_bn(nn.Sequential(conv, bn), seed=3)
    model = nn.Sequential(conv, bn)
    W = conv.weight.detach().reshape(5, 2).clone()
    a = _bn_scale(bn)
    solver = methods.lrpet(0.5, energy_transfer=False, every=1).prepare(model)
    solver.update()
    W1 = conv.weight.detach().reshape(5, 2)
    ours = float(torch.linalg.norm(a[:, None] * (W1 - W)))
    sv = torch.linalg.svdvals(a[:, None] * W)
    assert ours == pytest.approx(float(sv[1]), rel=1e-4)  # Eckart-Young in the metric
    brute = _brute_force_weighted_lowrank(W, a, 1, starts=5, iters=1500)
    assert ours <= brute + 1e-6
    # the plain (unrectified) projection is worse in this metric
    plain = ac.LowRank(rank=1).project(W)
    assert float(torch.linalg.norm(a[:, None] * (plain - W))) >= ours - 1e-9


def test_projection_leaves_momentum_buffers_untouched_and_runs_once_per_epoch():
    torch.manual_seed(0)
    model = ConvBN()
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    solver = methods.lrpet(0.5)
    solver.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb) + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert not solver.step()  # every="epoch": no projection inside the epoch
    bufs = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    assert solver.epoch_end()
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[id(p)], rtol=0, atol=0)
    assert float(solver.penalty()) == 0.0 and solver.Z == {} and solver.U == {}


def test_skip_below_leaves_tiny_layers_alone():
    model = ConvBN()
    with torch.no_grad():
        model.conv3.weight.mul_(1e-7)
    w = model.conv3.weight.detach().clone()
    solver = methods.lrpet(0.5, bn_rectification=False, every=1).prepare(model)
    rec = solver.update()
    assert rec["layers"]["conv3.weight"].get("skipped")
    torch.testing.assert_close(model.conv3.weight.detach(), w, rtol=0, atol=0)


def test_per_layer_ratio_and_floor():
    model = ConvBN()
    solver = methods.lrpet(0.9, per_layer={"conv2": 0.5}, min_rank={"conv1": 4}, bn_rectification=False,
                           every=1).prepare(model)
    solver.update()
    ranks = {n: torch.linalg.matrix_rank(getattr(model, n).weight.detach().reshape(getattr(model, n).out_channels, -1),
                                         rtol=1e-5).item() for n in ("conv1", "conv2", "conv3")}
    assert ranks == {"conv1": 4, "conv2": lrpet_rank(12, 0.5), "conv3": lrpet_rank(6, 0.9)}


def test_export_is_the_two_layer_split_and_equals_the_projected_model():
    torch.manual_seed(0)
    model = ac.models.resnet20(num_classes=10)
    _randomize_bn(model)
    solver = methods.lrpet(0.6, every=1).prepare(model)
    solver.update()
    model.eval()
    compact = ac.export(model, solver.spec).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-4)
    split = compact.layer1[0].conv1
    assert isinstance(split, nn.Sequential) and len(split) == 2
    first, second = split
    conv = model.layer1[0].conv1
    r = lrpet_rank(min(conv.out_channels, conv.in_channels * 9), 0.6)
    assert (first.kernel_size, first.out_channels, first.stride, first.padding) == ((3, 3), r, conv.stride, conv.padding)
    assert first.bias is None
    assert second.kernel_size == (1, 1) and second.out_channels == conv.out_channels
    c0 = ac.complexity(ac.models.resnet20(), (3, 32, 32), backend="pytorch")
    c1 = ac.complexity(compact, (3, 32, 32), backend="pytorch")
    assert c1.macs < c0.macs and c1.params < c0.params


def test_fit_on_digits32_is_feasible_and_exportable():
    torch.manual_seed(0)
    train, test = ac.data.digits32(batch_size=64)
    model = ac.models.resnet20(num_classes=10)
    solver = methods.lrpet(0.5)
    hist = solver.fit(model, _take(train, 3), epochs=1, val_loader=_take(test, 2), progress=False)
    assert hist.final["feasible"]
    for b in solver.bindings:
        W = b.param.detach().reshape(b.param.shape[0], -1)
        assert torch.linalg.matrix_rank(W, rtol=1e-4).item() <= lrpet_rank(min(W.shape), 0.5)


def _take(loader, n):
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return out


def test_bad_input():
    with pytest.raises(ValueError, match="pruning_ratio"):
        methods.lrpet(1.0)
    with pytest.raises(ValueError, match="pruning_ratio"):
        methods.lrpet(-0.1)
    with pytest.raises(ValueError, match=r"per_layer\['conv1'\]"):
        methods.lrpet(0.5, per_layer={"conv1": 1.5})
    with pytest.raises(ValueError, match="min_rank"):
        methods.lrpet(0.5, min_rank=0)
    with pytest.raises(ValueError, match="every"):
        methods.lrpet(0.5, every=0)


# ------------------------------------------------------------------ TRP baseline
def test_trp_truncates_by_energy_and_adds_the_nuclear_subgradient_once():
    torch.manual_seed(0)
    lin = nn.Linear(10, 8, bias=False).double()
    solver = methods.trp(energy=0.9, nuclear_weight=0.1, every=2, targets=nn.Linear)
    solver.prepare(lin)
    x = torch.randn(4, 10, dtype=torch.float64)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)  # lr 0: only the projection moves W
    W0 = lin.weight.detach().clone()
    s = torch.linalg.svdvals(W0)
    k = int(torch.searchsorted(torch.cumsum(s ** 2, 0) / (s ** 2).sum(), torch.tensor(0.9, dtype=torch.float64)) + 1)
    for it in range(3):
        loss = lin(x).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        g = lin.weight.grad.clone()
        if it == 2:  # the iteration right after the truncation at step 2
            U, _, Vh = torch.linalg.svd(lin.weight.detach())
            torch.testing.assert_close(g - x.sum(0).expand(8, -1), 0.1 * U[:, :k] @ Vh[:k])
        else:
            torch.testing.assert_close(g, x.sum(0).expand(8, -1))
        opt.step()
        solver.step()
    assert torch.linalg.matrix_rank(lin.weight.detach()).item() == k
    solver.finalize(lin)
    compact = solver.export(lin)
    torch.testing.assert_close(compact(x), lin(x))


def test_trp_bad_input():
    with pytest.raises(ValueError, match="energy"):
        methods.trp(energy=0.0)
    with pytest.raises(ValueError, match="nuclear_weight"):
        methods.trp(nuclear_weight=-1.0)
