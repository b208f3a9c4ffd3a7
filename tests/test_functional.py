"""The pure tensor functions of admm_compress.functional against definitions and brute force."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_compress import functional as F

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


# ------------------------------------------------------------ scalar Schatten prox
def _obj(z, y, lam, p):
    return 0.5 * (z - y) ** 2 + lam * z.abs() ** p


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 2 / 3, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("lam", [0.05, 0.7, 3.0])
def test_scalar_prox_vs_grid(p, lam):
    """The prox value is never worse than the best point of a dense grid, and is close to it."""
    y = torch.linspace(-8.0, 8.0, 81, dtype=torch.float64)
    z = F.prox_power(y, lam, p)
    grid = torch.linspace(0.0, 8.0, 20_001, dtype=torch.float64)   # step 4e-4
    f = _obj(grid[None, :], y.abs()[:, None], lam, p)
    fmin, arg = f.min(dim=1)
    fz = _obj(z.abs(), y.abs(), lam, p)
    assert bool((fz <= fmin + 1e-12).all())
    # same sign as y (or zero), no larger than |y|
    assert bool((z * y >= 0).all()) and bool((z.abs() <= y.abs()).all())
    # away from the threshold (where 0 and z_T tie) the minimizer is unique: close to the grid's
    thr = F.gst_threshold(lam, p) if p < 1 else lam
    far = (y.abs() - thr).abs() > 1e-2
    assert bool(((z.abs() - grid[arg]).abs()[far] <= 2e-3).all())


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_gst_threshold_is_the_tie_point(p):
    lam = 0.8
    t = F.gst_threshold(lam, p)
    zT = (2 * lam * (1 - p)) ** (1 / (2 - p))
    t64 = torch.tensor(t, dtype=torch.float64)
    # at |y| = tau_GST, z_T is a stationary point with the same objective as 0
    assert math.isclose(zT - t + lam * p * zT ** (p - 1), 0.0, abs_tol=1e-12)
    assert math.isclose(float(_obj(torch.tensor(zT, dtype=torch.float64), t64, lam, p)),
                        float(_obj(torch.tensor(0.0, dtype=torch.float64), t64, lam, p)), rel_tol=1e-12)
    below = F.prox_power(torch.tensor([t * (1 - 1e-9)], dtype=torch.float64), lam, p)
    above = F.prox_power(torch.tensor([t * (1 + 1e-9)], dtype=torch.float64), lam, p)
    assert float(below) == 0.0 and math.isclose(float(above), zT, rel_tol=1e-4)


@SETTINGS
@given(lam=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31 - 1))
def test_half_thresholding_equals_general_solver(lam, seed):
    y = torch.randn(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 * lam ** (2 / 3)
    a = F.prox_power_half(y, lam)
    b = F.prox_power_newton(y, lam, 0.5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(y.abs().max()))


@SETTINGS
@given(p=st.floats(0.05, 0.99), lam=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31 - 1))
def test_newton_root_to_machine_precision(p, lam, seed):
    y = torch.randn(100, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 * F.gst_threshold(lam, p)
    z = F.prox_power_newton(y, lam, p).abs()
    a = y.abs()
    nz = z > 0
    g = z[nz] - a[nz] + lam * p * z[nz] ** (p - 1)     # stationarity
    assert bool((g.abs() <= 64 * torch.finfo(torch.float64).eps * a[nz]).all())
    assert bool((a[~nz] <= F.gst_threshold(lam, p) * (1 + 1e-12)).all())
    # the prox is monotone in |y| (what makes the spectral prox exact)
    order = a.argsort()
    assert bool((z[order][1:] >= z[order][:-1] - 1e-15).all())


def test_prox_power_dtype_and_soft_threshold():
    y = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    torch.testing.assert_close(F.prox_power(y, 1.0, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))
    for p in (0.5, 0.3):
        out = F.prox_power(y, 1.0, p)
        assert out.dtype == torch.float32
    assert torch.equal(F.prox_power_newton(y, 0.0, 0.3), y)


# ------------------------------------------------------------------- low rank
def test_rank_from_ratio():
    assert F.rank_from_ratio(0.25, 16, 144) == 4
    assert F.rank_from_ratio(1 - 0.75, 16, 144) == 4     # 0.25000000000000006 * 16
    assert F.rank_from_ratio(0.3, 10, 10) == 3           # 2.9999999999999996 guarded
    assert F.rank_from_ratio(0.01, 10, 10) == 1
    assert F.rank_from_ratio(1.0, 7, 3) == 3


def test_energy_rank_definition():
    s = torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # energies: 16, 4, 1, 1 (total 22); 1, 1, 1, 1 (total 4)
    assert F.energy_rank(s, 0.5).tolist() == [1, 2, 1]
    assert F.energy_rank(s, 0.9).tolist() == [2, 4, 1]     # 20 >= 19.8; 3.6 -> 4
    assert F.energy_rank(s, 0.75).tolist() == [2, 3, 1]    # 16 < 16.5 <= 20; 2 < 3 <= 3
    assert F.energy_rank(s, 1.0).tolist() == [4, 4, 1]
    assert F.energy_rank(s, 0.5, min_rank=3).tolist() == [3, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_compute_in_float32(dtype):
    x = torch.randn(3, 6, 5).to(dtype)
    y = F.project_rank(x, 2)
    assert y.dtype == dtype and y.shape == x.shape
    U, s, Vh = F.truncated_svd(x, 2)
    assert s.dtype == F.compute_dtype(dtype) and U.shape == (3, 6, 2) and Vh.shape == (3, 2, 5)
    ref = F.project_rank(x.double(), 2).to(dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), energy=st.floats(0.3, 1.0))
def test_lowrank_factors_match_projection(seed, energy):
    x = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = torch.rand(5, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.1
    kw = dict(energy=energy, energy_transfer=True, metric=d)
    A, B = F.lowrank_factors(x, **kw)
    torch.testing.assert_close(A @ B, F.project_rank(x, **kw))
    r = F.energy_rank(torch.linalg.svdvals(d[:, None] * x), energy)
    assert A.shape[-1] == int(r.max())
    assert [int(torch.linalg.matrix_rank(m, atol=1e-10)) for m in A @ B] == r.tolist()


# ---------------------------------------------------------------- cardinality
@SETTINGS
@given(n=st.integers(1, 40), k=st.integers(1, 45), seed=st.integers(0, 2**31 - 1))
def test_topk_indices_exact_k_deterministic(n, k, seed):
    a = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed)).double()
    idx = F.topk_indices(a, k)
    assert idx.numel() == min(n, k) and idx.dtype == torch.int64
    assert bool((idx[1:] > idx[:-1]).all())
    # reference: stable sort by (-a, index)
    ref = sorted(range(n), key=lambda i: (-float(a[i]), i))[:k]
    assert idx.tolist() == sorted(ref)


def test_group_topk():
    x = torch.zeros(4, 3, 2)
    x[1] = 1.0
    x[3] = -2.0
    x[0, 0, 0] = 0.1
    y = F.project_group_topk(x, 2, 0)
    assert torch.equal(y[[1, 3]], x[[1, 3]]) and torch.equal(y[[0, 2]], torch.zeros(2, 3, 2))
    assert F.group_topk_indices(x, 2, 0).tolist() == [1, 3]
    assert F.group_topk_indices(torch.ones(2, 5), 3, 1).tolist() == [0, 1, 2]   # ties: lowest index


# ---------------------------------------------------------------- tensor train
def test_tt_effective_ranks():
    assert F.tt_effective_ranks((2, 3, 4), (100, 100)) == (2, 4)
    assert F.tt_effective_ranks((9, 16, 16), (10, 10)) == (9, 10)
    assert F.tt_effective_ranks((4, 4, 4, 4), (3, 20, 3)) == (3, 12, 3)


def test_tt_svd_uses_pytorch_backend_locally():
    import tensorly as tl

    before = tl.get_backend()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    cores = F.tt_svd(x, (2, 3))
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float64 for c in cores)
    assert [tuple(c.shape) for c in cores] == [(1, 3, 2), (2, 4, 3), (3, 5, 1)]
    assert tl.get_backend() == before
    # reconstruction is differentiable in the cores
    cores = [c.clone().requires_grad_() for c in cores]
    F.tt_to_tensor(cores).square().sum().backward()
    assert all(c.grad is not None for c in cores)
    y = F.project_tt(x.float(), (2, 3))
    assert y.dtype == torch.float32 and y.shape == x.shape


def test_schatten_value_zero_singular_values():
    x = torch.zeros(3, 4, requires_grad=True)
    v = F.schatten_value(x, 0.5)
    v.backward()
    assert float(v.detach()) == 0.0 and bool(torch.isfinite(x.grad).all())


# ------------------------------------------- one sqrt(S) split, one numerical-rank threshold (issue 16)
def test_sqrt_split_is_balanced_and_exact():
    """A = U sqrt(S), B = sqrt(S) Vh: A @ B = U S Vh and A^T A = B B^T = S (orthonormal U, V)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(x, full_matrices=False)
    A, B = F.sqrt_split(U, s, Vh)
    torch.testing.assert_close(A @ B, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(A.mT @ A, torch.diag_embed(s), rtol=0, atol=1e-12)
    torch.testing.assert_close(B @ B.mT, torch.diag_embed(s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numerical_rank_matches_torch_matrix_rank(dtype):
    """The one threshold max(m, n) * eps * s_max is torch.linalg.matrix_rank's default rule."""
    g = torch.Generator().manual_seed(1)
    for r in (1, 3, 6):
        x = (torch.randn(9, r, generator=g, dtype=torch.float64) @ torch.randn(r, 6, generator=g,
                                                                                dtype=torch.float64)).to(dtype)
        s = torch.linalg.svdvals(x)
        assert F.numerical_rank_of(s, x.shape, dtype) == int(torch.linalg.matrix_rank(x)) == r
        assert F.numerical_rank(x) == r
