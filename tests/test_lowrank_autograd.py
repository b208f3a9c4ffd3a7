"""Tests of the differentiable truncated SVD (Decomposable-Net App. A, Eq. 5-11, Prop. 1)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admm_compress.lowrank_autograd import (
    TruncatedSVD,
    check_lam,
    combine_gradients,
    rescale_to_norm,
    thin_svd,
    truncated_svd_grad,
    truncated_svd_reconstruct,
)

F64 = torch.float64


def naive_reconstruct(w, r):
    """Rank-r truncation built from torch.linalg.svd; differentiated by torch's SVD backward."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return (U[..., :, :r] * S[..., None, :r]) @ Vh[..., :r, :]


def matrix_with_spectrum(s, m, n, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype))
    return (U * torch.as_tensor(s, dtype=dtype)) @ V.mT


def separated_spectrum(k, ratio=0.5, top=6.0):
    # consecutive squared ratios ratio^2 = 0.25 << 0.99: the clipping never acts
    return [top * ratio ** i for i in range(k)]


def reference_grad(w, G, r, clip):
    """Independent elementwise implementation of the clipped derivative in the full SVD basis.

    In the bases of the full SVD W = U_f Sigma V_f^T, with Ghat = U_f^T G V_f, the adjoint of the
    derivative of P_r is C with C_ij = Ghat_ij for i, j < r; for kept i and dropped k:
    C_ik = f1 Ghat_ik + f2 Ghat_ki and C_ki = f1 Ghat_ki + f2 Ghat_ik, rho^2 = min(s_k^2/s_i^2, clip),
    f1 = 1/(1-rho^2), f2 = rho f1 (singular values beyond min(m, n) are 0; missing entries are 0);
    every other entry is 0.
    """
    m, n = w.shape
    Uf, S, Vhf = torch.linalg.svd(w, full_matrices=True)
    Vf = Vhf.mT
    sig = torch.zeros(max(m, n), dtype=w.dtype)
    sig[: S.numel()] = S
    Gh = Uf.mT @ G @ Vf
    C = torch.zeros(m, n, dtype=w.dtype)
    for i in range(m):
        for j in range(n):
            if i < r and j < r:
                C[i, j] = Gh[i, j]
            elif i < r <= j or j < r <= i:
                keep, drop = (i, j) if i < r else (j, i)
                si, sk = float(sig[keep]), float(sig[drop])
                rho2 = min(sk * sk / (si * si), clip) if si > 0 else clip
                f1 = 1.0 / (1.0 - rho2)
                f2 = math.sqrt(rho2) * f1
                other = Gh[j, i] if (j < m and i < n) else 0.0
                C[i, j] = f1 * Gh[i, j] + f2 * other
    return Uf @ C @ Vf.mT


SHAPES = [(6, 4, 2), (4, 6, 2), (5, 5, 3), (7, 3, 1), (3, 8, 2), (6, 6, 5)]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_gradcheck_exact_when_clipping_inactive(m, n, r):
    w = matrix_with_spectrum(separated_spectrum(min(m, n)), m, n, seed=m * 10 + n)
    x = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: truncated_svd_reconstruct(a, r), (x,))
    # and equal to autograd through torch.linalg.svd of the naive reconstruction
    G = torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    x1, x2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    (truncated_svd_reconstruct(x1, r) * G).sum().backward()
    (naive_reconstruct(x2, r) * G).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("clip", [0.99, 0.5])
def test_backward_matches_elementwise_reference_with_clipping_active(m, n, r, clip):
    k = min(m, n)
    s = separated_spectrum(k)
    s[r] = s[r - 1] * 0.999          # sigma_{r+1}^2 / sigma_r^2 ~ 0.998 > clip: clipped
    w = matrix_with_spectrum(s, m, n, seed=3)
    G = torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(2))
    U, S, Vh = thin_svd(w)
    got = truncated_svd_grad(G, U, S, Vh, r, clip)
    torch.testing.assert_close(got, reference_grad(w, G, r, clip), rtol=1e-9, atol=1e-9)


def test_forward_is_best_rank_r_approximation():
    w = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    for r in range(0, 6):
        wr = truncated_svd_reconstruct(w, r)
        assert int(torch.linalg.matrix_rank(wr)) == r
        s = torch.linalg.svdvals(w)
        # Eckart-Young: ||W - W_r||_F^2 = sum_{i>r} s_i^2
        torch.testing.assert_close(((w - wr) ** 2).sum(), (s[r:] ** 2).sum())


@pytest.mark.parametrize("spectrum,r", [
    ([3.0, 2.0, 2.0, 2.0, 0.0, 0.0], 2),   # repeated across the cut
    ([3.0, 2.0, 2.0, 2.0, 0.0, 0.0], 5),   # a kept zero singular value
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3),   # fully degenerate
    ([0.0] * 6, 2),                         # zero matrix
])
def test_gradient_finite_and_bounded_for_degenerate_spectra(spectrum, r):
    clip = 0.99
    w = matrix_with_spectrum(spectrum, 8, 6, seed=5)
    G = torch.randn(8, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    for dtype in (F64, torch.float32):
        x = w.detach().to(dtype).clone().requires_grad_()
        (truncated_svd_reconstruct(x, r, clip=clip) * G.to(dtype)).sum().backward()
        assert torch.isfinite(x.grad).all()
        # every coefficient in Eq. 9-11 is <= 1/(1-clip) after clipping
        bound = (2 + 4 / (1 - clip)) * G.norm()
        assert x.grad.to(F64).norm() <= bound


def test_clipping_keeps_gradient_bounded_as_gap_closes():
    norms = []
    for gap in (1e-3, 1e-6, 1e-10):
        w = matrix_with_spectrum([4.0, 2.0, 2.0 - gap, 1.0], 6, 4, seed=6)
        G = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
        x = w.clone().requires_grad_()
        (truncated_svd_reconstruct(x, 2) * G).sum().backward()
        norms.append(float(x.grad.norm()))
    assert all(math.isfinite(v) for v in norms)
    assert max(norms) / min(norms) < 1.01   # ratio already clipped at gap 1e-3: no blow-up


@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)])
def test_rank_at_least_full_gives_identity(m, n):
    w = torch.randn(2, m, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    G = torch.randn(2, m, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    for r in (min(m, n), min(m, n) + 3):
        x = w.clone().requires_grad_()
        out = truncated_svd_reconstruct(x, r)
        assert out is not x
        torch.testing.assert_close(out, w, rtol=0, atol=0)
        (out * G).sum().backward()
        torch.testing.assert_close(x.grad, G, rtol=0, atol=0)
    # and the general formula agrees at r = min(m, n)
    U, S, Vh = thin_svd(w)
    torch.testing.assert_close(truncated_svd_grad(G, U, S, Vh, min(m, n)), G)


def test_rank_zero_gives_zero_and_zero_gradient():
    x = torch.randn(4, 3, dtype=F64).requires_grad_()
    out = truncated_svd_reconstruct(x, 0)
    assert out.abs().max() == 0
    out.sum().backward()
    assert x.grad.abs().max() == 0


def test_batched_equals_per_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 6, 4, dtype=F64, generator=g)
    G = torch.randn(2, 3, 6, 4, dtype=F64, generator=g)
    x = w.clone().requires_grad_()
    out = truncated_svd_reconstruct(x, 2)
    (out * G).sum().backward()
    for i in range(2):
        for j in range(3):
            xi = w[i, j].clone().requires_grad_()
            oi = truncated_svd_reconstruct(xi, 2)
            (oi * G[i, j]).sum().backward()
            torch.testing.assert_close(out[i, j], oi)
            torch.testing.assert_close(x.grad[i, j], xi.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_computes_in_float32_and_casts_back(dtype):
    w32 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    x = w32.to(dtype).requires_grad_()
    out = truncated_svd_reconstruct(x, 2)
    assert out.dtype == dtype
    ref = naive_reconstruct(x.detach().float(), 2)
    torch.testing.assert_close(out.detach().float(), ref, rtol=0, atol=float(out.detach().abs().max()) * 1e-2)
    out.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_precomputed_svd_is_reused():
    w = torch.randn(5, 4, dtype=F64)
    svd = thin_svd(w)
    torch.testing.assert_close(truncated_svd_reconstruct(w, 2, svd=svd), truncated_svd_reconstruct(w, 2))
    with pytest.raises(ValueError, match="svd shapes"):
        truncated_svd_reconstruct(w, 2, svd=thin_svd(w.mT))
    with pytest.raises(TypeError, match="svd"):
        truncated_svd_reconstruct(w, 2, svd=svd[:2])


def test_does_not_modify_input():
    w = torch.randn(5, 4)
    w0 = w.clone()
    truncated_svd_reconstruct(w, 2)
    assert torch.equal(w, w0)


def test_argument_validation():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd_reconstruct(w, -1)
    with pytest.raises(TypeError, match="rank"):
        truncated_svd_reconstruct(w, 1.5)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="clip"):
            truncated_svd_reconstruct(w, 1, clip=bad)
    with pytest.raises(TypeError, match="floating"):
        truncated_svd_reconstruct(torch.ones(3, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="dimensions"):
        truncated_svd_reconstruct(torch.ones(3), 1)
    with pytest.raises(TypeError, match="Tensor"):
        truncated_svd_reconstruct([[1.0]], 1)


# ------------------------------------------------------------------- Proposition 1
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 7), n=st.integers(1, 7), batch=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_prop1_layer_output_error_monotone_in_rank(m, n, batch, seed):
    """Prop. 1: with y = W^T x and y_hat(r) = W(r)^T x (W(r) the rank-r truncated SVD of W),
    ||y - y_hat(1)||^2 >= ... >= ||y - y_hat(R)||^2 = 0 for EVERY input x, and (Eq. 13) the
    decrease from r to r+1 is exactly (v_{r+1}^T y)^2, v = right singular vectors of W."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, dtype=F64, generator=g)
    X = torch.randn(batch, m, dtype=F64, generator=g)
    Y = X @ W
    R = min(m, n)
    _, _, Vh = torch.linalg.svd(W, full_matrices=False)
    errs = []
    for r in range(0, R + 1):
        err = ((Y - X @ truncated_svd_reconstruct(W, r)) ** 2).sum(-1)   # per sample
        errs.append(err)
    scale = float((Y ** 2).sum()) + 1.0
    for r in range(R):
        assert bool((errs[r] >= errs[r + 1] - 1e-10 * scale).all())
        dec = (Y @ Vh[r]) ** 2                   # (v_{r+1}^T y)^2 with 0-based row r
        torch.testing.assert_close(errs[r] - errs[r + 1], dec, rtol=1e-7, atol=1e-9 * scale)
    assert float(errs[R].max()) <= 1e-18 * scale ** 2 + 1e-20


# ------------------------------------------------------------ joint gradient Eq. 1 / 12
def test_rescale_and_combine_gradients():
    g = torch.Generator().manual_seed(0)
    gf = torch.randn(4, 3, generator=g)
    gl = 100 * torch.randn(4, 3, generator=g)
    r = rescale_to_norm(gl, gf)
    torch.testing.assert_close(r.norm(), gf.norm())
    torch.testing.assert_close(r / r.norm(), gl / gl.norm())
    torch.testing.assert_close(combine_gradients(gf, gl, 0.5), 0.5 * gf + 0.5 * r)
    torch.testing.assert_close(combine_gradients(gf, gl, 0.0), gf)
    torch.testing.assert_close(combine_gradients(gf, gl, 1.0, rescale=False), gl)
    assert torch.isfinite(rescale_to_norm(torch.zeros(2), torch.ones(2))).all()


@pytest.mark.parametrize("lam", [-0.1, 1.01, float("nan")])
def test_lam_outside_unit_interval_raises(lam):
    with pytest.raises(ValueError, match="lam"):
        check_lam(lam)
    with pytest.raises(ValueError, match="lam"):
        combine_gradients(torch.ones(2), torch.ones(2), lam)


def test_function_apply_directly():
    w = torch.randn(5, 4, dtype=F64, requires_grad=True)
    out = TruncatedSVD.apply(w, 2, 0.99, None)
    torch.testing.assert_close(out, naive_reconstruct(w.detach(), 2))
