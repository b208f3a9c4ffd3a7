"""ScaledGD preconditioning of low-rank factors and TT cores (``LowRank.factor_grams`` /
``TTRank.factor_grams`` through the one-factor maps of ``factor_grad_preconditioners``;
``parametrizations.precondition``'s batched hooks, ``ScaledGDHooks``; the ADMM ``Solver``'s
settle / fine-tuning epochs).

Checked against the definition: with ``W = U V`` and loss gradient ``G = dL/dW``, the chain
rule gives ``dL/dU = G V^T`` and ``dL/dV = U^T G``; ScaledGD's maps (damping 0) turn them into
``G V^T (V V^T)^{-1}`` and ``(U^T U)^{-1} U^T G``, whose first-order move of ``W`` is
``P_U G + G P_V`` (``P`` the orthogonal projections onto the column space of ``U`` and the row
space of ``V``).  Float64 with factors of condition number at most ~1e3 (singular values drawn
in [0.1, 10]): the solves lose at most ~1e3 x 1e-16, so ``rtol 1e-9`` is far from rounding and a
wrong map (a transposed solve, the other factor's Gram matrix) is off by O(1).
"""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import admm_compress as ac
from admm_compress.parametrizations import precondition, release, structure
from _helpers import scaled_gd_mixed_model as _mixed_model


def _factors(batch, m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.empty(*batch, r, dtype=torch.float64).uniform_(0.1, 10.0, generator=g)
    qa, _ = torch.linalg.qr(torch.randn(*batch, m, r, dtype=torch.float64, generator=g))
    qb, _ = torch.linalg.qr(torch.randn(*batch, n, r, dtype=torch.float64, generator=g))
    # unbalanced on purpose: U = Q_a diag(s), V = Q_b^T (the maps must not assume sqrt-balanced factors)
    U = (qa * s.unsqueeze(-2)).requires_grad_()
    V = qb.mT.contiguous().requires_grad_()
    G = torch.randn(*batch, m, n, dtype=torch.float64, generator=g)
    return U, V, G


def _proj(A):  # orthogonal projection onto the column space of A (full column rank)
    return A @ torch.linalg.solve(A.mT @ A, A.mT)


@settings(max_examples=40, deadline=None)
@given(batch=st.sampled_from([(), (3,), (2, 2)]), m=st.integers(2, 9), n=st.integers(2, 9),
       r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_scaled_gd_step_is_the_tangent_space_projection_of_the_dense_step(batch, m, n, r, seed):
    r = min(r, m, n)
    U, V, G = _factors(batch, m, n, r, seed)
    cset = ac.LowRank(rank=r)
    cset.scaled_gd_damping = 0.0
    fu, fv = cset.factor_grad_preconditioners((U, V))
    gu, gv = fu(G @ V.detach().mT), fv(U.detach().mT @ G)  # the chain rule's factor gradients, mapped
    dW = gu @ V.detach() + U.detach() @ gv  # first-order move of W = U V per unit step
    want = _proj(U.detach()) @ G + G @ _proj(V.detach().mT)
    torch.testing.assert_close(dW, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    # and it is at most twice the dense step (two orthogonal projections of G)
    assert float(torch.linalg.matrix_norm(dW).max()) <= 2 * float(torch.linalg.matrix_norm(G).max()) * (1 + 1e-9)


def test_damping_bounds_the_gain_and_non_finite_factors_pass_through():
    U, V, G = _factors((), 6, 5, 3, seed=1)
    cset = ac.LowRank(rank=3)
    fu, fv = cset.factor_grad_preconditioners((U, V))
    g = G @ V.detach().mT
    # V V^T = I here (orthonormal rows): the map is g / (1 + damping) exactly
    torch.testing.assert_close(fu(g), g / (1 + cset.scaled_gd_damping), rtol=1e-12, atol=0)
    # U^T U = diag(s^2): damping caps the gain of the weakest direction at 1 / (damping * s_max^2)
    gv = U.detach().mT @ G
    s2 = torch.linalg.eigvalsh(U.detach().mT @ U.detach())
    mapped = fv(gv)
    gain = float((torch.linalg.matrix_norm(mapped) / torch.linalg.matrix_norm(gv)))
    assert gain <= 1 / (cset.scaled_gd_damping * float(s2[-1])) + 1e-12
    with torch.no_grad():
        V[0, 0] = float("nan")
    assert fu(g) is g


def test_precondition_hooks_map_the_structured_factors_gradients_and_remove_cleanly():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=3))], mode="projection")
    model = nn.Sequential(lin)
    solver.prepare(model)
    solver.finalize(model)
    structure(solver.bindings)
    U = lin.parametrizations.weight.original0
    V = lin.parametrizations.weight.original1
    x = torch.randn(7, 12, dtype=torch.float64)

    def grads():
        U.grad = V.grad = None
        lin(x).pow(2).sum().backward()
        return U.grad.clone(), V.grad.clone()

    plain_u, plain_v = grads()
    handles = precondition(solver.bindings)
    assert len(handles) == 3  # two gradient hooks, one forward pre-hook (marks the factors changed)
    pre_u, pre_v = grads()
    fu, fv = solver.bindings[0].constraint.factor_grad_preconditioners((U, V))
    # the batched hooks and the one-factor reference solve the same damped system, whose condition
    # number is at most 1 + 1 / damping = 101: they differ by at most ~ 101 r eps = 7e-14 in float64
    torch.testing.assert_close(pre_u, fu(plain_u), rtol=1e-12, atol=0)
    torch.testing.assert_close(pre_v, fv(plain_v), rtol=1e-12, atol=0)
    assert not torch.allclose(pre_u, plain_u)
    for h in handles:
        h.remove()
    again_u, _ = grads()
    torch.testing.assert_close(again_u, plain_u, rtol=0, atol=0)
    release(solver.bindings)


def _count_hook_calls(monkeypatch, cls=ac.LowRank):
    """A list that grows by one per gradient hook call on a factor of a ``cls`` weight (the
    batched hooks of ``parametrizations.precondition``)."""
    from admm_compress.parametrizations import ScaledGDHooks

    calls = []
    orig = ScaledGDHooks.apply

    def counting(self, tid, g):
        if any(isinstance(b.constraint, cls) or isinstance(getattr(b.constraint, "a", None), cls)
               for b in self.bindings):
            calls.append(1)
        return orig(self, tid, g)

    monkeypatch.setattr(ScaledGDHooks, "apply", counting)
    return calls


@pytest.mark.parametrize("rho, expect", [("auto", True), (0.01, False)])
def test_fit_preconditions_only_in_a_settling_run(monkeypatch, rho, expect):
    """``rho="auto"`` (settle) trains the low-rank factors with ScaledGD in the settle and
    fine-tuning epochs; a numeric rho (no settle) keeps plain factor gradients, as before."""
    calls = _count_hook_calls(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=rho, every="epoch")
    s.fit(net, loader, epochs=3, finetune_epochs=1, progress=False)
    assert bool(calls) is expect
    for m in (net[0], net[2]):  # the structure left with its hooks: plain weights on the set
        assert not hasattr(m, "parametrizations")
        assert int(torch.linalg.matrix_rank(m.weight.detach())) <= 2


def _tt_cores(dims, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    rs = (1, *ranks, 1)
    # core scales spread over [0.3, 3]: the maps must not assume balanced cores
    return [(torch.randn(rs[k], n, rs[k + 1], dtype=torch.float64, generator=g)
             * (0.3 + 2.7 * torch.rand((), dtype=torch.float64, generator=g))).requires_grad_()
            for k, n in enumerate(dims)]


def _interfaces(cores, k):
    """Explicit L_{<k}: (N_<k, r_{k-1}) and R_{>k}: (r_k, N_>k) by contraction."""
    L = torch.ones(1, 1, dtype=torch.float64)
    for c in cores[:k]:
        L = torch.einsum("la,aic->lic", L, c.detach()).reshape(-1, c.shape[2])
    R = torch.ones(1, 1, dtype=torch.float64)
    for c in reversed(cores[k + 1:]):
        R = torch.einsum("aic,cm->aim", c.detach(), R).reshape(c.shape[0], -1)
    return L, R


@settings(max_examples=30, deadline=None)
@given(dims=st.lists(st.integers(2, 4), min_size=2, max_size=4), r=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_tt_core_maps_project_the_dense_step_core_by_core(dims, r, seed):
    """Each core's mapped step moves the tensor by the orthogonal projection of the dense
    gradient onto ``{L_{<k} X R_{>k}}``; the whole step is the sum of those d projections.

    Tolerance: the maps and the reference both solve with the interface Gram matrices, which
    loses about ``kappa * eps`` (``kappa`` their largest condition number; random cores, so it
    is measured per example and examples past 1e10 are skipped); ``1e3 kappa eps`` covers the
    few sums on top and is still <= ~1e-3, where a wrong map is off by O(1)."""
    d = len(dims)
    # ranks no larger than the unfoldings allow (full-rank interfaces)
    ranks = [min(r, math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, d)]
    cores = _tt_cores(dims, ranks, seed)
    interfaces = [_interfaces(cores, k) for k in range(d)]
    kappa = max(max(float(torch.linalg.cond(L.mT @ L)), float(torch.linalg.cond(R @ R.mT))) for L, R in interfaces)
    assume(kappa < 1e10)
    tol = 1e3 * kappa * torch.finfo(torch.float64).eps
    cset = ac.TTRank(ranks=ranks)
    cset.scaled_gd_damping = 0.0
    shape = tuple(dims)
    G = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    W = cset.reconstruct(cores, shape)
    grads = torch.autograd.grad((W * G).sum(), cores)  # the chain rule's core gradients for dL/dW = G
    maps = cset.factor_grad_preconditioners(cores)
    assert len(maps) == d
    total = torch.zeros_like(G)
    for k, (L, R) in enumerate(interfaces):
        mapped = maps[k](grads[k])
        moved = cset.reconstruct([mapped if j == k else c.detach() for j, c in enumerate(cores)], shape)
        Gk = G.reshape(L.shape[0], dims[k], R.shape[1])
        want = torch.einsum("lm,mic,cn->lin", _proj(L), Gk, _proj(R.mT).mT).reshape(shape)
        scale = float(want.abs().max()) + float(G.abs().max())
        torch.testing.assert_close(moved, want, rtol=tol, atol=tol * scale)
        total += moved
    assert float(total.norm()) <= d * float(G.norm()) * (1 + tol)


def test_two_core_tt_maps_equal_the_low_rank_maps():
    U, V, G = _factors((), 5, 4, 2, seed=3)
    lr, tt = ac.LowRank(rank=2), ac.TTRank(ranks=[2])
    fu, fv = lr.factor_grad_preconditioners((U, V))
    c0, c1 = U.detach().unsqueeze(0), V.detach().unsqueeze(-1)  # (1, 5, 2), (2, 4, 1)
    m0, m1 = tt.factor_grad_preconditioners([c0, c1])
    gu, gv = G @ V.detach().mT, U.detach().mT @ G
    torch.testing.assert_close(m0(gu.unsqueeze(0)).squeeze(0), fu(gu), rtol=1e-12, atol=0)
    torch.testing.assert_close(m1(gv.unsqueeze(-1)).squeeze(-1), fv(gv), rtol=1e-12, atol=0)


def test_sum_maps_its_components_and_leaves_sparse_values_plain():
    s = ac.Sum(ac.LowRank(rank=2), ac.Cardinality(density=0.2))
    U, V, _ = _factors((), 5, 4, 2, seed=4)
    values, idx = torch.randn(4, dtype=torch.float64), torch.arange(4)
    ma, mb = s.factor_grad_preconditioners(((U, V), (values, idx)))
    assert callable(ma[0]) and callable(ma[1]) and mb is None
    assert ac.Sum(ac.Cardinality(density=0.2), ac.Cardinality(density=0.1)).factor_grad_preconditioners(
        ((values, idx), (values, idx))) is None


def test_maps_that_do_not_mirror_the_factors_are_refused_with_the_layer_named():
    class OneMap(ac.LowRank):
        def factor_grad_preconditioners(self, factors):
            return (lambda g: g,)  # one map for two factors

    lin = nn.Linear(6, 5)
    solver = ac.Solver([ac.Constrain(nn.Linear, OneMap(rank=2))], mode="projection")
    model = nn.Sequential(lin)
    solver.prepare(model)
    solver.finalize(model)
    structure(solver.bindings)
    with pytest.raises(TypeError, match=r"layer '0'.*mirror the factors' nesting \(2 part"):
        precondition(solver.bindings)
    release(solver.bindings)


def test_fit_preconditions_tt_cores_and_the_tt_part_of_l_plus_s(monkeypatch):
    """The settle epochs of a short ``rho="auto"`` run train TT cores (oki view) and the TT part
    of RASPA's ``L + S`` through the per-core maps; the weights end on their sets."""
    from admm_compress.views import tt_layout_view

    calls = _count_hook_calls(monkeypatch, ac.TTRank)
    torch.manual_seed(0)
    x, y = torch.randn(128, 4, 8, 8), torch.randint(0, 3, (128,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    for cset in (ac.TTRank((2, 2)), ac.Sum(ac.TTRank((2, 2)), ac.Cardinality(density=0.1))):
        calls.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        s = ac.Solver([ac.Constrain("2", cset, view=tt_layout_view("oki"))])
        h = s.fit(net, loader, epochs=3, finetune_epochs=1, progress=False)
        assert h.final["settle_epochs"] >= 1
        assert len(calls) >= 3 * 8  # three cores per step, 8 steps per epoch, at least one settle epoch
        assert not hasattr(net[2], "parametrizations")
        if isinstance(cset, ac.TTRank):  # float32 cores multiplied out: rank tolerance 1e-5 s_1 (default)
            assert s.bindings[0].constraint.contains(s.bindings[0].to_view(net[2].weight.detach()))


def _factor_grads(net, x):
    ps = [p for p in net.parameters() if p.requires_grad]
    for p in ps:
        p.grad = None
    net(x).pow(2).sum().backward()
    return {id(p): p.grad.clone() for p in ps}


def _reference(solver, plain):
    """Each factor's plain gradient through the one-factor maps of factor_grad_preconditioners."""
    from admm_compress.parametrizations import factor_grad_maps

    return {id(t): fn(plain[id(t)]) for b in solver.bindings for t, fn in factor_grad_maps(b)}


def test_batched_hooks_equal_the_one_factor_maps_on_mixed_layers():
    """``precondition`` factors every layer's Gram matrices together (grouped by size) and each
    hook solves with its own; the result is the one-factor reference.  Both solve the same
    damped systems (condition number at most 1 + 1 / damping = 101, float64), so they agree to
    ~1e-13; a Gram matrix from another layer or group would be off by O(1)."""
    net, solver, x = _mixed_model()
    plain = _factor_grads(net, x)
    want = _reference(solver, plain)
    assert len(want) == 2 + 3 + 3 + 2 + 2  # U, V / three cores / three cores of L / U, V / U, V
    handles = precondition(solver.bindings)
    got = _factor_grads(net, x)
    for tid, w in want.items():
        torch.testing.assert_close(got[tid], w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
        assert not torch.allclose(got[tid], plain[tid])
    mapped = set(want)
    for tid, g in got.items():  # the sparse values of L + S and the biases stay plain
        if tid not in mapped:
            torch.testing.assert_close(g, plain[tid], rtol=0, atol=0)
    for h in handles:
        h.remove()
    release(solver.bindings)


def test_batched_hooks_factor_once_per_forward_and_follow_the_updated_factors():
    from admm_compress.parametrizations import ScaledGDHooks

    net, solver, x = _mixed_model()
    hooks = ScaledGDHooks(solver.bindings)
    handles = hooks.register()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        got = _factor_grads(net, x)
        assert hooks.refreshes == step + 1  # once per forward + backward, not once per factor
        opt.step()  # the factors move: the next forward must not reuse the old Gram matrices
    for h in handles:
        h.remove()
    plain = _factor_grads(net, x)
    hooks2 = ScaledGDHooks(solver.bindings)
    handles = hooks2.register()
    got = _factor_grads(net, x)
    for tid, w in _reference(solver, plain).items():
        torch.testing.assert_close(got[tid], w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
    for h in handles:
        h.remove()
    before = hooks2.refreshes
    _factor_grads(net, x)
    assert hooks2.refreshes == before  # removed: no hook fires
    release(solver.bindings)


def test_batched_hooks_pass_non_finite_factors_through_and_keep_the_others():
    """A factor whose Gram matrices are not finite keeps its gradient; the batch it was factored
    with is unaffected (the non-finite matrices are replaced before the eigenvalue and the LU).
    Checked on the hooks' map itself: a non-finite weight would make every gradient non-finite."""
    from admm_compress.parametrizations import ScaledGDHooks

    net, solver, x = _mixed_model()
    plain = _factor_grads(net, x)
    want = _reference(solver, plain)
    cores = list(net[2].parametrizations.weight.parameters())
    U8, V8 = net[8].parametrizations.weight.original0, net[8].parametrizations.weight.original1
    with torch.no_grad():
        cores[2][0, 0, 0] = float("inf")  # in core 1's right Gram and core 0's (cores 1, 2); not in core 2's left
        U8[0, 0] = float("nan")  # in V8's Gram U^T U, not in U8's V V^T
    hooks = ScaledGDHooks(solver.bindings)
    passed = {id(cores[0]), id(cores[1]), id(V8)}
    for tid, w in want.items():
        got = hooks.apply(tid, plain[tid])
        if tid in passed:
            torch.testing.assert_close(got, plain[tid], rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
    release(solver.bindings)


def test_a_set_overriding_the_maps_gets_them_as_they_are():
    class Halve(ac.LowRank):
        def factor_grad_preconditioners(self, factors):
            return (lambda g: g / 2, None)

    lin = nn.Linear(6, 5).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, Halve(rank=2))], mode="projection")
    model = nn.Sequential(lin)
    solver.prepare(model)
    solver.finalize(model)
    structure(solver.bindings)
    x = torch.randn(4, 6, dtype=torch.float64)
    plain = _factor_grads(model, x)
    handles = precondition(solver.bindings)
    got = _factor_grads(model, x)
    U, V = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    torch.testing.assert_close(got[id(U)], plain[id(U)] / 2, rtol=0, atol=0)
    torch.testing.assert_close(got[id(V)], plain[id(V)], rtol=0, atol=0)
    assert len(handles) == 1
    release(solver.bindings)
