"""Robust SVD entry point (fallbacks) and the randomized truncated SVD option of LowRank."""
import logging

import pytest
import torch

from admm_compress import functional as F
from admm_compress.sets import LowRank

LOGGER = "admm_compress.functional"


def decaying(m, n, rate, batch=(), dtype=torch.float64, seed=0):
    """``U diag(rate**i) V^T`` with random orthonormal U, V; returns the matrix and its spectrum."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, q, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, q, generator=g, dtype=torch.float64)).Q
    s = rate ** torch.arange(q, dtype=torch.float64)
    return ((U * s.unsqueeze(-2)) @ V.mT).to(dtype), s


def eckart_young_error(s, r):
    """``||X - Pi_r(X)||_F = sqrt(sum_{i>r} s_i^2)`` from the known spectrum."""
    return float(torch.sqrt((s[r:] ** 2).sum()))


def brute_truncation(x, r):
    """Rank-r truncation from the float64 SVD (reference, computed before any patching)."""
    U, s, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (U[..., :, :r] * s[..., None, :r]) @ Vh[..., :r, :]


class FlakySVD:
    """Stands in for a ``torch.linalg`` routine: the first ``fails`` calls fail, then delegate."""

    def __init__(self, real, fails, mode="raise"):
        self.real, self.fails, self.mode = real, fails, mode
        self.calls = []

    def __call__(self, a, *args, **kw):
        self.calls.append((tuple(a.shape), a.dtype))
        if len(self.calls) <= self.fails:
            if self.mode == "raise":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            out = self.real(a, *args, **kw)
            if isinstance(out, tuple):
                return tuple(torch.full_like(o, float("nan")) for o in out)
            return torch.full_like(out, float("nan"))
        return self.real(a, *args, **kw)


# ============================================================ robust SVD: fallbacks
@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_float64_retry_gives_correct_truncated_svd(monkeypatch, caplog, mode):
    x, _ = decaying(12, 9, 0.7, dtype=torch.float32)
    ref = brute_truncation(x, 4)
    flaky = FlakySVD(torch.linalg.svd, fails=1, mode=mode)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        U, s, Vh = F.truncated_svd(x, 4)
    assert U.dtype == s.dtype == Vh.dtype == torch.float32
    assert U.shape == (12, 4) and s.shape == (4,) and Vh.shape == (4, 9)
    torch.testing.assert_close(((U * s) @ Vh).double(), ref, atol=1e-5, rtol=1e-5)
    assert [c[1] for c in flaky.calls] == [torch.float32, torch.float64]
    recs = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert "(12, 9)" in msg and "float64" in msg
    assert ("non-finite" in msg) == (mode == "nan")


def test_jitter_after_float64_failure(monkeypatch, caplog):
    x, s = decaying(10, 7, 0.6, dtype=torch.float32)
    ref = brute_truncation(x, 3)
    flaky = FlakySVD(torch.linalg.svd, fails=2)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y = F.project_rank(x, 3)
    # the jitter moves the matrix by 1e-10 * ||x||_F * sqrt(7): invisible in float32
    torch.testing.assert_close(y.double(), ref, atol=1e-6, rtol=1e-5)
    assert y.dtype == torch.float32
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(msgs) == 2
    assert "retrying in torch.float64" in msgs[0]
    assert "jitter" in msgs[1] and "(10, 7)" in msgs[1]
    assert len(flaky.calls) == 3


def test_jitter_is_added_to_the_leading_square_block(monkeypatch):
    x = torch.zeros(2, 5, 3, dtype=torch.float64)
    x[0] = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    seen = []
    real = torch.linalg.svd

    def fake(a, full_matrices=False):
        seen.append(a.detach().clone())
        if len(seen) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", fake)
    F.svd(x)
    assert len(seen) == 2          # float64 input: straight to the jitter
    d = seen[1] - x
    j = F.SVD_JITTER[torch.float64] * torch.linalg.matrix_norm(x)
    expect = torch.zeros_like(x)
    for b in range(2):
        expect[b, :3, :3] = j[b] * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(d, expect, atol=1e-13, rtol=0)  # x + j I - x, up to rounding
    assert float(j[0]) > 1e-9 and float(j[1]) == 0.0


def test_all_attempts_fail_raise_clear_error(monkeypatch):
    flaky = FlakySVD(torch.linalg.svd, fails=10)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with pytest.raises(torch.linalg.LinAlgError, match=r"shape \(6, 4\).*jitter"):
        F.svd(torch.randn(6, 4))
    assert len(flaky.calls) == 3


def test_other_errors_propagate_without_retry(monkeypatch):
    calls = []

    def boom(a, full_matrices=False):
        calls.append(1)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        F.svd(torch.randn(4, 4))
    assert len(calls) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_raises_value_error_without_jitter(monkeypatch, caplog, bad):
    x = torch.randn(2, 6, 5)
    x[1, 2, 3] = bad
    flaky = FlakySVD(torch.linalg.svd, fails=0)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(ValueError, match="non-finite"):
            F.svd(x)
        with pytest.raises(ValueError, match="non-finite"):
            F.svdvals(x)
        with pytest.raises(ValueError, match="non-finite"):
            F.randomized_svd(x, 2)
    # svd: 1 call, svdvals: unpatched, randomized: 1 inner svd (svd_lowrank) -- no retries
    assert len(flaky.calls) == 2
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_svdvals_fallback_and_gradient(monkeypatch, caplog):
    x = torch.randn(7, 5, dtype=torch.float32, requires_grad=True)
    ref = torch.linalg.svdvals(x.detach().double())
    flaky = FlakySVD(torch.linalg.svdvals, fails=1)
    monkeypatch.setattr(torch.linalg, "svdvals", flaky)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        v = F.schatten_value(x, 1.0)      # nuclear norm, through the fallback
    torch.testing.assert_close(v.double(), ref.sum(), rtol=1e-5, atol=1e-5)
    v.backward()
    U, _, Vh = torch.linalg.svd(x.detach().double(), full_matrices=False)
    torch.testing.assert_close(x.grad.double(), U @ Vh, rtol=1e-4, atol=1e-4)  # d||X||_* = U V^T
    assert any("svdvals" in r.getMessage() for r in caplog.records)


def test_lowrank_project_and_contains_survive_failures(monkeypatch):
    x, _ = decaying(8, 6, 0.5, batch=(3,), dtype=torch.float32)
    ref = brute_truncation(x, 2)
    monkeypatch.setattr(torch.linalg, "svd", FlakySVD(torch.linalg.svd, fails=1))
    monkeypatch.setattr(torch.linalg, "svdvals", FlakySVD(torch.linalg.svdvals, fails=1))
    s = LowRank(rank=2)
    y = s.project(x)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert s.contains(y)


def test_tt_svd_goes_through_the_fallbacks(monkeypatch, caplog):
    import logging

    from admm_compress import functional as F

    torch.manual_seed(0)
    x = torch.randn(6, 8, 5)
    ref = F.tt_to_tensor(F.tt_svd(x, (3, 4)))
    flaky = FlakySVD(torch.linalg.svd, fails=1)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with caplog.at_level(logging.WARNING, logger="admm_compress.functional"):
        got = F.tt_to_tensor(F.tt_svd(x, (3, 4)))
    assert len(flaky.calls) >= 2 and "float64" in caplog.text
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ============================================================ randomized truncated SVD
@pytest.mark.parametrize("rate", [0.9, 0.8])
@pytest.mark.parametrize("shape,r", [((300, 200), 20), ((120, 400), 10)])
def test_randomized_error_within_eckart_young_factor(rate, shape, r):
    x, s = decaying(*shape, rate)
    best = eckart_young_error(s, r)
    y = LowRank(rank=r, svd="randomized", niter=2).project(x)
    err = float(torch.linalg.matrix_norm(x - y))
    assert best <= err * (1 + 1e-9)            # Eckart-Young is a lower bound
    assert err <= 1.01 * best
    assert int(torch.linalg.matrix_rank(y)) <= r
    # the exact projection attains the bound
    ye = LowRank(rank=r).project(x)
    assert float(torch.linalg.matrix_norm(x - ye)) == pytest.approx(best, rel=1e-8)


def test_randomized_without_power_iterations_is_worse():
    """niter is really used: with slow decay, niter=0 is clearly suboptimal, niter=4 is not."""
    x, s = decaying(300, 200, 0.9)
    best = eckart_young_error(s, 50)
    e0 = float(torch.linalg.matrix_norm(x - LowRank(rank=50, svd="randomized", niter=0).project(x)))
    e4 = float(torch.linalg.matrix_norm(x - LowRank(rank=50, svd="randomized", niter=4).project(x)))
    assert e0 > 1.1 * best
    assert e4 <= 1.0001 * best


def test_randomized_recovers_exact_low_rank_matrix():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 30, generator=g,
                                                                             dtype=torch.float64)
    y = LowRank(rank=8, svd="randomized", oversample=0, niter=0).project(x)
    torch.testing.assert_close(y, x, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_broadcasts_keeps_shape_dtype(dtype):
    x, s = decaying(60, 50, 0.7, batch=(2, 3), dtype=dtype)
    r = 6
    y = LowRank(rank=r, svd="randomized").project(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    errs = torch.linalg.matrix_norm((x - y).double())
    best = eckart_young_error(s, r)
    assert bool((errs <= 1.01 * best + (1e-5 if dtype == torch.float32 else 0)).all())
    assert bool((torch.linalg.matrix_rank(y.double(), rtol=1e-5) <= r).all())
    torch.testing.assert_close(y.double(), brute_truncation(x, r),
                               atol=1e-4 if dtype == torch.float32 else 1e-8, rtol=0)


def test_randomized_energy_transfer_keeps_frobenius_norm():
    x, _ = decaying(80, 70, 0.5)
    y = LowRank(rank=5, svd="randomized", energy_transfer=True).project(x)
    ye = LowRank(rank=5, energy_transfer=True).project(x)
    assert float(torch.linalg.matrix_norm(y)) == pytest.approx(float(torch.linalg.matrix_norm(x)), rel=1e-12)
    torch.testing.assert_close(y, ye, atol=1e-10, rtol=0)


def test_randomized_metric_matches_exact():
    x, _ = decaying(64, 90, 0.6)
    d = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)
    s = LowRank(rank=6, svd="randomized")
    y = s.project(x, metric=d)
    ye = LowRank(rank=6).project(x, metric=d)
    torch.testing.assert_close(y, ye, atol=1e-8, rtol=0)
    U, V = s.factorize(x, metric=d)
    assert U.shape == (64, 6) and V.shape == (6, 90)
    torch.testing.assert_close(U @ V, y, atol=1e-10, rtol=0)


def test_randomized_leaves_global_rng_alone():
    x, _ = decaying(50, 40, 0.8)
    state = torch.get_rng_state()
    y1 = LowRank(rank=4, svd="randomized").project(x)
    assert torch.equal(torch.get_rng_state(), state)
    y2 = LowRank(rank=4, svd="randomized").project(x)
    assert torch.equal(y1, y2)


def test_auto_rule_and_dispatch(monkeypatch):
    assert F.use_randomized(300, 300, 75) and not F.use_randomized(300, 300, 76)
    assert not F.use_randomized(256, 4096, 8) and F.use_randomized(257, 4096, 8)
    s = LowRank(rank=10, svd="auto")
    assert s.svd_method_for((300, 280)) == "randomized"
    assert s.svd_method_for((64, 576)) == "exact"
    assert LowRank(energy=0.9, svd="auto").svd_method_for((400, 400)) == "exact"
    calls = []
    real = torch.svd_lowrank

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(torch, "svd_lowrank", counting)
    x, sp = decaying(300, 280, 0.85)
    y = s.project(x)
    assert len(calls) == 1 and calls[0][-2:] == (300, 280)
    assert float(torch.linalg.matrix_norm(x - y)) <= 1.01 * eckart_young_error(sp, 10)
    s.project(torch.randn(64, 576))
    assert len(calls) == 1


def test_exact_is_default_and_never_randomized(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("svd_lowrank called in exact mode")

    monkeypatch.setattr(torch, "svd_lowrank", forbidden)
    s = LowRank(rank=10)
    assert s.svd == "exact"
    x, _ = decaying(300, 300, 0.9)
    s.project(x)
    s.factorize(x)


def test_randomized_failure_falls_back_to_exact(monkeypatch, caplog):
    def broken(*a, **k):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch, "svd_lowrank", broken)
    x, sp = decaying(50, 40, 0.8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y = LowRank(rank=4, svd="randomized").project(x)
    assert float(torch.linalg.matrix_norm(x - y)) == pytest.approx(eckart_young_error(sp, 4), rel=1e-9)
    assert any("svd_lowrank" in r.getMessage() and "(50, 40)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw,name", [
    (dict(svd="fast"), "svd"), (dict(svd=None), "svd"),
    (dict(oversample=-1), "oversample"), (dict(niter=-2), "niter"),
])
def test_invalid_options_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        LowRank(rank=3, **kw)


def test_invalid_option_types_and_combinations():
    with pytest.raises(TypeError, match="niter"):
        LowRank(rank=3, niter=1.5)
    with pytest.raises(ValueError, match="energy"):
        LowRank(energy=0.9, svd="randomized")
    with pytest.raises(ValueError, match="method"):
        F.project_rank(torch.randn(4, 4), 2, method="fast")
    with pytest.raises(ValueError, match="rank"):
        F.truncated_svd(torch.randn(4, 4), None, method="randomized")


def test_repr_shows_option():
    assert repr(LowRank(rank=3)) == "LowRank(rank=3)"
    assert repr(LowRank(ratio=0.25, svd="randomized")) == "LowRank(ratio=0.25, svd='randomized')"
    assert repr(LowRank(rank=3, svd="auto", niter=4, oversample=5)) == \
        "LowRank(rank=3, svd='auto', oversample=5, niter=4)"


def test_solver_batched_path_with_randomized():
    """The Solver stacks equal-shaped conv weights and projects them in one call."""
    import admm_compress as ac

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.Conv2d(8, 8, 3))
    spec = ac.Constrain(torch.nn.Conv2d, LowRank(rank=2, svd="randomized", niter=4), view="channel")
    solver = ac.Solver(spec, mode="projection", every=1).prepare(model)
    solver.update()
    for m in model:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert int(torch.linalg.matrix_rank(w, rtol=1e-5)) <= 2
