"""Tests of Decomposable-Net rank selection (Sec. 2.3, Algorithm 1, Fig. 2(c)) and of the
channel-/spatial-wise matricization and two-conv factorization."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from admm_compress.lowrank_autograd import truncated_svd_reconstruct
from admm_compress.rank_selection import (
    check_alphas,
    check_lam,
    dn_factor_convs,
    dn_factor_linear,
    dn_matrix,
    dn_unmatrix,
    energy_rank_selection,
    factorize_conv2d,
    global_rank_selection,
    num_dropped,
    ranks_for_macs_budget,
    sample_keep_ratio,
    uniform_rank_selection,
)

F64 = torch.float64


@st.composite
def spectra(draw, max_layers=5, max_rank=12):
    """Per-layer singular values, distinct across the whole network (no ties), descending."""
    sizes = draw(st.lists(st.integers(1, max_rank), min_size=1, max_size=max_layers))
    n = sum(sizes)
    vals = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    out, i = [], 0
    for size in sizes:
        v = torch.tensor(sorted(vals[i:i + size], reverse=True), dtype=F64) / 100.0
        out.append(v)
        i += size
    return out


def brute_force_reserve(svals, n_keep, min_rank):
    """Floors first, then the largest remaining values globally (by explicit enumeration)."""
    floors = [min(min_rank, s.numel()) for s in svals]
    pool = [(float(v), l) for l, s in enumerate(svals) for v in s[floors[l]:]]
    pool.sort(key=lambda t: -t[0])
    ranks = list(floors)
    for _, l in pool[:max(0, n_keep - sum(floors))]:
        ranks[l] += 1
    return ranks


# ------------------------------------------------------------------ global selection
@settings(max_examples=60, deadline=None)
@given(svals=spectra(), z=st.floats(0.0, 1.0), min_rank=st.integers(1, 6))
def test_global_selection_properties(svals, z, min_rank):
    full = [s.numel() for s in svals]
    floors = [min(min_rank, R) for R in full]
    ranks = global_rank_selection(svals, keep_ratio=z, min_rank=min_rank)
    n_keep = int(round(z * sum(full)))
    assert all(f <= r <= R for f, r, R in zip(floors, ranks, full))
    assert sum(ranks) == max(n_keep, sum(floors))          # exact count unless floors bind
    assert ranks == brute_force_reserve(svals, n_keep, min_rank)
    # threshold property: every kept non-floor value beats every dropped value
    kept = [float(s[i]) for s, r, f in zip(svals, ranks, floors) for i in range(f, r)]
    dropped = [float(v) for s, r in zip(svals, ranks) for v in s[r:]]
    if kept and dropped:
        assert min(kept) > max(dropped)
    # same selection through drop=d (Algorithm 1, d = (1 - Z) sum R_l)
    d = num_dropped(z, full)
    assert global_rank_selection(svals, drop=d, min_rank=min_rank) == ranks


@settings(max_examples=40, deadline=None)
@given(svals=spectra(), z=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2),
       min_rank=st.integers(1, 6), crit=st.sampled_from(["sv", "energy"]),
       mode=st.sampled_from(["reserve", "clip"]))
def test_global_selection_monotone_in_keep_ratio(svals, z, min_rank, crit, mode):
    lo, hi = sorted(z)
    a = global_rank_selection(svals, keep_ratio=lo, min_rank=min_rank, criterion=crit, floor_mode=mode)
    b = global_rank_selection(svals, keep_ratio=hi, min_rank=min_rank, criterion=crit, floor_mode=mode)
    assert all(x <= y for x, y in zip(a, b))


@settings(max_examples=40, deadline=None)
@given(svals=spectra(), z=st.floats(0.0, 1.0), min_rank=st.integers(1, 6))
def test_clip_floor_mode_matches_official_code(svals, z, min_rank):
    """floor_mode='clip' = official singular_value_rank: histogram of the top round(Z*N) bases,
    then clip each rank up to the floor."""
    n_keep = int(round(z * sum(s.numel() for s in svals)))
    allv = sorted(((float(v), l) for l, s in enumerate(svals) for v in s), key=lambda t: -t[0])
    counts = [0] * len(svals)
    for _, l in allv[:n_keep]:
        counts[l] += 1
    want = [max(c, min(min_rank, s.numel())) for c, s in zip(counts, svals)]
    assert global_rank_selection(svals, keep_ratio=z, min_rank=min_rank, floor_mode="clip") == want


@settings(max_examples=40, deadline=None)
@given(svals=spectra(), z=st.floats(0.0, 1.0), min_rank=st.integers(1, 6))
def test_none_floor_mode_is_the_papers_rule(svals, z, min_rank):
    """floor_mode='none' = Sec. 2.3 as written: pool every raw singular value, drop the d
    smallest, no floor (min_rank ignored, rank 0 possible)."""
    total = sum(s.numel() for s in svals)
    n_keep = int(round(z * total))
    allv = sorted(((float(v), l) for l, s in enumerate(svals) for v in s), key=lambda t: -t[0])
    counts = [0] * len(svals)
    for _, l in allv[:n_keep]:
        counts[l] += 1
    assert global_rank_selection(svals, keep_ratio=z, min_rank=min_rank, floor_mode="none") == counts
    assert global_rank_selection(svals, drop=total - n_keep, min_rank=min_rank, floor_mode="none") == counts


def test_the_three_rank_rules_on_the_example_of_issue_17():
    """Z = 0.25 on four layers of full ranks 16/32/64/10 (keep round(30.5) = 30 of 122): the 30
    largest values are the top 3 / 23 / 0 / 4 of the layers; everything else is <= 0.5."""
    l0 = torch.tensor([90.5, 85.5, 80.5] + [0.5 - 0.01 * i for i in range(13)], dtype=F64)
    l1 = torch.tensor([100.0 - i for i in range(23)] + [0.4 - 0.01 * i for i in range(9)], dtype=F64)
    l2 = torch.tensor([0.3 - 0.001 * i for i in range(64)], dtype=F64)
    l3 = torch.tensor([95.5, 93.5, 91.5, 89.5] + [0.2 - 0.01 * i for i in range(6)], dtype=F64)
    sv = [l0, l1, l2, l3]
    assert global_rank_selection(sv, keep_ratio=0.25, min_rank=5, floor_mode="none") == [3, 23, 0, 4]
    assert global_rank_selection(sv, keep_ratio=0.25, min_rank=5, floor_mode="clip") == [5, 23, 5, 5]
    assert global_rank_selection(sv, keep_ratio=0.25, min_rank=5, floor_mode="reserve") == [5, 15, 5, 5]


def test_global_selection_hand_made():
    a = torch.tensor([10.0, 9.0, 8.0])
    b = torch.tensor([1.0, 0.5])
    # floors [1, 1]; pool (9, 8 | 0.5): keep 3 -> one more from the pool
    assert global_rank_selection([a, b], drop=2, min_rank=1) == [2, 1]
    assert global_rank_selection([a, b], keep_ratio=1.0, min_rank=1) == [3, 2]
    assert global_rank_selection([a, b], keep_ratio=0.0, min_rank=1) == [1, 1]
    # floors cap at the full rank
    assert global_rank_selection([a, b], keep_ratio=0.0, min_rank=5) == [3, 2]
    # raw values are compared across layers (not normalized): scaling layer b up wins it bases
    assert global_rank_selection([a, 100 * b], drop=2, min_rank=1) == [1, 2]
    # normalized (each layer / its max): b = (1, .5), a = (1, .9, .8)
    assert global_rank_selection([a, 100 * b], drop=2, min_rank=1, normalize=True) == [2, 1]


@settings(max_examples=20, deadline=None)
@given(svals=spectra(), z=st.floats(0.0, 1.0), scale=st.floats(0.01, 100.0))
def test_normalized_selection_is_scale_invariant_per_layer(svals, z, scale):
    scaled = [svals[0] * scale] + svals[1:]
    a = global_rank_selection(svals, keep_ratio=z, min_rank=1, normalize=True)
    b = global_rank_selection(scaled, keep_ratio=z, min_rank=1, normalize=True)
    # ties among normalized values can flip; only compare when none are tied
    norm = torch.cat([s / s[0] for s in svals])
    assume(norm.unique().numel() == norm.numel())
    assert a == b


def test_energy_criterion_global_hand_made():
    # layer a: energies 9, 4, 1 (of 14); layer b: 100, 100 (of 200)
    a = torch.tensor([3.0, 2.0, 1.0])
    b = torch.tensor([10.0, 10.0])
    # remaining-energy scores: a: 1, 5/14, 1/14 ; b: 1, 0.5 -> keep 3 of 5: a1, b1, b2
    assert global_rank_selection([a, b], keep_ratio=0.6, min_rank=1, criterion="energy") == [1, 2]
    # keep 4: the next score is a's second basis (5/14)
    assert global_rank_selection([a, b], drop=1, min_rank=1, criterion="energy") == [2, 2]
    # the sv criterion would keep b's bases first anyway, but drops a's last
    assert global_rank_selection([a, b], drop=2, min_rank=1) == [1, 2]


# ------------------------------------------------------------- baselines of Fig. 2(c)
def test_uniform_rank_selection_hand_made():
    assert uniform_rank_selection([10, 64, 3], 0.5, min_rank=5) == [5, 32, 3]
    assert uniform_rank_selection([10, 64, 3], 1.0, min_rank=5) == [10, 64, 3]
    assert uniform_rank_selection([10, 64, 3], 0.0, min_rank=1) == [1, 1, 1]
    assert uniform_rank_selection([100], 0.255, min_rank=1) == [26]


def test_energy_rank_selection_hand_made():
    s = torch.tensor([3.0, 2.0, 1.0])      # energies 9, 4, 1 -> cumulative 9/14, 13/14, 1
    assert energy_rank_selection([s], 9 / 14, min_rank=1) == [1]
    assert energy_rank_selection([s], 0.65, min_rank=1) == [2]
    assert energy_rank_selection([s], 13 / 14, min_rank=1) == [2]
    assert energy_rank_selection([s], 0.95, min_rank=1) == [3]
    assert energy_rank_selection([s], 1.0, min_rank=1) == [3]
    assert energy_rank_selection([s, torch.zeros(4)], 0.5, min_rank=2) == [2, 2]
    assert energy_rank_selection([torch.tensor([1.0, 3.0, 2.0])], 0.65, min_rank=1) == [2]


@settings(max_examples=30, deadline=None)
@given(svals=spectra(), e=st.floats(0.01, 1.0))
def test_energy_rank_selection_is_smallest_rank_reaching_energy(svals, e):
    for s, r in zip(svals, energy_rank_selection(svals, e, min_rank=1)):
        c = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert c[r - 1] >= e * (1 - 1e-9)
        assert r == 1 or c[r - 2] < e


# ---------------------------------------------------------------- sampling (Alg. 1)
def test_sample_keep_ratio_range_and_reproducibility():
    g = torch.Generator().manual_seed(0)
    zs = torch.tensor([sample_keep_ratio(0.01, 0.25, g) for _ in range(2000)])
    assert zs.min() >= 0.01 and zs.max() <= 0.25
    assert abs(float(zs.mean()) - 0.13) < 0.01           # mean of U(0.01, 0.25)
    assert abs(float(zs.var()) - 0.24 ** 2 / 12) < 0.001
    a = sample_keep_ratio(0.1, 0.9, torch.Generator().manual_seed(3))
    b = sample_keep_ratio(0.1, 0.9, torch.Generator().manual_seed(3))
    assert a == b


def test_num_dropped():
    assert num_dropped(0.25, [10, 30]) == 30
    assert num_dropped(1.0, [10, 30]) == 0
    assert num_dropped(0.0, [10, 30]) == 40


@pytest.mark.parametrize("lo,hi", [(0.5, 0.5), (0.6, 0.5), (0.0, 0.5), (-0.1, 0.5), (0.1, 1.1),
                                   (float("nan"), 0.5)])
def test_bad_alphas_raise(lo, hi):
    with pytest.raises(ValueError, match="alpha"):
        sample_keep_ratio(lo, hi)
    with pytest.raises(ValueError, match="alpha"):
        check_alphas(lo, hi)


def test_alpha_u_one_allowed_and_lam_checks():
    assert check_alphas(0.01, 1.0) == (0.01, 1.0)
    assert check_lam(0.0) == 0.0 and check_lam(1) == 1.0
    for bad in (-0.01, 1.5):
        with pytest.raises(ValueError, match="lam"):
            check_lam(bad)


def test_selection_argument_validation():
    s = [torch.tensor([2.0, 1.0])]
    with pytest.raises(ValueError, match="exactly one"):
        global_rank_selection(s)
    with pytest.raises(ValueError, match="exactly one"):
        global_rank_selection(s, keep_ratio=0.5, drop=1)
    with pytest.raises(ValueError, match="keep_ratio"):
        global_rank_selection(s, keep_ratio=1.5)
    with pytest.raises(ValueError, match="drop"):
        global_rank_selection(s, drop=3)
    with pytest.raises(ValueError, match="min_rank"):
        global_rank_selection(s, keep_ratio=0.5, min_rank=0)
    with pytest.raises(ValueError, match="criterion"):
        global_rank_selection(s, keep_ratio=0.5, criterion="nope")
    with pytest.raises(ValueError, match="non-negative"):
        global_rank_selection([torch.tensor([1.0, -1.0])], keep_ratio=0.5)
    with pytest.raises(ValueError, match="1-D"):
        global_rank_selection([torch.ones(2, 2)], keep_ratio=0.5)
    with pytest.raises(TypeError, match="list"):
        global_rank_selection(torch.ones(3), keep_ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        uniform_rank_selection([4], 1.2)
    with pytest.raises(ValueError, match="energy"):
        energy_rank_selection(s, 0.0)


# ------------------------------------------------------------------ MACs budget
def linear_cost(sizes):
    """(m_l + n_l) * r * hw_l, capped at the dense cost m_l * n_l * hw_l (non-decreasing)."""
    def fn(l, r):
        m, n, hw = sizes[l]
        return min((m + n) * r, m * n) * hw
    return fn


@st.composite
def budget_problems(draw):
    svals = draw(spectra(max_layers=4, max_rank=10))
    sizes = [(s.numel() + draw(st.integers(0, 6)), s.numel(), draw(st.integers(1, 9))) for s in svals]
    frac = draw(st.floats(0.0, 1.0))
    min_rank = draw(st.integers(1, 4))
    return svals, sizes, frac, min_rank


@settings(max_examples=60, deadline=None)
@given(prob=budget_problems(), fixed=st.integers(0, 50))
def test_macs_budget_fits_and_is_maximal(prob, fixed):
    svals, sizes, frac, min_rank = prob
    fn = linear_cost(sizes)
    full = [s.numel() for s in svals]
    floors = [min(min_rank, R) for R in full]
    lo_cost = fixed + sum(fn(l, r) for l, r in enumerate(floors))
    hi_cost = fixed + sum(fn(l, r) for l, r in enumerate(full))
    budget = lo_cost + frac * (hi_cost - lo_cost)

    def cost(ranks):
        return fixed + sum(fn(l, r) for l, r in enumerate(ranks))

    ranks = ranks_for_macs_budget(svals, fn, budget, min_rank, fixed_macs=fixed)
    assert all(f <= r <= R for f, r, R in zip(floors, ranks, full))
    assert cost(ranks) <= budget
    for l in range(len(ranks)):     # adding any single rank exceeds the budget or is impossible
        if ranks[l] < full[l]:
            bumped = list(ranks)
            bumped[l] += 1
            assert cost(bumped) > budget

    # pure threshold (fill=False): a global selection; the next basis in global order overflows
    thr = ranks_for_macs_budget(svals, fn, budget, min_rank, fixed_macs=fixed, fill=False)
    assert cost(thr) <= budget and all(a <= b for a, b in zip(thr, ranks))
    n_keep = sum(thr)
    assert global_rank_selection(svals, drop=sum(full) - n_keep, min_rank=min_rank) == thr
    if n_keep < sum(full):
        nxt = global_rank_selection(svals, drop=sum(full) - n_keep - 1, min_rank=min_rank)
        assert cost(nxt) > budget


def test_macs_budget_full_and_floor_edges():
    svals = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 0.1])]
    fn = lambda l, r: 10 * r if l == 0 else r          # noqa: E731
    assert ranks_for_macs_budget(svals, fn, 1e9, min_rank=1) == [3, 2]
    assert ranks_for_macs_budget(svals, fn, 11, min_rank=1) == [1, 1]
    # threshold order: 3(a) 5(b) floors; pool 2(a), 1(a), 0.1(b); budget 13 fits only b's 0.1
    assert ranks_for_macs_budget(svals, fn, 13, min_rank=1, fill=False) == [1, 1]
    assert ranks_for_macs_budget(svals, fn, 13, min_rank=1) == [1, 2]


def test_macs_budget_below_floors_raises_with_numbers():
    svals = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([5.0, 0.1])]
    fn = lambda l, r: 10 * r                           # noqa: E731
    with pytest.raises(ValueError, match=r"budget=25 .*minimum achievable 50"):
        ranks_for_macs_budget(svals, fn, 25, min_rank=5)
    with pytest.raises(ValueError, match="budget"):
        ranks_for_macs_budget(svals, fn, -1.0)
    with pytest.raises(TypeError, match="layer_macs_fn"):
        ranks_for_macs_budget(svals, 3, 100.0)


# ------------------------------------------------------------------ matricization
def test_dn_matrix_entries_match_definition():
    O, I, kh, kw = 3, 2, 3, 2
    w = torch.arange(O * I * kh * kw, dtype=F64).reshape(O, I, kh, kw)
    ch, sp = dn_matrix(w, "channel"), dn_matrix(w, "spatial")
    assert ch.shape == (kh * kw * I, O) and sp.shape == (kw * I, kh * O)
    for o in range(O):
        for c in range(I):
            for h in range(kh):
                for x in range(kw):
                    assert ch[(h * kw + x) * I + c, o] == w[o, c, h, x]
                    assert sp[x * I + c, h * O + o] == w[o, c, h, x]
    for scheme in ("channel", "spatial"):
        assert torch.equal(dn_unmatrix(dn_matrix(w, scheme), w.shape, scheme), w)
    lin = torch.randn(4, 7)
    assert torch.equal(dn_matrix(lin, "spatial"), lin.T)
    assert torch.equal(dn_unmatrix(lin.T, lin.shape, "channel"), lin)
    with pytest.raises(ValueError, match="scheme"):
        dn_matrix(w, "tucker")
    with pytest.raises(ValueError, match="shape"):
        dn_unmatrix(ch, w.shape, "spatial")


CONV_CASES = [((3, 3), 1, 0), ((3, 3), 1, 1), ((3, 3), 2, 1), ((3, 3), 2, 0),
              ((1, 1), 1, 0), ((1, 1), 2, 0), ((3, 5), (2, 1), (1, 2))]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("kernel,stride,padding", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_factor_convs_reproduce_rank_r_conv(scheme, kernel, stride, padding, bias):
    g = torch.Generator().manual_seed(0)
    O, I = 6, 4
    w = torch.randn(O, I, *kernel, dtype=F64, generator=g)
    b = torch.randn(O, dtype=F64, generator=g) if bias else None
    x = torch.randn(1, I, 7, 6, dtype=F64, generator=g)
    mat = dn_matrix(w, scheme)
    for r in sorted({2, min(mat.shape)}):
        w_r = dn_unmatrix(truncated_svd_reconstruct(mat, r), w.shape, scheme)
        want = F.conv2d(x, w_r, b, stride=stride, padding=padding)
        fc = dn_factor_convs(w, b, r, scheme, dict(stride=stride, padding=padding))
        got = fc.to_sequential()(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        if scheme == "spatial":
            assert fc.first_weight.shape == (r, I, 1, kernel[1])
            assert fc.second_weight.shape == (O, r, kernel[0], 1)
        else:
            assert fc.first_weight.shape == (r, I, *kernel)
            assert fc.second_weight.shape == (O, r, 1, 1)
    # full rank reproduces the original conv; functional use of the returned kwargs agrees
    torch.testing.assert_close(got, F.conv2d(x, w, b, stride=stride, padding=padding),
                               rtol=1e-9, atol=1e-9)
    k1, k2 = fc.first_kwargs, fc.second_kwargs
    y = F.conv2d(x, fc.first_weight, None, k1["stride"], k1["padding"], k1["dilation"])
    y = F.conv2d(y, fc.second_weight, fc.bias, k2["stride"], k2["padding"], k2["dilation"])
    torch.testing.assert_close(y, got, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("kwargs", [dict(padding=1, padding_mode="reflect"),
                                    dict(padding=(2, 1), dilation=(2, 1), stride=(1, 2),
                                         padding_mode="circular"),
                                    dict(padding="same"), dict(padding="valid", stride=2)])
def test_factorize_conv2d_module(scheme, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, **kwargs).double()
    x = torch.randn(2, 4, 10, 9, dtype=F64)
    mat = dn_matrix(conv.weight.detach(), scheme)
    r = 2
    w_r = dn_unmatrix(truncated_svd_reconstruct(mat, r), conv.weight.shape, scheme)
    ref = nn.Conv2d(4, 5, 3, **kwargs).double()
    with torch.no_grad():
        ref.weight.copy_(w_r)
        ref.bias.copy_(conv.bias)
    seq = factorize_conv2d(conv, r, scheme)
    assert all(type(m) is nn.Conv2d for m in seq)
    torch.testing.assert_close(seq(x), ref(x), rtol=1e-10, atol=1e-10)


def test_factor_convs_validation():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="rank"):
        dn_factor_convs(w, None, 5, "channel")          # channel view is (27, 4)
    with pytest.raises(ValueError, match="rank"):
        dn_factor_convs(w, None, 0, "spatial")
    with pytest.raises(ValueError, match="groups"):
        dn_factor_convs(w, None, 2, "channel", dict(groups=3))
    with pytest.raises(ValueError, match="unknown keys"):
        dn_factor_convs(w, None, 2, "channel", dict(strides=2))
    with pytest.raises(ValueError, match="bias"):
        dn_factor_convs(w, torch.zeros(3), 2, "channel")
    with pytest.raises(ValueError, match="Conv2d weight"):
        dn_factor_convs(torch.randn(4, 3), None, 2, "channel")


def test_dn_factor_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, dtype=F64, generator=g)
    b = torch.randn(5, dtype=F64, generator=g)
    first, second, bias = dn_factor_linear(w, b, 3)
    assert first.shape == (3, 8) and second.shape == (5, 3)
    torch.testing.assert_close(second @ first, truncated_svd_reconstruct(w, 3))
    torch.testing.assert_close(bias, b)


# ------------------------------------------------- Proposition 1 through the conv view
def _conv_errors(w, x, scheme, stride):
    y = F.conv2d(x, w, stride=stride, padding=1)
    mat = dn_matrix(w, scheme)
    errs = [float(((y - F.conv2d(x, dn_unmatrix(truncated_svd_reconstruct(mat, r), w.shape, scheme),
                                 stride=stride, padding=1)) ** 2).sum())
            for r in range(1, min(mat.shape) + 1)]
    return errs, 1e-10 * float((y ** 2).sum())


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), stride=st.sampled_from([1, 2]))
def test_prop1_channel_conv_output_error_monotone_in_rank(seed, stride):
    """Channel-wise view: every conv output pixel is M^T patch, so Prop. 1 applies to the whole
    feature map: ||y - y_hat(r)||^2 is non-increasing in r and 0 at full rank."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, 3, 3, dtype=F64, generator=g)
    x = torch.randn(1, 3, 6, 6, dtype=F64, generator=g)
    errs, tol = _conv_errors(w, x, "channel", stride)
    assert all(a >= b - tol for a, b in zip(errs, errs[1:]))
    assert errs[-1] <= tol


def test_prop1_does_not_extend_to_spatial_view():
    """Spatial-wise view: an output pixel is sum_h (block h of M^T) applied to a different input
    row-patch per h, not M^T of one vector, so Prop. 1's argument does not apply and the conv
    output error can rise with the rank (happens for ~10 % of random 3x3 kernels)."""
    found = False
    for seed in range(150):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(5, 3, 3, 3, dtype=F64, generator=g)
        x = torch.randn(1, 3, 6, 6, dtype=F64, generator=g)
        errs, tol = _conv_errors(w, x, "spatial", 2)
        if any(a < b - tol for a, b in zip(errs, errs[1:])):
            found = True
            break
    assert found
    assert errs[-1] <= tol       # full rank is still exact


# ------------------------------------------------- one home for the rules (admm_compress.ranks)
@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), cut=st.integers(0, 60))
def test_largest_within_is_the_last_fitting_count(n, cut):
    from admm_compress.ranks import largest_within

    calls = []

    def fits(t):
        calls.append(t)
        return t <= cut

    assert largest_within(n, fits) == min(n, cut)      # brute force: max {t in [0, n] : t <= cut}
    assert len(calls) <= 2 + max(1, n).bit_length()    # bisection, not a scan


def test_selection_rules_have_one_home():
    """The DN module, LoRITa's GSVT and TRP's energy rule use admm_compress.ranks / functional."""
    import admm_compress.ranks as ranks
    from admm_compress import functional
    from admm_compress.methods._decomposable_net import rank_selection as dn

    for name in ("global_rank_selection", "energy_rank_selection", "ranks_for_macs_budget",
                 "uniform_rank_selection", "num_dropped", "ranks_from_order"):
        assert getattr(dn, name) is getattr(ranks, name)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(7, generator=g, dtype=F64).sort(descending=True).values
        e = float(torch.rand((), generator=g))
        assert energy_rank_selection([s], e, min_rank=1) == [int(functional.energy_rank(s, e, 1))]
