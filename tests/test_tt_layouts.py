"""TT layouts ("oki", "eq9", "paired"): TTRank contract through every layout, stock-layer export of
"oki" and "paired",
prepare-time refusals and warnings, per-layer ranks/densities of methods.raspa."""
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import admm_compress as ac
from admm_compress import functional as AF
from admm_compress.layers import SparseConv2d, SumBranches
from admm_compress.methods.raspa import raspa
from admm_compress.specs import SpecError
from admm_compress.tt_layers import tt_oki_cost, tt_oki_modules
from admm_compress.views import TT_LAYOUTS, TTOKIView, TTView

SHAPES = [(8, 6, 3, 3), (12, 8, 3, 1), (6, 4, 3), (8, 6)]


def layout_view(layout, shape):
    if layout == "paired":
        return TTView.paired()
    return TTView.oki() if layout == "oki" else TTView.auto(shape, 2)


def unfolding_best_errors(x, ranks):
    """eps_k: best rank-r_k approximation error of the k-th unfolding (Eckart-Young, by SVD)."""
    out = []
    for k, r in enumerate(ranks, start=1):
        s = torch.linalg.svdvals(x.reshape(math.prod(x.shape[:k]), -1))
        out.append(float(s[r:].pow(2).sum().sqrt()))
    return out


# ----------------------------------------------------------- TTRank contract, every layout
@pytest.mark.parametrize("layout", TT_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ttrank_contract_through_every_layout(layout, shape, rank):
    torch.manual_seed(0)
    view = layout_view(layout, shape)
    w = torch.randn(shape, dtype=torch.float64)
    x = view.to(w)
    s = ac.TTRank(rank)
    eff = s.rank_for(x.shape)
    d = x.dim()
    p = view.back(s.project(x), shape)
    err = float((p - w).norm())
    eps = unfolding_best_errors(x, eff)
    # Oseledets Thm 2.2: err^2 <= sum eps_k^2; every Y in the set has ||X - Y|| >= max_k eps_k, so
    # err <= sqrt(d - 1) * max eps <= sqrt(d - 1) * (best distance to the set)
    assert err ** 2 <= sum(e * e for e in eps) * (1 + 1e-9) + 1e-20
    assert err <= math.sqrt(d - 1) * max(eps) * (1 + 1e-9) + 1e-12
    # feasible: the unfoldings of the viewed projection have rank <= the targets
    y = view.to(p)
    for k in range(1, d):
        sv = AF.unfolding_singular_values(y, k)
        assert int((sv > 1e-9 * sv[0]).sum()) <= eff[k - 1]
    # idempotent (up to rounding of a second TT-SVD)
    p2 = view.back(s.project(view.to(p)), shape)
    torch.testing.assert_close(p2, p, rtol=1e-9, atol=1e-9)
    # TTRank is a whole-tensor set (no broadcasting over leading dimensions): a stacked batch of
    # viewed tensors is one (d+1)-way tensor, projected with d internal ranks
    xs = torch.stack([view.to(torch.randn(shape, dtype=torch.float64)) for _ in range(3)])
    s1 = ac.TTRank(rank)
    torch.testing.assert_close(s1.project(xs), ac.TTRank((rank,) * d).project(xs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", TT_LAYOUTS)
def test_solver_projects_each_layer_through_its_layout(layout):
    """Equal-shape layers are projected one by one (never batched across layers), each through its view."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)).double()
    view = layout_view(layout, (8, 8, 3, 3))
    s = ac.TTRank(2)
    solver = ac.Solver(ac.Constrain(nn.Conv2d, s, view=view)).prepare(net)
    for i in range(3):
        w = net[i].weight.detach()
        torch.testing.assert_close(solver.Z[f"{i}.weight"], view.back(s.project(view.to(w)), w.shape),
                                   rtol=1e-9, atol=1e-9)


def test_oki_view_index_order_and_round_trip():
    w = torch.randn(5, 4, 3, 2)
    t = TTView.oki().to(w)
    assert t.shape == (5, 6, 4)
    for o, i, a, b in [(0, 0, 0, 0), (4, 3, 2, 1), (2, 1, 1, 0)]:
        assert t[o, a * 2 + b, i] == w[o, i, a, b]  # T[o, k, i] = W[o, i, k], k row-major
    assert torch.equal(TTView.oki().back(t, w.shape), w)
    assert TTView.oki().viewed_shape((7, 3)) == (7, 1, 3)
    assert isinstance(TTView.oki(), TTOKIView) and TTView.oki().layout == "oki"
    assert TTView.eq9((4,), (3,)).layout == "eq9" and TTView.oki() == TTView.oki()


# ----------------------------------------------------------- export to stock layers
def _tt_weight(w, ranks):
    view = TTView.oki()
    s = ac.TTRank(ranks)
    cores = s.factorize(view.to(w))
    return cores, view.back(s.reconstruct(cores, view.viewed_shape(w.shape)), w.shape)


CONVS = [
    lambda: nn.Conv2d(8, 12, 3, padding=1),
    lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(8, 12, (3, 5), padding="same", dilation=(2, 1)),
    lambda: nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(8, 12, 3, padding=2, padding_mode="circular", stride=2),
    lambda: nn.Conv2d(8, 12, 1, stride=2),
    lambda: nn.Conv2d(8, 12, 1, padding=1, stride=2, padding_mode="replicate"),
    lambda: nn.Conv1d(8, 12, 5, padding=2, padding_mode="reflect"),
    lambda: nn.Conv3d(8, 12, 3, padding=1, stride=(1, 2, 2)),
]


@pytest.mark.parametrize("make", CONVS)
def test_oki_conv_exports_to_stock_convs_with_equal_outputs(make):
    torch.manual_seed(1)
    conv = make().double()
    cores, W = _tt_weight(conv.weight.detach(), (4, 3))
    seq = tt_oki_modules(cores, conv, bias=conv.bias)
    nd = conv.weight.dim() - 2
    stock = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    assert all(type(m) is stock for m in seq)  # no custom module, so no custom counter
    x = torch.randn(2, 8, *([9, 10, 7][:nd]), dtype=torch.float64)
    ref = conv._conv_forward(x, W, conv.bias)  # the layer's own forward with the TT weight
    torch.testing.assert_close(seq(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make, hw", [(CONVS[0], (9, 10)), (CONVS[1], (9, 10)), (CONVS[5], (9, 10)),
                                      (CONVS[4], (8, 8)), (CONVS[6], (9, 10))])
def test_oki_export_macs_counted_by_ptflops_equal_the_analytic_count(make, hw):
    torch.manual_seed(2)
    conv = make()
    cores, W = _tt_weight(conv.weight.detach().double(), (4, 3))
    seq = tt_oki_modules([c.float() for c in cores], conv, bias=conv.bias)
    out = conv(torch.zeros(1, 8, *hw))
    P_out = out.shape[-1] * out.shape[-2]
    r = ac.TTRank((4, 3)).rank_for(TTView.oki().viewed_shape(conv.weight.shape))
    pad = conv.padding if not isinstance(conv.padding, str) else (0,)
    params, macs = tt_oki_cost(conv.weight.shape, r, in_positions=hw[0] * hw[1], out_positions=P_out,
                               bias=conv.bias is not None, padded=any(p != 0 for p in pad))
    c = ac.complexity(seq, (8, *hw), backend="pytorch")
    assert c.macs == macs
    assert c.params == params == sum(p.numel() for p in seq.parameters())


def test_oki_linear_exports_to_two_linears():
    torch.manual_seed(3)
    lin = nn.Linear(10, 7).double()
    cores, W = _tt_weight(lin.weight.detach(), (3, 3))
    seq = tt_oki_modules(cores, lin, bias=lin.bias)
    assert [type(m) for m in seq] == [nn.Linear, nn.Linear] and seq[0].out_features == 3
    x = torch.randn(4, 5, 10, dtype=torch.float64)
    torch.testing.assert_close(seq(x), F.linear(x, W, lin.bias), rtol=1e-10, atol=1e-10)
    assert ac.complexity(seq.float(), (10,)).macs == tt_oki_cost((7, 10), (3, 3), bias=True)[1]


def _export_equal(net, spec, x):
    """``export(net, spec)``, checked to compute what the finalized ``net`` computes (float32)."""
    with torch.no_grad():
        ref = net(x)
        ex = ac.export(net, spec)
        torch.testing.assert_close(ex(x), ref, rtol=1e-4, atol=1e-5)
    return ex


@pytest.mark.parametrize("layout", ["oki", "paired"])
def test_constrain_with_a_stock_layout_exports_its_layers(layout):
    from admm_compress.layers.tt import TTPairedConv

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 12, 3, padding=1),
                        nn.Flatten(), nn.Linear(12 * 25, 10))
    view = layout_view(layout, None)
    spec = [ac.Constrain("2", ac.TTRank((3, 3)), view=view), ac.Constrain("4", ac.TTRank((4, 4)), view=view)]
    ac.Solver(spec, mode="projection").prepare(net).finalize(net)
    ex = _export_equal(net, spec, torch.randn(2, 3, 5, 5))
    if layout == "oki":
        assert [type(m) for m in ex[2]] == [nn.Conv2d] * 3 and [type(m) for m in ex[4]] == [nn.Linear] * 2
    else:  # (12, 24) splits as ((6, 2), (3, 8)); the Linear (10, 300) likewise not as (O, 1), (1, I)
        assert isinstance(ex[2], TTPairedConv) and isinstance(ex[4], TTPairedConv)
        assert (ex[2].i1, ex[2].o2) == (3, 2)
    assert ac.complexity(ex, (3, 5, 5)).params < ac.complexity(net, (3, 5, 5)).params


def test_raspa_l_plus_s_exports_chain_plus_sparse_and_counts_macs():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                        nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    solver = raspa(tt_ranks=(6, 4), density=0.05, exclude="0").prepare(net)
    solver.finalize(net)
    ex = _export_equal(net, solver, torch.randn(2, 3, 8, 8))
    for name, cin, side, (hin, hout) in (("2", 16, 8, (64, 16)), ("4", 32, 4, (16, 16))):
        m = ex.get_submodule(name)
        assert isinstance(m, SumBranches) and isinstance(m.b, SparseConv2d)
        w = net.get_submodule(name).weight
        r = ac.TTRank((6, 4)).rank_for(TTView.oki().viewed_shape(w.shape))
        l_macs = tt_oki_cost(w.shape, r, in_positions=hin, out_positions=hout)[1]
        assert m.b.nnz <= round(0.05 * w.numel())
        s_macs = m.b.nnz * hout + m.b.out_channels * hout  # sparse counter: nnz per position + bias
        c = ac.complexity(m, (cin, side, side))
        # ptflops' stock conv counters on the L chain; the branch sum "+" is unattributed
        assert c.macs - c.unattributed_macs == l_macs + s_macs


def test_raspa_paired_layout_exports_l_plus_s_and_describes_it(caplog):
    from admm_compress.layers.tt import TTPairedConv, tt_layer_macs_per_position, tt_paired_cost
    from admm_compress.views import paired_split

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 12, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(12, 24, 3, padding=1, stride=2))
    solver = raspa(tt_ranks=(6, 4), density=0.05, exclude="0", layout="paired", decompose_iters=1)
    solver.prepare(net)
    solver.finalize(net)
    ex = _export_equal(net, solver, torch.randn(2, 3, 8, 8))
    assert isinstance(ex[2], SumBranches) and isinstance(ex[2].a, TTPairedConv)
    rows = {r["layer"]: r for r in solver.layer_costs()}
    assert rows["2"]["layout"] == "paired"
    r = ac.TTRank((6, 4)).rank_for(TTView.paired().viewed_shape((12, 24, 3, 3)))
    assert rows["2"]["tt_params"] == tt_paired_cost((12, 24, 3, 3), paired_split(12, 24), r)[0]
    l_bias = 0 if ex[2].a.bias is None else 12  # SumBranches keeps the bias in one branch
    assert rows["2"]["tt_params"] == sum(p.numel() for p in ex[2].a.parameters()) - l_bias
    macs, dense = tt_layer_macs_per_position(net[2], ac.TTRank((6, 4)), TTView.paired(), (12, 24, 3, 3))
    assert rows["2"]["macs_pos"] == macs + rows["2"]["s_kept"] and dense == 12 * 24 * 9
    assert "paired" in solver.describe()


# ----------------------------------------------------------- prepare-time refusals / warnings
def test_prepare_refuses_what_tt_export_cannot_build():
    emb = nn.Sequential(nn.Embedding(12, 8))
    with pytest.raises(SpecError, match=r"layer '0'.*oki.*Embedding.*nn.Linear and nn.Conv1d/2d/3d.*exclude"):
        ac.Solver(ac.Constrain("0", ac.TTRank(2), view=TTView.oki())).prepare(emb)
    c1 = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(SpecError, match=r"layer '0'.*eq9.*Conv1d.*TTView.oki\(\)"):
        ac.Solver(ac.Constrain("0", ac.TTRank(2), view=TTView((2, 2), (2, 2)))).prepare(c1)
    refl = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(SpecError, match=r"layer '0'.*padding_mode='reflect'.*oki"):
        raspa(tt_ranks=2, layout="eq9").prepare(refl)
    raspa(tt_ranks=2).prepare(refl)  # the oki layout keeps the padding mode
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(SpecError, match=r"layer '0'.*groups=2"):
        raspa(tt_ranks=2).prepare(grouped)


def test_prepare_warns_with_numbers_when_tt_costs_more_macs_than_dense(caplog):
    net = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3))
    solver = raspa(tt_ranks={"0": (16, 16), "1": (4, 4)}, density=0.1)
    with caplog.at_level(logging.WARNING, logger="admm_compress.methods.raspa"):
        solver.prepare(net)
    # layer 0: L = 16*16 + 16*9*16 + 16*16 = 2816, S = round(0.1 * 2304) = 230: 3046 > 2304
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "layer '0'" in msgs[0] and "3046" in msgs[0] and "2304" in msgs[0]


@pytest.mark.parametrize("layout", TT_LAYOUTS)
def test_plain_ttrank_spec_warns_at_prepare_when_tt_costs_more_macs_than_dense(layout, caplog):
    from admm_compress.tt_layers import tt_layer_macs_per_position

    net = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.Linear(16, 16))
    view = layout_view(layout, None) if layout != "eq9" else TTView((4, 4), (4, 4))
    big = (16, 16) if layout != "eq9" else 8   # oki: 16*16 + 16*9*16 + 16*16 = 2816 > 2304 per position
    spec = [ac.Constrain("0", ac.TTRank(big), view=view), ac.Constrain("1", ac.TTRank(2), view=view),
            ac.Constrain("2", ac.TTRank(2), view=view)]
    # the counts the message must carry, computed independently of the warning
    tt_big, dense = tt_layer_macs_per_position(net[0], ac.TTRank(big), view, (16, 16, 3, 3))
    assert dense == 16 * 16 * 9 and tt_big > dense
    if layout != "eq9":  # a square layer's paired split is ((16, 1), (1, 16)): the oki tensor
        assert tt_big == 16 * 16 + 16 * 9 * 16 + 16 * 16
    for name in ("1", "2"):
        m = net.get_submodule(name)
        assert tt_layer_macs_per_position(m, ac.TTRank(2), view, tuple(m.weight.shape))[0] <= m.weight.numel()
    solver = ac.Solver(spec)
    with caplog.at_level(logging.WARNING):
        solver.prepare(net)  # before any training step
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1, msgs
    m = msgs[0]
    assert "layer '0'" in m and f"{tt_big} MACs" in m and f"{dense}" in m
    assert "smaller TT ranks" in m and "tt_ranks_for_budget" in m
    assert ("TTView.oki()" in m) == (layout != "oki")


# ----------------------------------------------------------- per-layer ranks and densities
def test_per_layer_ranks_and_densities_by_glob():
    net = ac.models.resnet20()
    solver = raspa(tt_ranks={"layer3.0.conv1": (20, 15), "layer1.*": (10, 10), "*": 5},
                   density={"layer2.*": 0.2, "*": 0.1}, exclude="conv1")
    solver.prepare(net)
    got = {b.name: b.constraint for b in solver.bindings}
    assert len(got) == 18
    assert got["layer3.0.conv1"].sets[0].ranks == (20, 15)
    assert got["layer1.2.conv2"].sets[0].ranks == (10, 10)
    assert got["layer3.0.conv2"].sets[0].ranks == 5
    assert got["layer2.1.conv1"].sets[1].density == 0.2 and got["layer3.1.conv1"].sets[1].density == 0.1
    rows = {r["layer"]: r for r in solver.layer_costs()}
    r = rows["layer3.0.conv1"]  # (64, 32, 3, 3)
    assert r["ranks"] == (20, 15) and r["tt_params"] == 64 * 20 + 20 * 9 * 15 + 15 * 32
    assert r["s_kept"] == round(0.1 * 64 * 32 * 9)
    text = solver.describe()
    assert "layer3.0.conv1" in text and "(20, 15)" in text and str(r["params"]) in text
    x = torch.randn(1, 3, 32, 32)
    solver.finalize(net)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(ac.export(net, solver)(x), net(x), rtol=1e-4, atol=1e-4)


def test_per_layer_bad_input():
    net = ac.models.resnet20()
    with pytest.raises(SpecError, match=r"layer 'layer2.0.conv1' matches no glob of tt_ranks"):
        raspa(tt_ranks={"layer1.*": 4}, exclude="conv1").prepare(net)
    assert not any(hasattr(m, "parametrizations") for m in net.modules())
    with pytest.raises(ValueError, match=r"density\['x'\]"):
        raspa(density={"x": 1.5})
    with pytest.raises(ValueError, match=r"tt_ranks\['x'\]"):
        raspa(tt_ranks={"x": (0, 2)})
    with pytest.raises(ValueError, match=r"tt_ranks=\{\} is empty"):
        raspa(tt_ranks={})
    with pytest.raises(TypeError, match="glob strings"):
        raspa(tt_ranks={3: 4})


# ----------------------------------------------------------- ranks from a budget
def _budget_net():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():  # decaying spectra, so layers differ in how much rank they need
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.logspace(0, -2, m.weight.shape[0]).reshape(-1, 1, 1, 1))
    return net


@pytest.mark.parametrize("metric, red, density", [("params", 0.5, 0.0), ("params", 0.7, 0.05),
                                                 ("macs", 0.5, 0.0), ("macs", 0.6, 0.02)])
def test_tt_ranks_for_budget_meets_the_budget_on_the_exported_model(metric, red, density):
    from admm_compress.methods.raspa import tt_ranks_for_budget

    net = _budget_net()
    ranks = tt_ranks_for_budget(net, red, metric, exclude="0", density=density, input_size=(3, 8, 8))
    assert sorted(ranks) == ["2", "4", "6"]
    dense = ac.complexity(net, (3, 8, 8))
    if density > 0:
        solver = raspa(tt_ranks=ranks, density=density, exclude="0")
    else:
        solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.oki()) for n, r in ranks.items()])
    solver.prepare(net)
    solver.finalize(net)
    ex = ac.export(net, solver)
    got = ac.complexity(ex, (3, 8, 8))
    # counted by ptflops on the exported model (the L + S sum's "+" is no MAC of a layer)
    used = got.params if metric == "params" else got.macs - got.unattributed_macs
    assert used <= (1 - red) * (dense.params if metric == "params" else dense.macs)
    # a looser budget never gets smaller ranks (one global threshold)
    looser = tt_ranks_for_budget(net, red / 2, metric, exclude="0", density=density, input_size=(3, 8, 8))
    assert all(looser[n][0] >= ranks[n][0] and looser[n][1] >= ranks[n][1] for n in ranks)
    assert looser != ranks


@pytest.mark.parametrize("density", [0.0, 0.05])
def test_tt_ranks_for_budget_paired_layout_meets_a_parameter_budget(density):
    """Narrow layers (DenseNet-like 12-output convs), where the paired split is not ((O, 1), (1, I)):
    the ranks are for the paired tensor and its cost, and the exported paired model meets the budget."""
    from admm_compress.layers.tt import TTPairedConv
    from admm_compress.methods.raspa import tt_ranks_for_budget

    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 12, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(12, 36, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(36, 12, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    dense = ac.complexity(net, (3, 8, 8))
    ranks = tt_ranks_for_budget(net, 0.4, "params", exclude="0", density=density, layout="paired")
    assert sorted(ranks) == ["2", "4", "6"]
    # paired ranks may exceed O = 12 (the oki tensor caps r1 at O); the first layer's paired modes are (18, 16)
    assert TTView.paired().viewed_shape((12, 24, 3, 3)) == (18, 9, 16)
    if density > 0:
        solver = raspa(tt_ranks=ranks, density=density, exclude="0", layout="paired")
    else:
        solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.paired()) for n, r in ranks.items()])
    solver.prepare(net)
    solver.finalize(net)
    ex = _export_equal(net, solver, torch.randn(2, 3, 8, 8))
    assert any(isinstance(m, TTPairedConv) for m in ex.modules())
    assert ac.complexity(ex, (3, 8, 8)).params <= 0.6 * dense.params
    with pytest.raises(ValueError, match="layout"):
        tt_ranks_for_budget(net, 0.4, layout="eq9")


def test_tt_ranks_for_budget_bad_input():
    from admm_compress.methods.raspa import tt_ranks_for_budget

    net = _budget_net()
    with pytest.raises(ValueError, match=r"reduction=0.999 .*out of reach.*remove only"):
        tt_ranks_for_budget(net, 0.999, exclude="0")
    with pytest.raises(ValueError, match="reduction"):
        tt_ranks_for_budget(net, 1.5)
    with pytest.raises(ValueError, match="metric"):
        tt_ranks_for_budget(net, 0.5, "flops")
    with pytest.raises(ValueError, match="input_size"):
        tt_ranks_for_budget(net, 0.5, "macs")


def test_tt_ranks_for_budget_on_linear_layers():
    from admm_compress.methods.raspa import tt_ranks_for_budget

    torch.manual_seed(8)
    net = ac.models.fcn(depth=3, width=96)
    dense = ac.complexity(net, (64,))
    ranks = tt_ranks_for_budget(net, 0.6, "macs", targets=nn.Linear, density=0.05, input_size=(64,))
    solver = raspa(tt_ranks=ranks, density=0.05, targets=nn.Linear).prepare(net)
    assert solver.layer_costs()[0]["layout"] == "oki"
    solver.finalize(net)
    got = ac.complexity(ac.export(net, solver), (64,))
    assert got.macs - got.unattributed_macs <= 0.4 * dense.macs
