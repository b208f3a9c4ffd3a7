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


@pytest.mark.parametrize("shape", [(20, 20), (3, 12, 9)])
def test_energy_rule_with_energy_transfer_keeps_the_norm(shape):
    """LowRank(energy=e, energy_transfer=True) = alpha * Pi_k(X) with k the energy rank and
    alpha = ||s|| / ||s_{1:k}|| over the WHOLE spectrum, so ||P(X)||_F = ||X||_F (Eq. 6)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    out = ac.LowRank(energy=0.9, energy_transfer=True).project(x)
    torch.testing.assert_close(torch.linalg.matrix_norm(out), torch.linalg.matrix_norm(x), rtol=1e-12, atol=0)
    for xb, ob in zip(x.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])):
        U, s, Vh = torch.linalg.svd(xb, full_matrices=False)
        k = _energy_rank(s, 0.9)
        alpha = s.norm() / s[:k].norm()
        torch.testing.assert_close(ob, alpha * (U[:, :k] * s[:k]) @ Vh[:k], rtol=1e-10, atol=1e-12)


def test_finalize_truncates_without_energy_transfer_or_metric_when_every_is_steps():
    """every=T steps: the last projection lies steps back; finalize is the plain truncated SVD
    of the trained weight (Sec. III-E), not alpha * Pi_r in the BN metric again."""
    torch.manual_seed(0)
    model = ConvBN()
    _randomize_bn(model)
    solver = methods.lrpet(0.5, every=3).prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(5):  # projections after step 3; steps 4 and 5 move the weights off rank r
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    model.eval()
    before = {b.name: b.param.detach().reshape(b.shape[0], -1).clone() for b in solver.bindings}
    solver.finalize(model)
    for b in solver.bindings:
        W = before[b.name]
        r = lrpet_rank(min(W.shape), 0.5)
        assert torch.linalg.matrix_rank(W).item() > r  # really off rank r before finalize
        U, sv, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        expect = ((U[:, :r] * sv[:r]) @ Vh[:r]).float()
        torch.testing.assert_close(b.param.detach().reshape(b.shape[0], -1), expect, rtol=1e-5, atol=1e-6)
    compact = solver.export(model).eval()
    torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)


def test_vgg16_rank_floor_preset_of_sec_iv_b():
    model = ac.models.vgg16(num_classes=10)
    solver = methods.lrpet(0.92, min_rank="vgg16", bn_rectification=False).prepare(model)
    convs = [b for b in solver.bindings]
    q = [min(b.viewed_shape) for b in convs]
    assert q[:2] == [27, 64]  # 3 -> 64 (64 x 27), 64 -> 64 (64 x 576)
    floors = [18, 42] + [42] * (len(convs) - 2)  # floor(2/3 * 27), floor(2/3 * 64), the second's
    assert [solver.floors[b.name] for b in convs] == floors
    ranks = [b.constraint.rank_for(b.viewed_shape) for b in convs]
    assert ranks == [max(f, lrpet_rank(n, 0.92)) for f, n in zip(floors, q)]
    with pytest.raises(ValueError, match="min_rank='vgg' is not allowed"):
        methods.lrpet(0.5, min_rank="vgg")


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
def _energy_rank(s, e):
    """Smallest k with sum_{i<=k} s_i^2 >= e * sum s_i^2 (the definition, by a loop)."""
    total, acc = float((s ** 2).sum()), 0.0
    for k, v in enumerate(s.tolist(), 1):
        acc += v * v
        if acc >= e * total * (1 - 1e-12):
            return k
    return len(s)


def test_trp_truncates_by_energy_and_adds_the_nuclear_subgradient_every_iteration():
    """every=2, lr=0: iterations 0 and 1 see the current weight's subgradient U V^T (full rank
    before the first truncation), iteration 2 the U_k V_k^T kept by the truncation after step 2."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 8, bias=False).double()
    solver = methods.trp(energy=0.9, nuclear_weight=0.1, every=2, targets=nn.Linear)
    solver.prepare(lin)
    x = torch.randn(4, 10, dtype=torch.float64)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)  # lr 0: only the projection moves W
    W0 = lin.weight.detach().clone()
    k = _energy_rank(torch.linalg.svdvals(W0), 0.9)
    for it in range(3):
        loss = lin(x).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        g = lin.weight.grad.clone()
        U, _, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        r = 8 if it < 2 else k  # rank of the current weight
        torch.testing.assert_close(g - x.sum(0).expand(8, -1), 0.1 * U[:, :r] @ Vh[:r])
        opt.step()
        solver.step()
    assert torch.linalg.matrix_rank(lin.weight.detach()).item() == k
    assert solver.rank_history == [{"weight": k}]
    # an optimizer step ran since the truncation: finalize applies the rule to the current weight
    k2 = _energy_rank(torch.linalg.svdvals(lin.weight.detach()), 0.9)
    solver.finalize(lin)
    assert solver.final_ranks == {"weight": k2} == solver.rank_history[-1]
    compact = solver.export(lin)
    torch.testing.assert_close(compact(x), lin(x))


class StemNet(nn.Module):
    """stem 3x3 conv, a 3x3 conv, a 1x1 conv, a strided non-square 3x5 conv with dilation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b = nn.Conv2d(12, 12, 1)
        self.c = nn.Conv2d(12, 10, (3, 5), stride=(2, 1), padding=(2, 2), dilation=(2, 1))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x)))))))


def test_trp_defaults_are_the_official_release():
    """cifar-TRP.py: energy 0.99, truncation before every iteration, the VH view, the stem and
    1x1 convs dense, nuclear weight 3e-4."""
    from admm_compress.methods.trp import VHView

    solver = methods.trp()
    assert solver.every == 1 and solver.nuclear_weight == 3e-4
    assert solver.spec[0].constraint.energy == 0.99 and isinstance(solver.spec[0].view, VHView)
    solver.prepare(StemNet())
    assert [b.name for b in solver.bindings] == ["a", "c"]
    assert solver.skipped == ["stem", "b"]
    assert all(isinstance(b.view, VHView) for b in solver.bindings)
    # the switches restore the stem and the 1x1 conv
    s2 = methods.trp(skip_stem=False, skip_1x1=False, view="channel")
    s2.prepare(StemNet())
    assert [b.name for b in s2.bindings] == ["stem", "a", "b", "c"]


def test_vh_view_is_the_release_permutation_and_exports_as_kh1_then_1kw():
    from admm_compress.methods.trp import VHView

    torch.manual_seed(0)
    v = VHView()
    w = torch.randn(10, 12, 3, 5)
    m = v.to(w)
    assert m.shape == (36, 50)
    # definition: M[(i, y), (o, x)] = W[o, i, y, x]
    i, y, o, x = 7, 2, 4, 3
    assert m[i * 3 + y, o * 5 + x] == w[o, i, y, x]
    torch.testing.assert_close(v.back(m, w.shape), w, rtol=0, atol=0)
    # a rank-4 weight in this view exports to a (3,1) conv then a (1,5) conv with equal outputs
    net = StemNet().double()
    spec = ac.Constrain("c", ac.LowRank(rank=4), view=v)
    with torch.no_grad():
        net.c.weight.copy_(v.back(ac.LowRank(rank=4).project(v.to(net.c.weight)), net.c.weight.shape))
    compact = ac.export(net, spec)
    first, second = compact.c[0], compact.c[1]
    assert first.kernel_size == (3, 1) and second.kernel_size == (1, 5)
    assert (first.in_channels, first.out_channels, second.out_channels) == (12, 4, 10)
    xin = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    torch.testing.assert_close(compact(xin), net(xin), rtol=1e-10, atol=1e-10)


def test_trp_truncates_every_iteration_on_the_vh_view_and_pins_ranks_for_finetuning():
    torch.manual_seed(0)
    net = StemNet()
    solver = methods.trp(energy=0.9)
    solver.prepare(net)
    x = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for it in range(2):
        before = {b.key: b.view.to(b.param.detach()).clone() for b in solver.bindings}
        loss = net(x).pow(2).mean() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        expect = {b.key: _energy_rank(torch.linalg.svdvals(b.view.to(b.param.detach()).double()), 0.9)
                  for b in solver.bindings}
        assert solver.step()
        assert solver.rank_history[-1] == expect
        for b in solver.bindings:  # the weight after step() is the energy truncation of the stepped weight
            truncated = b.view.to(b.param.detach())
            assert torch.linalg.matrix_rank(truncated).item() == expect[b.key]
        assert not torch.equal(before["a.weight"], b.view.to(net.a.weight.detach()))
    assert len(solver.rank_history) == 2
    ranks = dict(solver.rank_history[-1])
    for b in solver.bindings:  # the kept rank is the energy rank of the weight before truncation
        assert 1 <= ranks[b.key] < min(b.viewed_shape)
    # right after a truncation finalize keeps its ranks (the rule on its own output would cut more)
    finalized = {b.key: b.param.detach().clone() for b in solver.bindings}
    solver.finalize(net)
    assert solver.final_ranks == ranks == solver.rank_history[-1]
    for b in solver.bindings:
        torch.testing.assert_close(b.param.detach(), finalized[b.key], rtol=1e-5, atol=1e-6)
    # fine-tuning in factored form keeps the pinned rank (the energy rule is not applied again)
    from admm_compress.structure import release, structure

    structure(solver.bindings)
    for b in solver.bindings:
        assert torch.linalg.matrix_rank(b.view.to(b.param.detach())).item() == ranks[b.key]
    release(solver.bindings)
    net.eval()
    torch.testing.assert_close(solver.export(net)(x), net(x), rtol=1e-5, atol=1e-5)


def test_trp_bad_input():
    with pytest.raises(ValueError, match="energy"):
        methods.trp(energy=0.0)
    with pytest.raises(ValueError, match="nuclear_weight"):
        methods.trp(nuclear_weight=-1.0)
