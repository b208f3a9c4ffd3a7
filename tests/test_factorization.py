"""LoRITa core: factor-product parametrization, Prop. 4.2, collapse, LSVT / GSVT / ISVT."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from admm_compress.factorization import (
    FactorProduct,
    apply_factorization,
    balanced_factors,
    collapse,
    factor_parameters,
    factor_shapes,
    factor_sq_norm,
    gsvt,
    is_factorized,
    isvt,
    lowrank_param_count,
    lsvt,
    truncate_to_ranks,
)

SETTINGS = settings(max_examples=25, deadline=None)


def _product(factors):
    """F_N @ ... @ F_1 (application order in, matrix out)."""
    out = factors[0]
    for f in factors[1:]:
        out = f @ out
    return out


def _schatten_sum(w: torch.Tensor, p: float) -> torch.Tensor:
    """sum_j sigma_j(w)^p by definition (svdvals)."""
    s = torch.linalg.svdvals(w)
    return s[s > 0].pow(p).sum()


def _view(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _matrix(seed: int, m: int, n: int, rank: int | None = None, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(m, n, generator=g, dtype=dtype)
    return torch.randn(m, rank, generator=g, dtype=dtype) @ torch.randn(rank, n, generator=g, dtype=dtype)


dims = st.integers(1, 7)


# ============================================================================ balanced factors
@SETTINGS
@given(m=dims, n=dims, n_factors=st.integers(1, 4), pad=st.integers(0, 3), mix=st.booleans(),
       rank_def=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_balanced_factors_product_shapes_balance(m, n, n_factors, pad, mix, rank_def, seed):
    k = min(m, n)
    w = _matrix(seed, m, n, rank=max(1, k - 1) if rank_def else None)
    d = k + pad
    gen = torch.Generator().manual_seed(seed + 1) if mix else None
    fs = balanced_factors(w, n_factors, inner_dim=d, generator=gen)
    assert [tuple(f.shape) for f in fs] == factor_shapes(m, n, n_factors, d)
    assert all(f.dtype == w.dtype for f in fs)
    torch.testing.assert_close(_product(fs), w, atol=1e-10, rtol=1e-10)
    # balancedness F_{i+1}^T F_{i+1} = F_i F_i^T (the gradient-flow invariant of deep linear nets)
    for lo, hi in zip(fs[:-1], fs[1:]):
        torch.testing.assert_close(hi.T @ hi, lo @ lo.T, atol=1e-9, rtol=1e-9)


def test_balanced_factors_float32_and_conv_view():
    w = torch.randn(6, 3, 3, 3)
    fs = balanced_factors(w, 3)
    assert [tuple(f.shape) for f in fs] == [(6, 27), (6, 6), (6, 6)]
    assert all(f.dtype == torch.float32 for f in fs)
    torch.testing.assert_close(_product(fs), _view(w), atol=1e-5, rtol=1e-5)
    w_in = w.clone()
    balanced_factors(w, 2)
    assert torch.equal(w, w_in)                       # input untouched


def test_balanced_factors_rejects_bad_input():
    with pytest.raises(ValueError, match="inner_dim"):
        balanced_factors(torch.randn(4, 6), 3, inner_dim=3)
    with pytest.raises(ValueError, match="n_factors"):
        balanced_factors(torch.randn(4, 6), 0)
    with pytest.raises(TypeError, match="w must be"):
        balanced_factors(torch.randn(4), 2)


# ============================================================================ Prop. 4.2
@SETTINGS
@given(m=dims, n=dims, n_factors=st.integers(2, 4), pad=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_prop42_balanced_attains_schatten(m, n, n_factors, pad, seed):
    """sum_i ||F_i||_F^2 = N * sum_j sigma_j^(2/N) for the balanced factorization (Eq. 4, p_i = 2)."""
    w = _matrix(seed, m, n)
    fs = balanced_factors(w, n_factors, inner_dim=min(m, n) + pad,
                          generator=torch.Generator().manual_seed(seed))
    lhs = sum(f.pow(2).sum() for f in fs)
    rhs = n_factors * _schatten_sum(w, 2.0 / n_factors)
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(m=dims, n=dims, n_factors=st.integers(2, 4), pad=st.integers(0, 2), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_prop42_rebalancing_never_smaller(m, n, n_factors, pad, seed, data):
    """F_i -> A F_i, F_{i+1} -> F_{i+1} A^{-1} keeps the product and never lowers the sum."""
    w = _matrix(seed, m, n)
    d = min(m, n) + pad
    fs = balanced_factors(w, n_factors, inner_dim=d)
    best = sum(f.pow(2).sum() for f in fs)
    i = data.draw(st.integers(0, n_factors - 2))
    g = torch.Generator().manual_seed(seed + 7)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) + data.draw(st.floats(0.0, 3.0)) * torch.eye(d, dtype=torch.float64)
    assume(torch.linalg.cond(A) < 1e6)
    fs2 = list(fs)
    fs2[i] = A @ fs[i]
    fs2[i + 1] = fs[i + 1] @ torch.linalg.inv(A)
    torch.testing.assert_close(_product(fs2), w, atol=1e-7, rtol=1e-7)
    assert sum(f.pow(2).sum() for f in fs2) >= best * (1 - 1e-9) - 1e-12


@SETTINGS
@given(m=dims, n=dims, n_factors=st.integers(2, 4), pad=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_prop42_lower_bound_for_any_factorization(m, n, n_factors, pad, seed):
    """Any factors: sum_i ||F_i||^2 >= N * sum_j sigma_j(F_N ... F_1)^(2/N)."""
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(*s, generator=g, dtype=torch.float64)
          for s in factor_shapes(m, n, n_factors, min(m, n) + pad)]
    lhs = sum(f.pow(2).sum() for f in fs)
    rhs = n_factors * _schatten_sum(_product(fs), 2.0 / n_factors)
    assert lhs >= rhs * (1 - 1e-9)


def test_prop42_matches_schatten_penalty_class():
    """N * SchattenP(p=2/N) of the product equals the factor norm sum (needs admm_compress.sets.schatten)."""
    schatten = pytest.importorskip("admm_compress.sets.schatten")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 9))
    for n_factors in (2, 3, 4):
        m = copy.deepcopy(model).double()
        apply_factorization(m, None, n_factors)
        pen = schatten.SchattenP(p=2.0 / n_factors, weight=1.0)
        expected = n_factors * sum(pen(mod.weight) for mod in (m[0], m[2]))
        torch.testing.assert_close(factor_sq_norm(m), expected.to(torch.float64), atol=1e-8, rtol=1e-8)


# ============================================================================ parametrization
LAYERS = [
    ("linear", lambda: nn.Linear(7, 4), (3, 7)),
    ("linear_wide_out", lambda: nn.Linear(3, 9, bias=False), (2, 3)),
    ("conv2d", lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), (2, 3, 9, 9)),
    ("conv2d_dil", lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=2, bias=False),
     (2, 4, 8, 8)),
    ("conv1d", lambda: nn.Conv1d(2, 6, 5, padding=2), (2, 2, 11)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("kind,make,in_shape", LAYERS, ids=[l[0] for l in LAYERS])
@pytest.mark.parametrize("n_factors", [2, 3, 4])
@pytest.mark.parametrize("inner", ["auto", "in", "out", "min"])
def test_registration_keeps_weight_and_output(kind, make, in_shape, n_factors, inner):
    torch.manual_seed(n_factors)
    layer = make()
    x = torch.randn(*in_shape)
    w0 = layer.weight.detach().clone()
    y0 = layer(x)
    names = apply_factorization(nn.Sequential(layer), None, n_factors, inner=inner)
    assert names == ["0"] and is_factorized(layer)
    torch.testing.assert_close(layer.weight, w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    m, n = w0.shape[0], w0[0].numel()
    d = {"in": n, "out": m, "min": min(m, n),
         "auto": n if isinstance(layer, nn.Linear) else m}[inner]
    shapes = [tuple(f.shape) for f in factor_parameters(layer)]
    assert shapes == factor_shapes(m, n, n_factors, d)
    # gradients reach every factor
    layer(x).square().sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in factor_parameters(layer))


def test_paper_layout_auto():
    """auto: Linear = N-1 square (in x in) then (out x in); conv = k x k conv in->out then 1x1 out->out."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(12, 5))
    apply_factorization(model, None, 3)
    assert [tuple(f.shape) for f in factor_parameters(model[0])] == [(8, 27), (8, 8), (8, 8)]
    assert [tuple(f.shape) for f in factor_parameters(model[2])] == [(12, 12), (12, 12), (5, 12)]


def test_conv_equals_kxk_then_1x1_convs():
    """The factorized conv computes the k x k conv F_1 followed by 1x1 convs F_2 ... F_N."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7)
    apply_factorization(nn.Sequential(conv), None, 3)
    f1, f2, f3 = factor_parameters(conv)
    h = nn.functional.conv2d(x, f1.reshape(4, 3, 3, 3), stride=2, padding=1)
    h = nn.functional.conv2d(h, f2[:, :, None, None])
    h = nn.functional.conv2d(h, f3[:, :, None, None], conv.bias)
    torch.testing.assert_close(conv(x), h, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_and_round_trip():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    model = make()
    apply_factorization(model, ["0", "3"], 3)
    keys = set(model.state_dict())
    expected = {"0.bias", "3.bias"} | {f"{l}.parametrizations.weight.original{i}" for l in "03" for i in range(3)}
    assert keys == expected
    x = torch.randn(2, 2, 5, 5)
    other = make()                                     # different random weights
    apply_factorization(other, ["0", "3"], 3)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x))
    with pytest.raises(RuntimeError):                  # a plain model does not accept factor keys
        make().load_state_dict(model.state_dict())


def test_assignment_rebalances_through_right_inverse():
    layer = nn.Linear(6, 4)
    apply_factorization(nn.Sequential(layer), None, 3, inner="min")
    w = torch.randn(4, 6)
    layer.weight = w
    torch.testing.assert_close(layer.weight, w, atol=1e-5, rtol=1e-5)


def test_factor_sq_norm_is_the_weight_decay_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    assert float(factor_sq_norm(model)) == 0.0
    apply_factorization(model, ["0"], 2)
    manual = sum(p.pow(2).sum() for n, p in model.named_parameters() if "original" in n)
    torch.testing.assert_close(factor_sq_norm(model), manual)
    # SGD weight decay wd on the factors == gradient of wd/2 * factor_sq_norm
    params = factor_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1, weight_decay=0.3)
    opt.zero_grad()
    (0.0 * model(torch.randn(3, 5)).sum()).backward()
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.3))


def test_collapse_restores_plain_modules():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6, 4))
    x = torch.randn(3, 2, 8)
    y0 = model(x)
    apply_factorization(model, None, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).square().mean().backward()
    opt.step()
    y1 = model(x)
    assert not torch.allclose(y1, y0)
    assert collapse(model) == ["0", "3"]
    assert type(model[0]) is nn.Conv1d and type(model[3]) is nn.Linear
    assert not parametrize.is_parametrized(model[0]) and not is_factorized(model[3])
    assert set(model.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.is_leaf
    assert model[0].weight.requires_grad
    torch.testing.assert_close(model(x), y1)
    assert collapse(model) == []


def test_apply_factorization_validation():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="n_factors"):
        apply_factorization(model, ["0"], 1)
    with pytest.raises(ValueError, match="no module named 'fc'"):
        apply_factorization(model, ["fc"], 2)
    with pytest.raises(ValueError, match="'2'"):
        apply_factorization(model, ["2"], 2)               # BatchNorm weight is 1-D
    with pytest.raises(ValueError, match="inner"):
        apply_factorization(model, ["0"], 2, inner=2)      # < min(3, 4)
    with pytest.raises(ValueError, match="inner"):
        apply_factorization(model, ["0"], 2, inner="max")
    assert not parametrize.is_parametrized(model[0])       # nothing done by a failed call
    assert apply_factorization(model, "*", 2) == ["0"]     # globs skip modules without a matrix weight
    with pytest.raises(ValueError, match="already parametrized"):
        apply_factorization(model, ["0"], 2)
    assert apply_factorization(nn.Sequential(nn.Linear(2, 2)), lambda n, m: isinstance(m, nn.Linear), 2) == ["0"]
    assert apply_factorization(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(1, 1, 1)), nn.Conv2d, 2) == ["1"]


# ============================================================================ truncation
def _fcn(seed=0, widths=(6, 8, 8, 3)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _svd_r(w: torch.Tensor, r: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(_view(w).double(), full_matrices=False)
    return ((U[:, :r] * s[:r]) @ Vh[:r]).reshape(w.shape).to(w.dtype)


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 10), seed=st.integers(0, 1000))
def test_lsvt_exact_rank_and_best_approximation(rank, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6, 8))
    w = {n: model[i].weight.detach().clone() for n, i in (("0", 0), ("2", 2))}
    ranks = lsvt(model, ["0", "2"], rank=rank)
    for name, i in (("0", 0), ("2", 2)):
        q = min(_view(w[name]).shape)
        r = min(rank, q)
        assert ranks[name] == r
        assert torch.linalg.matrix_rank(_view(model[i].weight).double(), rtol=1e-5) == r
        torch.testing.assert_close(model[i].weight.detach(), _svd_r(w[name], r), atol=1e-5, rtol=1e-5)


def test_lsvt_ratio_and_validation():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    assert lsvt(model, ["0", "2"], ratio=0.5) == {"0": 5, "2": 2}
    with pytest.raises(ValueError, match="exactly one"):
        lsvt(model, ["0"], rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        lsvt(model, ["0"], ratio=1.5)
    apply_factorization(model, ["0"], 2)
    with pytest.raises(ValueError, match="collapse"):
        lsvt(model, ["0"], rank=1)


def test_truncate_to_ranks_checks_before_work():
    model = _fcn()
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="layer '2'"):
        truncate_to_ranks(model, {"0": 2, "2": 99})
    assert torch.equal(model[0].weight, w0)
    assert truncate_to_ranks(model, {"0": 2}) == {"0": 2}
    torch.testing.assert_close(model[0].weight.detach(), _svd_r(w0, 2), atol=1e-5, rtol=1e-5)


def _layer_with_singular_values(out_f, in_f, s, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(s), generator=g))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(s), generator=g))
    layer = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        layer.weight.copy_(U @ torch.diag(torch.tensor(s)) @ V.T)
    return layer


def test_gsvt_normalizes_each_matrix_before_the_global_sort():
    big = [100.0, 50.0, 25.0, 12.5]          # normalized 1, .5, .25, .125
    flat = [2.0, 1.9, 1.8, 1.7]              # normalized 1, .95, .9, .85
    model = nn.Sequential(_layer_with_singular_values(4, 6, big, 0), _layer_with_singular_values(5, 4, flat, 1))
    w = [model[i].weight.detach().clone() for i in range(2)]
    # raw sorting would keep 100, 50, 25, 12.5, 2 -> ranks (4, 1); normalized: (1, 4)
    raw = sorted([(v, 0) for v in big] + [(v, 1) for v in flat], reverse=True)[:5]
    assert [sum(1 for _, o in raw if o == i) for i in range(2)] == [4, 1]
    ranks = gsvt(model, {"linear": ["0", "1"]}, keep=5)
    assert ranks == {"0": 1, "1": 4}
    for i in range(2):
        torch.testing.assert_close(model[i].weight.detach(), _svd_r(w[i], ranks[str(i)]), atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), frac=st.floats(0.05, 1.0))
def test_gsvt_matches_brute_force_ranking(seed, frac):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Conv2d(5, 4, 1), nn.Flatten(), nn.Linear(4, 6), nn.Linear(6, 3))
    groups = {"conv": ["0", "1"], "linear": ["3", "4"]}
    expected = {}
    for names in groups.values():
        vals = []
        for nm in names:
            s = torch.linalg.svdvals(_view(model.get_submodule(nm).weight.detach()))
            vals += [((s[j] / s[0]).item() if j else math.inf, nm) for j in range(len(s))]
        k = max(len(names), max(1, int(frac * len(vals) + 1e-9)))
        top = sorted(vals, key=lambda t: -t[0])[:k]
        expected.update({nm: sum(1 for _, o in top if o == nm) for nm in names})
    assert gsvt(model, groups, keep=frac) == expected
    for nm, r in expected.items():
        assert torch.linalg.matrix_rank(_view(model.get_submodule(nm).weight).double(), rtol=1e-4) == r


def test_gsvt_validation():
    model = _fcn()
    with pytest.raises(ValueError, match="keep"):
        gsvt(model, ["0", "2"], keep=1000)
    with pytest.raises(ValueError, match="more than one group"):
        gsvt(model, {"a": ["0"], "b": ["0"]}, keep=0.5)
    with pytest.raises(TypeError, match="keep"):
        gsvt(model, ["0"], keep=True)


def _loss(model, x, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def test_isvt_one_round_matches_brute_force():
    model = _fcn(3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    names = ["0", "2", "4"]
    per_round = 20
    brute = {}
    for nm in names:
        trial = copy.deepcopy(model)
        w = trial.get_submodule(nm).weight
        q = min(w.shape)
        s = math.ceil(per_round / sum(w.shape))
        truncate_to_ranks(trial, {nm: q - s})
        brute[nm] = (_loss(trial, x, y), q - s)
    best = min(brute, key=lambda nm: brute[nm][0])
    reference = copy.deepcopy(model)
    truncate_to_ranks(reference, {best: brute[best][1]})
    ranks = isvt(model, names, None, (x, y), params_per_round=per_round, target_params=0,
                 max_rounds=1, progress=False)
    full = {nm: min(model.get_submodule(nm).weight.shape) for nm in names}
    assert ranks == {**full, best: brute[best][1]}
    for nm in names:
        torch.testing.assert_close(model.get_submodule(nm).weight, reference.get_submodule(nm).weight,
                                   atol=1e-5, rtol=1e-5)


def test_isvt_reaches_target_greedily():
    model = _fcn(4, widths=(10, 12, 12, 4))
    model.train()
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 10, generator=g), torch.randint(0, 4, (300,), generator=g)
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50)]
    names = ["0", "2", "4"]
    shapes = {nm: tuple(model.get_submodule(nm).weight.shape) for nm in names}
    dense = sum(a * b for a, b in shapes.values())
    target = dense // 3
    ranks = isvt(model, names, nn.functional.cross_entropy, loader, params_per_round=30,
                 target_params=target, n_samples=120, progress=False)
    count = sum(lowrank_param_count(*shapes[nm], ranks[nm]) for nm in names)
    assert count <= target
    assert model.training                                  # mode restored
    for nm in names:
        assert torch.linalg.matrix_rank(model.get_submodule(nm).weight.double(), rtol=1e-4) == ranks[nm]
    # reference greedy (Appendix A) written from scratch: truncate copies of the original model
    from admm_compress.factorization import _sample_batch  # the seeded random sample (tested below)
    xs, ys = _sample_batch(loader, 120, torch.Generator().manual_seed(0))
    ref = {nm: min(shapes[nm]) for nm in names}
    while sum(lowrank_param_count(*shapes[nm], ref[nm]) for nm in names) > target:
        trials = {}
        for nm in names:
            if ref[nm] > 1:
                s = min(ref[nm] - 1, math.ceil(30 / sum(shapes[nm])))
                trial = copy.deepcopy(original)
                truncate_to_ranks(trial, {**ref, nm: ref[nm] - s})
                trials[nm] = (_loss(trial.eval(), xs, ys), ref[nm] - s)
        best = min(trials, key=lambda nm: trials[nm][0])
        ref[best] = trials[best][1]
    assert ranks == ref


def test_isvt_starts_from_given_ranks_and_validates():
    model = _fcn(5)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    names = ["0", "2", "4"]
    start = gsvt(model, names, keep=0.5)
    shapes = {nm: tuple(model.get_submodule(nm).weight.shape) for nm in names}
    count = lambda rk: sum(lowrank_param_count(*shapes[nm], rk[nm]) for nm in names)
    ranks = isvt(model, names, None, (x, y), params_per_round=10, target_params=count(start),
                 ranks=start, progress=False)
    assert ranks == start                                  # already at the target: no round
    ranks = isvt(model, names, None, (x, y), params_per_round=10, target_params=count(start) - 1,
                 ranks=start, progress=False)
    assert all(ranks[nm] <= start[nm] for nm in names) and count(ranks) < count(start)
    with pytest.raises(ValueError, match="exactly one"):
        isvt(model, ["0"], None, (x, y), progress=False)
    with pytest.raises(ValueError, match="target_ratio"):
        isvt(model, ["0"], None, (x, y), target_ratio=1.0, progress=False)
    with pytest.raises(ValueError, match="data"):
        isvt(model, ["0"], None, None, target_params=0, progress=False)


def test_factor_product_module_checks():
    fp = FactorProduct((4, 2, 3), 3)
    assert fp.factor_shapes == [(4, 6), (4, 4), (4, 4)]
    with pytest.raises(ValueError, match="shape"):
        fp.right_inverse(torch.randn(4, 6))
    with pytest.raises(ValueError, match="n_factors"):
        FactorProduct((4, 6), 1)
    with pytest.raises(ValueError, match="inner_dim"):
        FactorProduct((4, 6), 2, inner_dim=3)


def test_isvt_sample_is_a_seeded_uniform_random_subsample():
    """App. A: "120 randomly subsampled training data" -- not the loader's first batches."""
    from torch.utils.data import DataLoader, TensorDataset

    from admm_compress.factorization import _sample_batch

    total, k = 60, 12
    x = torch.arange(total, dtype=torch.float64).reshape(total, 1)
    y = torch.arange(total)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, total, 10)]
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=False)
    for data in (batches, loader, (x, y)):
        xs, ys = _sample_batch(data, k, torch.Generator().manual_seed(3))
        assert xs.shape == (k, 1) and torch.equal(xs[:, 0].long(), ys)     # rows stay paired
        assert len(set(ys.tolist())) == k                                   # without replacement
        xs2, ys2 = _sample_batch(data, k, torch.Generator().manual_seed(3))
        assert torch.equal(ys, ys2)                                         # seeded: reproducible
        assert torch.equal(_sample_batch(data, k, None)[1], _sample_batch(data, k, None)[1])
        assert not torch.equal(torch.sort(ys).values, torch.arange(k))      # not the first k
    # uniform: over T seeds each example is drawn with probability k/total; a binomial count
    # stays within 5 standard deviations (false alarm probability below 1e-5 per example)
    T = 400
    for data in (batches, loader):
        counts = torch.zeros(total)
        for seed in range(T):
            counts[_sample_batch(data, k, torch.Generator().manual_seed(seed))[1]] += 1
        p = k / total
        assert float((counts - T * p).abs().max()) <= 5 * (T * p * (1 - p)) ** 0.5
    # fewer examples than asked: all of them
    assert _sample_batch(batches[:1], k, None)[1].numel() == 10
