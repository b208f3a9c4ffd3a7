"""Views: exact round trips, RASPA Eq. 9 index order, shape checks and module checks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from admm_compress.sets import TTRank
from admm_compress.views import (TT_LAYOUTS, VIEWS, ChannelView, IdentityView, MatrixView, SpatialView, TTView,
                                 View, balanced_factors, check_module, get_view)

SHAPES = [(6, 4), (6, 4, 3), (6, 4, 3, 3), (6, 4, 3, 2), (6, 4, 2, 3, 2)]


def _views_for(shape):
    out = [VIEWS["matrix"], VIEWS["channel"], VIEWS["identity"],
           TTView.auto(shape, 2), TTView((6,), (4,)), TTView((3, 2), (2, 2)), TTView.oki(),
           TTView.paired(), TTView.paired(((3, 2), (2, 2)))]
    if len(shape) == 4:
        out.append(VIEWS["spatial"])
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_view(shape):
    w = torch.randn(shape)
    w0 = w.clone()
    for v in _views_for(shape):
        v.check(shape)
        t = v.to(w)
        assert tuple(t.shape) == v.viewed_shape(shape), v
        assert t.numel() == w.numel()
        back = v.back(t, shape)
        assert back.shape == w.shape and torch.equal(back, w), v
        # the map is a permutation of entries: norms and multisets of values agree
        assert torch.equal(t.reshape(-1).sort().values, w.reshape(-1).sort().values)
        # back is also a left inverse on arbitrary viewed tensors
        u = torch.randn(v.viewed_shape(shape))
        assert torch.equal(v.to(v.back(u, shape)), u)
    assert torch.equal(w, w0)


def _tt_views_for(shape):
    return [v for v in _views_for(shape) if v.name == "tt"]


def test_tt_views_cover_every_layout():
    for shape in SHAPES:
        assert {getattr(v, "layout", "eq9") for v in _tt_views_for(shape)} == set(TT_LAYOUTS)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 2])
def test_ttrank_contract_through_every_tt_view(shape, rank):
    """TTRank seen through every TT view (every layout): Oseledets' quasi-optimality bound
    ``||W - P(W)||^2 <= sum_k eps_k^2`` (``eps_k``: best rank-``r_k`` error of unfolding ``k``,
    Eckart-Young) and idempotence ``P(P(W)) = P(W)`` up to the rounding of a second TT-SVD."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    s = TTRank(rank)
    for v in _tt_views_for(shape):
        x = v.to(w)
        if x.dim() < 2:
            continue
        eff = s.rank_for(x.shape)
        p = v.back(s.project(x), shape)
        eps2 = 0.0
        for k, r in enumerate(eff, start=1):
            sv = torch.linalg.svdvals(x.reshape(math.prod(x.shape[:k]), -1))
            eps2 += float(sv[r:].pow(2).sum())
        assert float((p - w).norm()) ** 2 <= eps2 * (1 + 1e-9) + 1e-20, v
        torch.testing.assert_close(v.back(s.project(v.to(p)), shape), p, rtol=1e-9, atol=1e-9, msg=repr(v))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(o=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       data=st.data())
def test_tt_view_round_trip_property(o, data):
    i = data.draw(st.lists(st.integers(1, 4), min_size=len(o), max_size=len(o)))
    k = data.draw(st.sampled_from([(), (1, 1), (3,), (2, 3)]))
    shape = (math.prod(o), math.prod(i), *k)
    v = TTView(o, i)
    w = torch.randn(shape, dtype=torch.float64)
    t = v.to(w)
    K = math.prod(k)
    assert t.shape == ((K,) if K > 1 else ()) + tuple(a * b for a, b in zip(o, i))
    assert torch.equal(v.back(t, shape), w)


def test_tt_view_index_order_eq9():
    """T[(k1, k2), (o1, i1), (o2, i2)] = W[o, i, k1, k2], o = o1*O2 + o2, i = i1*I2 + i2."""
    O = (2, 3)
    I = (4, 2)
    w = torch.randn(6, 8, 3, 2)
    t = TTView(O, I).to(w)
    assert t.shape == (6, 2 * 4, 3 * 2)
    for o1, o2, i1, i2, k1, k2 in itertools.product(range(2), range(3), range(4), range(2), range(3), range(2)):
        o = o1 * O[1] + o2
        i = i1 * I[1] + i2
        assert t[k1 * 2 + k2, o1 * I[0] + i1, o2 * I[1] + i2] == w[o, i, k1, k2]


def test_tt_view_shapes_like_raspa_table8():
    v = TTView((4, 4), (4, 4))
    assert v.viewed_shape((16, 16, 3, 3)) == (9, 16, 16)
    assert v.viewed_shape((16, 16, 1, 1)) == (16, 16)      # 1x1 conv: no kernel mode
    assert v.viewed_shape((16, 16)) == (16, 16)            # linear
    assert TTView.auto((64, 32, 3, 3), 3).viewed_shape((64, 32, 3, 3)) == (9, 4 * 4, 4 * 4, 4 * 2)


def test_spatial_view_layout():
    """(O, I, kh, kw) -> rows (o, h), columns (i, w)."""
    w = torch.randn(3, 2, 4, 5)
    m = VIEWS["spatial"].to(w)
    assert m.shape == (12, 10)
    for o, i, h, x in itertools.product(range(3), range(2), range(4), range(5)):
        assert m[o * 4 + h, i * 5 + x] == w[o, i, h, x]


def test_channel_and_matrix_views():
    w = torch.randn(5, 3, 2, 2)
    assert torch.equal(VIEWS["channel"].to(w), w.reshape(5, 12))
    assert torch.equal(VIEWS["matrix"].to(w), w.reshape(5, 12))
    assert VIEWS["channel"].viewed_shape((8, 4, 3)) == (8, 12)          # Conv1d
    assert VIEWS["channel"].viewed_shape((8, 4, 3, 3, 3)) == (8, 108)   # Conv3d
    lin = torch.randn(7, 9)
    assert VIEWS["matrix"].to(lin) is not None and torch.equal(VIEWS["matrix"].to(lin), lin)


def test_balanced_factors():
    assert balanced_factors(64, 2) == (8, 8)
    assert balanced_factors(48, 2) == (8, 6)
    assert balanced_factors(12, 3) == (3, 2, 2)
    assert balanced_factors(512, 3) == (8, 8, 8)
    assert balanced_factors(7, 1) == (7,)
    assert balanced_factors(17, 2) == (17, 1)
    for n, d in [(360, 3), (96, 2), (1000, 3), (30, 2)]:
        f = balanced_factors(n, d)
        assert math.prod(f) == n and len(f) == d and list(f) == sorted(f, reverse=True)
        # brute force: no ordered split has a smaller largest factor
        divs = [a for a in range(1, n + 1) if n % a == 0]
        best = min(max(c) for c in itertools.product(divs, repeat=d) if math.prod(c) == n)
        assert max(f) == best
    with pytest.raises(ValueError, match=r"n=17 cannot be split into d=2 factors > 1"):
        balanced_factors(17, 2, strict=True)
    with pytest.raises(ValueError, match="d=0 is out of range"):
        balanced_factors(8, 0)
    with pytest.raises(TypeError, match="n must be an integer"):
        balanced_factors(8.0, 2)


def test_get_view():
    assert get_view("auto", (4, 3)) is VIEWS["matrix"]
    assert get_view("auto", (4, 3, 3, 3)) is VIEWS["channel"]
    assert get_view("auto", (4, 3, 3)) is VIEWS["channel"]
    assert isinstance(get_view("spatial"), SpatialView)
    v = TTView((2, 2), (3, 1))
    assert get_view(v, (4, 3, 3, 3)) is v
    with pytest.raises(ValueError, match="view='diag' is not a known view"):
        get_view("diag")
    with pytest.raises(ValueError, match="needs the weight shape"):
        get_view("auto")
    with pytest.raises(TypeError, match="view must be a name or a View"):
        get_view(3)


@pytest.mark.parametrize("view, shape, match", [
    ("matrix", (5,), "at least 2 dimensions, got shape \\(5,\\)"),
    ("channel", (5,), "at least 2 dimensions"),
    ("spatial", (4, 3, 3), "needs a Conv2d weight \\(O, I, kh, kw\\), got shape \\(4, 3, 3\\)"),
    ("spatial", (4, 3), "needs a Conv2d weight"),
    (lambda: TTView((2, 2), (3,)), (4, 3), "must have the same length"),
])
def test_bad_shapes(view, shape, match):
    with pytest.raises((ValueError, TypeError), match=match):
        v = get_view(view) if isinstance(view, str) else view()
        v.check(shape, where="layer 'x'")


def test_tt_view_bad_shapes_and_args():
    v = TTView((4, 4), (2, 8))
    with pytest.raises(ValueError, match=r"layer 'c1': TTView: out_factors=\(4, 4\) multiply to 16 but the weight has O=12"):
        v.check((12, 16, 3, 3), where="layer 'c1'")
    with pytest.raises(ValueError, match=r"in_factors=\(2, 8\) multiply to 16 but the weight has I=15"):
        v.to(torch.randn(16, 15))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        v.check((16,))
    with pytest.raises(ValueError, match=r"out_factors\[1\]=0"):
        TTView((4, 0), (2, 2))
    with pytest.raises(TypeError, match="out_factors must be a non-empty tuple"):
        TTView(4, (2, 2))


def test_check_module():
    where = "spec on layer 'features.3'"
    g = nn.Conv2d(8, 8, 3, groups=2)
    for name in ("channel", "spatial", "matrix"):
        with pytest.raises(ValueError, match=r"features.3'.*groups=2.*view '" + name):
            check_module(get_view(name), g, where)
    with pytest.raises(ValueError, match="groups=2"):
        check_module(TTView((2, 4), (2, 2)), g, where)
    check_module(get_view("identity"), g, where)       # Cardinality on a grouped conv is fine
    check_module(get_view("channel"), nn.Conv1d(4, 6, 3), where)
    check_module(get_view("channel"), nn.Conv3d(4, 6, 3), where)
    check_module(get_view("spatial"), nn.Conv2d(4, 6, 3), where)
    check_module(get_view("matrix"), nn.Linear(4, 6), where)
    with pytest.raises(ValueError, match="view 'spatial' needs an nn.Conv2d, got Conv1d"):
        check_module(get_view("spatial"), nn.Conv1d(4, 6, 3), where)
    with pytest.raises(ValueError, match="view 'spatial' needs an nn.Conv2d, got Linear"):
        check_module(get_view("spatial"), nn.Linear(4, 6), where)
    with pytest.raises(ValueError, match="transposed convolution"):
        check_module(get_view("channel"), nn.ConvTranspose2d(4, 6, 3), where)
    with pytest.raises(TypeError, match="view must be a View"):
        check_module("channel", nn.Linear(2, 2), where)


def test_view_base_and_registry():
    assert set(VIEWS) == {"matrix", "channel", "spatial", "identity", "input_channel"}
    for name, v in VIEWS.items():
        assert isinstance(v, View) and v.name == name
    assert isinstance(VIEWS["channel"], ChannelView) and isinstance(VIEWS["matrix"], MatrixView)
    assert isinstance(VIEWS["identity"], IdentityView)
    assert "out_factors=(2, 2)" in repr(TTView((2, 2), (1, 3)))
