"""Every constraint set through the same property checks (geoopt style), then set-specific
optimality checks against brute force / closed forms, then bad input.

The ``case`` fixture is the single list of set instances; each property test runs on all of
them in float32 and float64.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_compress import functional as F
from admm_compress.sets import (Cardinality, ConstraintSet, LowRank, SchattenP, Sum, TTRank,
                                sequential_ls, sequential_sl)

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


# ------------------------------------------------------------------------- cases
def matrix_shapes(lo=2, hi=7, max_batch=2):
    return st.tuples(st.lists(st.integers(1, 3), max_size=max_batch),
                     st.integers(lo, hi), st.integers(lo, hi)).map(lambda t: (*t[0], t[1], t[2]))


def tensor_shapes(min_numel, max_dims=3, hi=5):
    return st.lists(st.integers(1, hi), min_size=1, max_size=max_dims).map(tuple).filter(
        lambda s: math.prod(s) >= min_numel)


@dataclasses.dataclass
class Case:
    id: str
    make: Callable[[], ConstraintSet]
    shapes: st.SearchStrategy
    matrix: bool = False        # broadcasts over leading dims
    fixed_point: bool = True    # contains(project(x)) and idempotence hold
    pair: bool = False          # Sum: pair form is the exact operator
    bad_shape: tuple = ()
    bad_match: str = ""

    def __repr__(self):
        return self.id


CASES = [
    Case("LowRank(rank)", lambda: LowRank(rank=2), matrix_shapes(), matrix=True,
         bad_shape=(5,), bad_match="at least 2 dimensions"),
    Case("LowRank(ratio)", lambda: LowRank(ratio=0.5), matrix_shapes(), matrix=True,
         bad_shape=(5,), bad_match="at least 2 dimensions"),
    Case("LowRank(energy)", lambda: LowRank(energy=0.8), matrix_shapes(), matrix=True,
         fixed_point=False, bad_shape=(0, 3), bad_match="non-empty"),
    Case("LowRank(energy_transfer)", lambda: LowRank(rank=2, energy_transfer=True),
         matrix_shapes(), matrix=True, bad_shape=(4,), bad_match="at least 2 dimensions"),
    Case("Cardinality(k)", lambda: Cardinality(k=5), tensor_shapes(5),
         bad_shape=(2, 2), bad_match=r"k=5 is larger than the 4 entries"),
    Case("Cardinality(density)", lambda: Cardinality(density=0.3), tensor_shapes(1),
         bad_shape=(0, 2), bad_match="non-empty"),
    Case("Cardinality(group_dim=0)", lambda: Cardinality(k=2, group_dim=0),
         tensor_shapes(2, max_dims=3).filter(lambda s: s[0] >= 2),
         bad_shape=(1, 4), bad_match=r"k=2 is larger than the 1 slices along dim 0"),
    Case("TTRank", lambda: TTRank(ranks=(2, 3)),
         st.tuples(st.integers(2, 5), st.integers(2, 5), st.integers(2, 5)),
         bad_shape=(2, 3, 4, 5), bad_match=r"ranks=\(2, 3\) has length 2 but a 4-way tensor needs 3"),
    Case("Sum(LowRank, Cardinality)", lambda: Sum(LowRank(rank=1), Cardinality(k=3)),
         st.tuples(st.integers(3, 6), st.integers(3, 6)), pair=True, fixed_point=False,
         bad_shape=(7,), bad_match="at least 2 dimensions"),
    Case("Sum(TTRank, Cardinality)", lambda: Sum(TTRank(ranks=(2, 2)), Cardinality(k=4)),
         st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(2, 4)),
         pair=True, fixed_point=False, bad_shape=(3, 4), bad_match="has length 2 but a 2-way"),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES], scope="module")
def case(request):
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"], scope="module")
def dtype(request):
    return request.param


def draw_x(data, shape, dtype, kinds=("gauss", "int", "scaled")):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    g = torch.Generator().manual_seed(seed)
    if kind == "int":  # many ties and zeros
        return torch.randint(-2, 3, shape, generator=g).to(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "scaled":
        x = x * 10.0 ** data.draw(st.integers(-3, 3), label="log10 scale")
    return x.to(dtype)


def rtol_of(dtype):
    return 2e-4 if dtype == torch.float32 else 1e-9


def assert_close(a, b, dtype, ref=None):
    ref = ref if ref is not None else b
    scale = float(ref.detach().abs().max()) if ref.numel() else 1.0
    r = rtol_of(dtype)
    torch.testing.assert_close(a, b, rtol=r, atol=r * max(scale, 1e-30))


def ctol(dtype):
    r = rtol_of(dtype)
    return dict(atol=0.0, rtol=10 * r)


def random_pair(s, data, shape, dtype):
    """A pair (L, S) of unconstrained tensors for the Sum pair form."""
    return draw_x(data, shape, dtype), draw_x(data, shape, dtype)


# --------------------------------------------------------------- contract checks
@SETTINGS
@given(data=st.data())
def test_output_shape_dtype_device_and_input_untouched(case, dtype, data):
    s = case.make()
    shape = data.draw(case.shapes, label="shape")
    x = draw_x(data, shape, dtype)
    x0 = x.clone()
    y = s.project(x)
    assert isinstance(y, torch.Tensor) and y is not x
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.equal(x, x0)
    z = s.prox(x, 0.3)
    assert z.shape == x.shape and torch.equal(x, x0)
    if case.pair:
        L, S = random_pair(s, data, shape, dtype)
        L0, S0 = L.clone(), S.clone()
        Lp, Sp = s.project((L, S))
        assert Lp.shape == L.shape and Sp.dtype == dtype
        assert torch.equal(L, L0) and torch.equal(S, S0)


@SETTINGS
@given(data=st.data())
def test_feasible(case, dtype, data):
    s = case.make()
    shape = data.draw(case.shapes, label="shape")
    if case.pair:
        L, S = random_pair(s, data, shape, dtype)
        ok, why = s.contains(s.project((L, S)), explain=True, **ctol(dtype))
        assert ok, why
        return
    if not case.fixed_point:
        pytest.skip("energy criterion: a rank-selection rule, contains(project(x)) can fail "
                    "(see test_energy_rank_rule)")
    x = draw_x(data, shape, dtype)
    ok, why = s.contains(s.project(x), explain=True, **ctol(dtype))
    assert ok, why


@SETTINGS
@given(data=st.data())
def test_idempotent(case, dtype, data):
    s = case.make()
    shape = data.draw(case.shapes, label="shape")
    if case.pair:
        p = s.project(random_pair(s, data, shape, dtype))
        pp = s.project(p)
        assert_close(pp[0], p[0], dtype)
        assert_close(pp[1], p[1], dtype)
        return
    if not case.fixed_point:
        pytest.skip("energy criterion is not idempotent (documented in LowRank)")
    x = draw_x(data, shape, dtype)
    y = s.project(x)
    assert_close(s.project(y), y, dtype, ref=x)


@SETTINGS
@given(data=st.data())
def test_batched_equals_loop(case, dtype, data):
    if not case.matrix:
        pytest.skip("whole-tensor set: does not broadcast over leading dimensions")
    s = case.make()
    shape = data.draw(matrix_shapes(max_batch=0), label="matrix shape")
    b = data.draw(st.integers(2, 4), label="batch")
    x = draw_x(data, (b, *shape), dtype, kinds=("gauss", "scaled"))
    y = s.project(x)
    assert_close(y, torch.stack([s.project(x[i]) for i in range(b)]), dtype, ref=x)
    assert s.contains(y, **ctol(dtype)) == all(s.contains(y[i], **ctol(dtype)) for i in range(b))


@pytest.mark.parametrize("shape", [(4, 5, 3), (3, 4, 2)])
def test_zero_input(case, dtype, shape):
    s = case.make()
    if isinstance(s, Sum) and isinstance(s.a, LowRank):
        shape = shape[:2]
    x = torch.zeros(shape, dtype=dtype)
    y = s.project(x)
    assert torch.equal(y, x)
    assert s.contains(x)
    assert torch.equal(s.reconstruct(s.factorize(x), shape), x)


def _float_leaves(f):
    if isinstance(f, torch.Tensor):
        return [f] if f.is_floating_point() else []
    return [t for g in f for t in _float_leaves(g)]


@SETTINGS
@given(data=st.data())
def test_factorize_reconstruct_and_num_params(case, dtype, data):
    s = case.make()
    shape = data.draw(case.shapes, label="shape")
    x = draw_x(data, shape, dtype)
    factors = s.factorize(x)
    y = s.reconstruct(factors, shape)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, s.project(x), dtype, ref=x)
    n = sum(t.numel() for t in _float_leaves(factors))
    if case.id == "LowRank(energy)":
        with pytest.raises(ValueError, match="chosen from the data"):
            s.num_params(shape)
        m, k = shape[-2], shape[-1]
        r = factors[0].shape[-1]
        assert n == math.prod(shape[:-2]) * r * (m + k)
    else:
        assert n == s.num_params(shape)
    if case.pair:
        L, S = random_pair(s, data, shape, dtype)
        fa, fb = s.factorize((L, S))
        Lp, Sp = s.project((L, S))
        assert_close(s.reconstruct((fa, fb), shape), Lp + Sp, dtype, ref=L.abs() + S.abs())


def test_repr_and_check_shape(case):
    s = case.make()
    r = repr(s)
    assert r.startswith(type(s).__name__ + "(")
    with pytest.raises(ValueError, match=case.bad_match):
        s.check_shape(case.bad_shape)
    with pytest.raises(ValueError, match="layer 'conv1'"):
        s.check_shape(case.bad_shape, where="layer 'conv1'")
    x = torch.ones(case.bad_shape)
    with pytest.raises(ValueError, match=case.bad_match):
        s.project(x)


def test_nonfinite_input(case, dtype):
    s = case.make()
    shape = (3, 4, 2) if not case.matrix else (2, 3, 4)
    if isinstance(s, Sum) and isinstance(s.a, LowRank):
        shape = (4, 5)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(shape, dtype=dtype)
        x[1, 1] = bad
        x0 = x.clone()
        with pytest.raises(ValueError, match="non-finite"):
            s.project(x)
        with pytest.raises(ValueError, match="non-finite"):
            s.prox(x, 1.0)
        assert not s.contains(x)
        torch.testing.assert_close(x, x0, equal_nan=True, rtol=0, atol=0)


def test_bad_types(case):
    s = case.make()
    with pytest.raises(TypeError, match="x must be a torch.Tensor|pair"):
        s.project([[1.0, 2.0], [3.0, 4.0]] if not case.pair else "x")
    with pytest.raises(TypeError, match="floating-point"):
        s.project(torch.ones(3, 4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="tau"):
        s.prox(torch.ones(3, 4, 2), -1.0)
    with pytest.raises(ValueError, match="atol"):
        s.contains(torch.ones(3, 4, 2), atol=-1.0)


# ============================================================ LowRank: optimality
def _error(x, y):
    return float(torch.linalg.norm((x - y).reshape(-1)))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_lowrank_eckart_young(data):
    m, n = data.draw(st.integers(2, 8)), data.draw(st.integers(2, 8))
    r = data.draw(st.integers(1, min(m, n)))
    x = draw_x(data, (m, n), torch.float64, kinds=("gauss", "scaled"))
    y = LowRank(rank=r).project(x)
    s = torch.linalg.svdvals(x)
    assert math.isclose(_error(x, y), float(torch.sqrt((s[r:] ** 2).sum())), rel_tol=1e-9,
                        abs_tol=1e-12 * float(s[0]))
    assert int(torch.linalg.matrix_rank(y)) <= r
    # no rank-r candidate is closer: random ones and perturbations of the optimum
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    A, B = F.lowrank_factors(x, r)
    best = _error(x, y)
    for _ in range(20):
        cand = torch.randn(m, r, generator=g, dtype=x.dtype) @ torch.randn(r, n, generator=g, dtype=x.dtype)
        assert _error(x, cand * float(s[0])) >= best - 1e-9
        eps = 10.0 ** float(torch.randint(-6, 0, (1,), generator=g))
        cand = (A + eps * torch.randn(A.shape, generator=g, dtype=x.dtype)) @ (
            B + eps * torch.randn(B.shape, generator=g, dtype=x.dtype))
        assert _error(x, cand) >= best - 1e-9 * (1 + best)


def test_lowrank_identity_and_rank_for():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    for r in (3, 4, 100):
        assert torch.equal(LowRank(rank=r).project(x), x)
    assert torch.equal(LowRank(ratio=1.0).project(x), x)
    assert LowRank(rank=10).rank_for((5, 3)) == 3
    assert LowRank(ratio=0.25).rank_for((64, 16 * 9)) == 16   # int(0.25 * 64 + 1e-9)
    assert LowRank(ratio=0.45).rank_for((16, 144)) == 7       # LRPET P = 0.55
    assert LowRank(ratio=0.01).rank_for((16, 144)) == 1       # min_rank
    assert LowRank(ratio=0.01, min_rank=5).rank_for((16, 144)) == 5
    assert LowRank(energy=0.9).rank_for((4, 4)) is None
    assert LowRank(rank=3).num_params((2, 5, 8)) == 2 * 3 * 13


def test_energy_rank_rule():
    """TRP criterion: the smallest r with sum_{i<=r} s_i^2 >= energy * sum s_i^2, per matrix."""
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    spectra = [[3.0, 1.0, 1.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    xs = torch.stack([U[:, :5] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T for s in spectra])
    s_ = torch.tensor(spectra, dtype=torch.float64)
    for energy in (0.5, 0.8, 0.9, 0.99, 1.0):
        y = LowRank(energy=energy).project(xs)
        for i, sp in enumerate(spectra):
            e = torch.tensor(sp, dtype=torch.float64) ** 2
            want = next(r for r in range(1, 6) if float(e[:r].sum()) >= energy * float(e.sum()) - 1e-12)
            assert int(torch.linalg.matrix_rank(y[i], atol=1e-9)) == min(
                want, int((s_[i] > 0).sum()))
            assert math.isclose(_error(xs[i], y[i]), float(torch.sqrt(e[want:].sum())), abs_tol=1e-9)
    # the documented counterexample to idempotence: (3, 1, 1) -> (3, 1) -> (3)
    s = LowRank(energy=0.9)
    y = s.project(xs[0])
    assert int(torch.linalg.matrix_rank(y, atol=1e-9)) == 2
    assert not s.contains(y)
    assert int(torch.linalg.matrix_rank(s.project(y), atol=1e-9)) == 1
    assert s.contains(s.project(y))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_energy_transfer_preserves_norm(data):
    m, n = data.draw(st.integers(2, 7)), data.draw(st.integers(2, 7))
    r = data.draw(st.integers(1, min(m, n)))
    x = draw_x(data, (3, m, n), torch.float64, kinds=("gauss", "scaled"))
    s = LowRank(rank=r, energy_transfer=True)
    y = s.project(x)
    torch.testing.assert_close(torch.linalg.matrix_norm(y), torch.linalg.matrix_norm(x))
    # = alpha * Pi_r(x)
    plain = LowRank(rank=r).project(x)
    alpha = torch.linalg.matrix_norm(x) / torch.linalg.matrix_norm(plain)
    torch.testing.assert_close(y, alpha[:, None, None] * plain)
    assert s.contains(y, rtol=1e-9)


def _metric_exact(x, d, r):
    return LowRank(rank=r).project(d[:, None] * x) / d[:, None]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=st.data())
def test_metric_projection_is_weighted_minimizer(data):
    m, n = data.draw(st.integers(2, 7)), data.draw(st.integers(2, 7))
    r = data.draw(st.integers(1, min(m, n) - 1))
    x = draw_x(data, (m, n), torch.float64, kinds=("gauss",))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    d = torch.rand(m, generator=g, dtype=torch.float64) * 3 + 0.2
    if data.draw(st.booleans()):
        d = -d  # BN gamma may be negative: the sign does not matter
    s = LowRank(rank=r)
    s.metric_eps = 1e-14
    y = s.project(x, metric=d)
    assert s.contains(y, rtol=1e-9)
    torch.testing.assert_close(y, _metric_exact(x, d, r), rtol=1e-9, atol=1e-9)

    def werr(z):
        return float(torch.linalg.norm(d[:, None] * (z - x)))

    best = werr(y)
    plain = LowRank(rank=r).project(x)
    assert best <= werr(plain) + 1e-9
    A, B = s.factorize(x, metric=d)
    for _ in range(20):
        cand = torch.randn(m, r, generator=g, dtype=x.dtype) @ torch.randn(r, n, generator=g, dtype=x.dtype)
        assert werr(cand) >= best - 1e-9
        eps = 10.0 ** float(torch.randint(-6, 0, (1,), generator=g))
        cand = (A + eps * torch.randn(A.shape, generator=g, dtype=x.dtype)) @ (
            B + eps * torch.randn(B.shape, generator=g, dtype=x.dtype))
        assert werr(cand) >= best - 1e-9 * (1 + best)
    # default eps (1e-5): LRPET's regularized inverse, close to the exact minimizer
    s2 = LowRank(rank=r)
    torch.testing.assert_close(s2.project(x, metric=d), _metric_exact(x, d, r),
                               rtol=0, atol=1e-4 * float(x.abs().max()) / float(d.abs().min()) ** 2)
    # factorize agrees with project in the metric
    U, V = s2.factorize(x, metric=d)
    torch.testing.assert_close(U @ V, s2.project(x, metric=d))


def test_metric_energy_transfer_preserves_weighted_norm():
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    d = torch.rand(4, 6, dtype=torch.float64) + 0.5   # per-matrix metric, shape x.shape[:-1]
    s = LowRank(rank=2, energy_transfer=True)
    s.metric_eps = 1e-14
    y = s.project(x, metric=d)
    torch.testing.assert_close(torch.linalg.matrix_norm(d[..., None] * y),
                               torch.linalg.matrix_norm(d[..., None] * x))
    assert s.contains(y, rtol=1e-9)
    # the batch of metrics equals a loop
    for i in range(4):
        torch.testing.assert_close(y[i], s.project(x[i], metric=d[i]))


def test_metric_bad_input():
    s = LowRank(rank=1)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"metric must have shape \(4,\)"):
        s.project(x, metric=torch.ones(5))
    with pytest.raises(ValueError, match="metric has 1 non-finite"):
        s.project(x, metric=torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(TypeError, match="metric must be a torch.Tensor"):
        s.project(x, metric=[1.0, 1.0, 1.0, 1.0])


# ======================================================== Cardinality: optimality
def _brute_topk_error(x, k):
    flat = x.reshape(-1)
    return min(float(torch.linalg.norm(flat[[i for i in range(flat.numel()) if i not in c]]))
               for c in itertools.combinations(range(flat.numel()), k))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_cardinality_brute_force(data):
    shape = data.draw(st.sampled_from([(2, 3), (7,), (2, 2, 2), (3, 3)]))
    n = math.prod(shape)
    k = data.draw(st.integers(1, n))
    x = draw_x(data, shape, torch.float64)
    y = Cardinality(k=k).project(x)
    assert int((y != 0).sum()) <= k
    mask = y != 0
    assert torch.equal(y[mask], x[mask])   # kept entries unchanged
    assert math.isclose(_error(x, y), _brute_topk_error(x, k), rel_tol=1e-12, abs_tol=1e-12)
    vals, idx = Cardinality(k=k).factorize(x)
    assert idx.numel() == k and idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())


def test_cardinality_ties_keep_exactly_k_lowest_index():
    x = torch.tensor([[1.0, -2.0, 2.0], [2.0, -2.0, 0.5]])
    vals, idx = Cardinality(k=3).factorize(x)
    assert idx.tolist() == [1, 2, 3]          # four entries tie at |2|: lowest flat indices win
    assert vals.tolist() == [-2.0, 2.0, 2.0]
    y = Cardinality(k=3).project(x)
    assert int((y != 0).sum()) == 3
    z = torch.zeros(2, 5)
    vals, idx = Cardinality(k=4).factorize(z)
    assert idx.tolist() == [0, 1, 2, 3]        # exactly k, also when all are zero
    ones = torch.ones(4, 4)
    assert int((Cardinality(density=0.5).project(ones) != 0).sum()) == 8


def test_cardinality_identity_and_counts():
    x = torch.randn(3, 4)
    assert torch.equal(Cardinality(k=12).project(x), x)
    assert torch.equal(Cardinality(density=1.0).project(x), x)
    assert torch.equal(Cardinality(k=3, group_dim=1).project(torch.randn(2, 3)).ne(0).sum(0).ne(0),
                       torch.tensor([True, True, True]))
    assert Cardinality(density=0.1).k_for((10, 10)) == 10
    assert Cardinality(density=0.001).k_for((10, 10)) == 1
    assert Cardinality(density=0.5, group_dim=0).num_params((6, 4, 3, 3)) == 3 * 36
    assert Cardinality(k=2, group_dim=-1).num_params((6, 4)) == 12


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_group_cardinality_brute_force(data):
    shape = data.draw(st.sampled_from([(4, 3), (3, 2, 2), (5, 2)]))
    dim = data.draw(st.sampled_from([0, 1, -1]))
    G = shape[dim]
    k = data.draw(st.integers(1, G))
    x = draw_x(data, shape, torch.float64)
    s = Cardinality(k=k, group_dim=dim)
    y = s.project(x)
    xm = x.movedim(dim, 0).reshape(G, -1)
    brute = min(float(torch.linalg.norm(xm[[i for i in range(G) if i not in c]]))
                for c in itertools.combinations(range(G), k))
    assert math.isclose(_error(x, y), brute, rel_tol=1e-12, abs_tol=1e-12)
    ym = y.movedim(dim, 0).reshape(G, -1)
    kept = ym.abs().sum(1) != 0
    assert int(kept.sum()) <= k
    assert torch.equal(ym[kept], xm[kept])
    vals, idx = s.factorize(x)
    assert vals.shape[dim % len(shape)] == k and idx.numel() == k


# ============================================================= TTRank: bounds
def _unfolding_best_error(x, k, r):
    s = F.unfolding_singular_values(x, k)
    return float((s[r:] ** 2).sum())


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_tt_svd_bound_and_ranks(data):
    d = data.draw(st.integers(3, 4))
    shape = tuple(data.draw(st.integers(2, 4)) for _ in range(d))
    ranks = tuple(data.draw(st.integers(1, 5)) for _ in range(d - 1))
    x = draw_x(data, shape, torch.float64, kinds=("gauss", "scaled"))
    s = TTRank(ranks)
    y = s.project(x)
    err2 = _error(x, y) ** 2
    eff = s.rank_for(shape)
    bound = sum(_unfolding_best_error(x, k + 1, eff[k]) for k in range(d - 1))
    assert err2 <= bound * (1 + 1e-9) + 1e-20
    for k in range(1, d):
        sv = F.unfolding_singular_values(y, k)
        assert int((sv > 1e-9 * sv[0]).sum()) <= min(ranks[k - 1], eff[k - 1])
    # a tensor already of low TT rank is reproduced
    cores = s.factorize(x)
    rr = (1, *eff, 1)
    assert [tuple(c.shape) for c in cores] == [(rr[k], shape[k], rr[k + 1]) for k in range(d)]
    torch.testing.assert_close(s.project(y), y)


def test_tt_rank_capping_and_identity():
    s = TTRank(100)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert s.rank_for(x.shape) == (2, 4)
    assert torch.equal(s.project(x), x)
    assert s.num_params(x.shape) == 1 * 2 * 2 + 2 * 3 * 4 + 4 * 4 * 1
    assert TTRank((1, 1)).num_params((2, 3, 4)) == 9
    # rank-1 TT = outer product; TT-SVD recovers it
    a, b, c = torch.randn(2), torch.randn(3), torch.randn(4)
    x1 = torch.einsum("i,j,k->ijk", a, b, c)
    torch.testing.assert_close(TTRank(1).project(x1), x1)
    assert TTRank(1).contains(x1, rtol=1e-5)
    assert not TTRank(1).contains(x)


# ============================================================== Sum: heuristics
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=st.data())
def test_sum_decompose_monotone_and_feasible(data):
    x = draw_x(data, (6, 5), torch.float64, kinds=("gauss", "scaled"))
    s = Sum(LowRank(rank=1), Cardinality(k=4))
    L, S = s.decompose(x)
    assert s.contains((L, S), rtol=1e-9)
    e_sum = _error(x, L + S)
    L1, S1 = sequential_sl(x, s.a, s.b)
    assert e_sum <= _error(x, L1 + S1) + 1e-12       # never worse than its first iterate
    Lb, Sb = sequential_ls(x, s.a, s.b)
    assert s.contains((Lb, Sb), rtol=1e-9)
    for order, fn in (("SL", sequential_sl), ("LS", sequential_ls)):
        for u, v in zip(s.sequential(x, order), fn(x, s.a, s.b)):
            assert torch.equal(u, v)
    # the raw alternation (exact projections) has non-increasing error; decompose returns its end
    S_, errs = torch.zeros_like(x), []
    for _ in range(6):
        L_ = s.a.project(x - S_)
        errs.append(_error(x, L_ + S_))
        S_ = s.b.project(x - L_)
        errs.append(_error(x, L_ + S_))
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    L6, S6 = s.decompose(x, iters=6, tol=0.0)
    assert math.isclose(_error(x, L6 + S6), errs[-1], rel_tol=1e-12, abs_tol=1e-12)


def test_sum_tensor_contains():
    s = Sum(LowRank(rank=1), Cardinality(k=1))
    u, v = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    L = u @ v
    S = torch.zeros(6, 5, dtype=torch.float64)
    S[2, 3] = 7.0
    assert s.contains(L) and s.contains(S)
    assert s.contains(L + S)          # the alternation finds this witness
    x = torch.randn(6, 5, dtype=torch.float64)
    ok, why = s.contains(x, explain=True)   # 11 degrees of freedom < 30: generic x is not in A + B
    assert not ok and "residual" in why
    ok, why = s.contains((x, S), explain=True)
    assert not ok and why.startswith("L:")


def test_sum_bad_input():
    with pytest.raises(TypeError, match="b must be a ConstraintSet"):
        Sum(LowRank(rank=1), SchattenP(p=0.5))
    s = Sum(LowRank(rank=1), Cardinality(k=2))
    with pytest.raises(ValueError, match="must have one shape"):
        s.project((torch.ones(3, 4), torch.ones(4, 3)))
    with pytest.raises(ValueError, match="order='XY' is not allowed"):
        s.sequential(torch.ones(3, 4), order="XY")
    with pytest.raises(ValueError, match="iters=0"):
        s.decompose(torch.ones(3, 4), iters=0)
    with pytest.raises(TypeError, match="pair"):
        s.project((torch.ones(3, 4),))
    assert s.num_params((3, 4)) == 7 + 2
    assert s.sets == (s.a, s.b)


# ================================================================ SquaredFrobenius (N = 1 of LoRITa)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_squared_frobenius_prox_is_the_minimizer(data):
    """prox_{tau g}(x) = argmin_z tau*w*||z||^2 + ||z - x||^2 / 2: a strictly convex quadratic,
    so the minimizer is the unique zero of the gradient 2*tau*w*z + z - x, and every other point
    (here random perturbations) has a larger objective."""
    from admm_compress.sets import SquaredFrobenius

    w = 10.0 ** data.draw(st.floats(-2, 1))
    tau = 10.0 ** data.draw(st.floats(-2, 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    pen = SquaredFrobenius(weight=w)
    z = pen.prox(x, tau)
    torch.testing.assert_close(2 * tau * w * z + z - x, torch.zeros_like(x), rtol=0, atol=1e-12 * (1 + float(x.abs().max())))

    def obj(v):
        return tau * w * float((v ** 2).sum()) + 0.5 * float(((v - x) ** 2).sum())

    for _ in range(5):
        assert obj(z) <= obj(z + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64))
    assert float(pen(x)) == pytest.approx(w * float((x ** 2).sum()), rel=1e-12)


# ================================================================ SchattenP
def _prox_obj(z, x, lam, p):
    return 0.5 * float(((z - x) ** 2).sum()) + lam * float(F.schatten_value(z, p))


def test_schatten_p1_is_singular_value_soft_thresholding():
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    for tau in (0.0, 0.3, 1.5, 100.0):
        z = SchattenP(p=1.0, weight=2.0).prox(x, tau)
        U, s, Vh = torch.linalg.svd(x, full_matrices=False)
        want = U @ torch.diag_embed(torch.clamp(s - 2.0 * tau, min=0)) @ Vh
        torch.testing.assert_close(z, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_schatten_prox_beats_candidates(data):
    p = data.draw(st.sampled_from([0.1, 0.3, 0.5, 2 / 3, 0.9, 1.0]))
    lam = 10.0 ** data.draw(st.floats(-1.5, 0.5))
    m, n = data.draw(st.integers(2, 5)), data.draw(st.integers(2, 5))
    x = draw_x(data, (m, n), torch.float64, kinds=("gauss",)) * 2
    pen = SchattenP(p=p, weight=0.5)
    z = pen.prox(x, 2 * lam)         # lam_total = 2 * lam * 0.5
    best = _prox_obj(z, x, lam, p)
    assert best <= _prox_obj(x, x, lam, p) + 1e-12
    assert best <= _prox_obj(torch.zeros_like(x), x, lam, p) + 1e-12
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for _ in range(30):
        eps = 10.0 ** float(torch.empty(1).uniform_(-6, 0, generator=g))
        cand = z + eps * torch.randn(m, n, generator=g, dtype=x.dtype)
        assert _prox_obj(cand, x, lam, p) >= best - 1e-10
    # singular values: the scalar prox of those of x, same singular vectors
    torch.testing.assert_close(torch.linalg.svdvals(z),
                               F.prox_power(torch.linalg.svdvals(x), lam, p).sort(descending=True).values,
                               rtol=1e-10, atol=1e-10)


def test_schatten_value_grad_batch_and_factorize():
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    for p in (1.0, 0.5):
        pen = SchattenP(p=p, weight=3.0)
        v = pen(x)
        s = torch.linalg.svdvals(x.detach())
        assert math.isclose(float(v.detach()), 3.0 * float((s ** p).sum()), rel_tol=1e-12)
        (gx,) = torch.autograd.grad(v, x)
        U, s, Vh = torch.linalg.svd(x.detach(), full_matrices=False)
        want = 3.0 * U @ torch.diag_embed(p * s ** (p - 1)) @ Vh
        torch.testing.assert_close(gx, want)
    # rank-deficient: finite gradient
    y = (torch.randn(5, 2, dtype=torch.float64) @ torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    (gy,) = torch.autograd.grad(SchattenP(p=0.5)(y), y)
    assert bool(torch.isfinite(gy).all())
    # batch = loop; factorize keeps the numerical rank
    pen = SchattenP(p=0.5, weight=1.0)
    xb = x.detach()
    torch.testing.assert_close(pen.prox(xb, 0.7), torch.stack([pen.prox(xb[i], 0.7) for i in range(2)]))
    U, V = pen.factorize(y.detach())
    assert U.shape == (5, 2) and V.shape == (2, 4)
    torch.testing.assert_close(pen.reconstruct((U, V), (5, 4)), y.detach())
    assert pen.num_params((5, 4)) == 20
    # project = the numerical-rank truncation export stores (a penalty has no set)
    torch.testing.assert_close(pen.project(y.detach()), y.detach())
    assert int(torch.linalg.matrix_rank(pen.project(y.detach() + 1e-3), atol=1e-9)) == 3
    assert torch.equal(pen.prox(xb, 0.0), xb)


# ================================================================ bad input
@pytest.mark.parametrize("make, exc, match", [
    (lambda: LowRank(), ValueError, "exactly one of rank=, ratio=, energy="),
    (lambda: LowRank(rank=2, ratio=0.5), ValueError, "exactly one"),
    (lambda: LowRank(rank=0), ValueError, r"rank=0 is out of range"),
    (lambda: LowRank(rank=2.5), TypeError, "rank must be an integer"),
    (lambda: LowRank(ratio=1.5), ValueError, r"ratio=1.5 is out of range.*\(0.0, 1.0\]"),
    (lambda: LowRank(ratio=0.0), ValueError, "ratio=0.0"),
    (lambda: LowRank(energy=0.0), ValueError, "energy=0.0"),
    (lambda: LowRank(energy=float("nan")), ValueError, "energy=nan"),
    (lambda: LowRank(rank=2, energy_transfer="yes"), TypeError, "energy_transfer"),
    (lambda: LowRank(ratio=0.5, min_rank=0), ValueError, "min_rank=0"),
    (lambda: Cardinality(), ValueError, "exactly one of k= and density="),
    (lambda: Cardinality(k=3, density=0.1), ValueError, "exactly one"),
    (lambda: Cardinality(k=0), ValueError, "k=0 is out of range"),
    (lambda: Cardinality(density=1.2), ValueError, "density=1.2"),
    (lambda: Cardinality(k=2, group_dim="rows"), TypeError, "group_dim must be an integer"),
    (lambda: TTRank(0), ValueError, "ranks=0"),
    (lambda: TTRank(()), ValueError, "ranks=.*empty"),
    (lambda: TTRank((2, 0)), ValueError, r"ranks\[1\]=0"),
    (lambda: TTRank("2"), TypeError, "ranks must be an int or a tuple"),
    (lambda: SchattenP(p=0.0), ValueError, r"p=0.0 is out of range.*\(0.0, 1.0\]"),
    (lambda: SchattenP(p=1.5), ValueError, "p=1.5"),
    (lambda: SchattenP(p=-1), ValueError, "p=-1"),
    (lambda: SchattenP(p=0.5, weight=-1.0), ValueError, "weight=-1.0"),
    (lambda: Sum(LowRank(rank=1), Cardinality(k=1), iters=0), ValueError, "iters=0"),
])
def test_constructor_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_call_validation():
    with pytest.raises(ValueError, match=r"group_dim=2 is out of range for a 2-way tensor"):
        Cardinality(k=1, group_dim=2).project(torch.ones(3, 4))
    with pytest.raises(ValueError, match="tau=-0.1"):
        SchattenP(p=0.5).prox(torch.ones(3, 3), -0.1)
    with pytest.raises(ValueError, match="non-finite"):
        SchattenP(p=0.5)(torch.full((2, 2), float("inf")))
    with pytest.raises(TypeError, match="real floating-point"):
        LowRank(rank=1).project(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SchattenP(p=0.5).prox(torch.ones(3), 1.0)
