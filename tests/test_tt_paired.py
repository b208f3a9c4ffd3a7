"""The "paired" TT layout (o1 i1, kh*kw, o2 i2): the split rule against brute force, the view's index
map, the exported TTPairedConv (equal outputs, MACs counted from its stock layers, script/export),
and its use through Constrain and methods.raspa.  The TTRank contract through this layout is in
test_tt_layouts.py (parametrized over TT_LAYOUTS)."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import admm_compress as ac
from admm_compress.layers.tt import TTPairedConv, tt_paired_cost
from admm_compress.methods.raspa import raspa
from admm_compress.methods.raspa_tables import paired_modes
from admm_compress.views import TT_LAYOUTS, TTPairedView, TTView, paired_split


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------- the split rule
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(1, 480))
def test_paired_split_is_the_most_balanced_then_cheapest_split(O, I):
    (o1, o2), (i1, i2) = paired_split(O, I)
    assert o1 * o2 == O and i1 * i2 == I
    splits = [((a, O // a), (b, I // b)) for a in _divisors(O) for b in _divisors(I)]
    gap = min(abs(a * b - (O // a) * (I // b)) for (a, _), (b, _) in splits)
    assert abs(o1 * i1 - o2 * i2) == gap                       # most balanced modes
    top = max(a * b for (a, _), (b, _) in splits if abs(a * b - (O // a) * (I // b)) == gap)
    assert o1 * i1 == top                                      # the larger mode first on a tie
    same = [(a, oo, b, ii) for (a, oo), (b, ii) in splits if a * b == top and oo * ii == O * I // top]
    assert i1 * o2 == min(b * oo for a, oo, b, ii in same)     # fewest repetitions of each step
    assert paired_modes(O, I) == (o1 * i1, o2 * i2)


def test_paired_split_examples():
    assert paired_split(16, 16) == ((16, 1), (1, 16))       # square: the oki tensor (O, K, I)
    assert paired_split(32, 16) == ((32, 1), (1, 16))
    assert paired_split(12, 24) == ((6, 2), (3, 8))         # DenseNet-40 b1l0: modes (18, 16)
    with pytest.raises(ValueError, match="O=0"):
        paired_split(0, 4)


# ----------------------------------------------------------- the view
def test_paired_view_index_map_and_round_trip():
    w = torch.randn(6, 10, 2, 3)
    v = TTView.paired()
    (o1, o2), (i1, i2) = v.split_for(w.shape)
    assert ((o1, o2), (i1, i2)) == paired_split(6, 10)
    t = v.to(w)
    assert t.shape == (o1 * i1, 6, o2 * i2) == v.viewed_shape(w.shape)
    for o in range(6):
        for i in range(10):
            for k in range(6):
                a, b = divmod(o, o2)   # o = a * o2 + b, row-major
                c, d = divmod(i, i2)
                assert t[a * i1 + c, k, b * i2 + d] == w[o, i, k // 3, k % 3]
    assert torch.equal(v.back(t, w.shape), w)
    assert isinstance(v, TTPairedView) and v.layout == "paired" and v == TTView.paired()
    assert "paired" in TT_LAYOUTS


def test_paired_view_with_a_fixed_split_checks_the_shape():
    v = TTView.paired(((3, 4), (2, 12)))
    assert v.viewed_shape((12, 24, 3, 3)) == (6, 9, 48)
    with pytest.raises(ValueError, match=r"split=.*O = 12.*shape \(8, 24, 3, 3\)"):
        v.check((8, 24, 3, 3))
    with pytest.raises(TypeError, match="split must be"):
        TTView.paired((12, 24))


# ----------------------------------------------------------- the exported layer
LAYERS = [
    lambda: nn.Conv2d(24, 12, 3, padding=1),
    lambda: nn.Conv2d(24, 12, 3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(24, 12, (3, 5), padding="same", dilation=(2, 1)),
    lambda: nn.Conv2d(24, 12, 3, padding=2, padding_mode="circular", stride=2),
    lambda: nn.Conv2d(24, 12, 1, stride=2),
    lambda: nn.Conv1d(24, 12, 5, padding=2, padding_mode="reflect"),
    lambda: nn.Conv3d(24, 12, 3, padding=1, stride=(1, 2, 2)),
    lambda: nn.Linear(24, 12),
]


def _tt(w, ranks, view=None):
    view = view or TTView.paired()
    s = ac.TTRank(ranks)
    cores = s.factorize(view.to(w))
    return cores, view.back(s.reconstruct(cores, view.viewed_shape(w.shape)), w.shape)


def _input(layer, dtype=torch.float64):
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 5, layer.in_features, dtype=dtype)
    nd = layer.weight.dim() - 2
    return torch.randn(2, layer.in_channels, *([9, 10, 7][:nd]), dtype=dtype)


@pytest.mark.parametrize("make", LAYERS)
def test_paired_layer_computes_the_layer_with_the_tt_weight(make):
    torch.manual_seed(0)
    layer = make().double()
    cores, W = _tt(layer.weight.detach(), (5, 4))
    m = TTPairedConv(cores, paired_split(12, 24), layer, bias=layer.bias)
    assert {type(c) for c in m.children()} == {type(layer) if isinstance(layer, nn.Linear) else
                                               {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer.weight.dim() - 2]}
    x = _input(layer)
    ref = F.linear(x, W, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(x, W, layer.bias)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", LAYERS)
def test_paired_layer_macs_are_its_stock_layers_macs(make):
    """complexity() (registered counter, tt_paired_cost) equals the stock count of the three child
    layers at the shapes they see (kernel taps x in-channels per output element) plus the bias adds."""
    torch.manual_seed(1)
    layer = make()
    cores, _ = _tt(layer.weight.detach().double(), (5, 4))
    m = TTPairedConv([c.float() for c in cores], paired_split(12, 24), layer, bias=layer.bias)
    x = _input(layer, torch.float32)
    x = x[0, :1] if isinstance(layer, nn.Linear) else x[:1]  # one sample (complexity's batch of 1)
    seen = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            seen.append(out.numel() * mod.in_features)
        else:
            seen.append(out.numel() * mod.in_channels * mod.weight[0, 0].numel())

    hs = [c.register_forward_hook(hook) for c in m.children()]
    with torch.no_grad():
        y = m(x)
    for h in hs:
        h.remove()
    stock = sum(seen) + (y.numel() if layer.bias is not None else 0)
    c = ac.complexity(m, tuple(x.shape[1:]), backend="pytorch")
    assert c.macs == stock
    assert c.params == sum(p.numel() for p in m.parameters())
    if not isinstance(layer, nn.Linear):
        shape = tuple(layer.weight.shape)
        p_in, p_out = math.prod(x.shape[2:]), math.prod(y.shape[2:])
        r = ac.TTRank((5, 4)).rank_for(TTView.paired().viewed_shape(shape))
        assert tt_paired_cost(shape, paired_split(12, 24), r, p_in, p_out, layer.bias is not None) == (c.params, c.macs)


def test_paired_layer_scripts_and_exports():
    torch.manual_seed(2)
    for layer in (nn.Conv2d(24, 12, 3, padding=1, stride=2), nn.Linear(24, 12)):
        cores, _ = _tt(layer.weight.detach(), (5, 4))
        m = TTPairedConv(cores, paired_split(12, 24), layer, bias=layer.bias).eval()
        x = _input(layer, torch.float32)
        with torch.no_grad():
            ref = m(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.testing.assert_close(torch.jit.script(m)(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.export.export(m, (x,)).module()(x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- raspa's arguments (export through Constrain and
# raspa: test_tt_layouts.py)
def test_raspa_paired_layout_refuses_eq9_arguments():
    with pytest.raises(ValueError, match=r"layout='paired' tensorizes \(o1 i1, kh\*kw, o2 i2\)"):
        raspa(tt_ranks=(4, 4), layout="paired", d=2)
    with pytest.raises(ValueError, match="3 entries but layout='paired'"):
        raspa(tt_ranks=(4, 4, 4), layout="paired")
    with pytest.raises(ValueError, match="layout"):
        raspa(tt_ranks=(4, 4), layout="pairs")
