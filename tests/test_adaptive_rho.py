"""rho="auto" (admm_compress.penalty.AdaptiveRho): known answers without a user-set rho at any
loss scale, exact dual rescaling, state round trip / resume, and the finalize report."""
import copy
import logging
import math

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress.penalty import AdaptiveRho
from admm_compress.views import TTView

EPS = torch.finfo(torch.float64).eps


def _planted(seed=1, n=40, k=5, m=80):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(m)
    x_star = torch.zeros(n, dtype=torch.float64)
    support = torch.randperm(n, generator=g)[:k]
    x_star[support] = torch.randn(k, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(k, generator=g))
    return A, x_star, support


def _sparse_ls_fit(scale, optimizer, epochs=40, steps=10):
    """min_x scale/2 ||A x - y||^2 s.t. ||x||_0 <= k, y = A x*, through fit() with default rho."""
    A, x_star, support = _planted()
    y = A @ x_star
    torch.manual_seed(0)
    lin = nn.Linear(A.shape[1], 1, bias=False).double()
    batches = [(A, y)] * steps

    def loss_fn(out, target):
        return scale * 0.5 * (out[:, 0] - target).pow(2).sum()

    solver = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(k=len(support)), view="identity")], every=10)
    h = solver.fit(lin, batches, epochs=epochs, optimizer=optimizer, loss_fn=loss_fn, progress=False)
    return lin.weight.detach()[0], x_star, support, solver, h


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_auto_rho_recovers_planted_sparse_least_squares_at_any_loss_scale(scale):
    """SGD with the step a user must take for this loss (lr = 0.5 / scale: the loss's gradient
    Lipschitz constant is scale * ||A||^2): the same support and the same x* at every scale,
    with rho never set.  (A numeric rho has to move 10^4x over this range.)"""
    w, x_star, support, solver, h = _sparse_ls_fit(scale, lambda p: torch.optim.SGD(p, lr=0.5 / scale))
    assert set(torch.nonzero(w).flatten().tolist()) == set(support.tolist())
    # ADMM's fixed point is x*; what is left is the primal residual the run reached, which is
    # below the target r_end = 1e-3 relative, so the tolerance is that residual times ||x*|| (with
    # A's conditioning below 10 for m = 2n Gaussian rows) -- in practice float error.
    r_end = solver.rho_schedule.r_end
    assert solver.residuals[-1]["primal"] < r_end
    assert float(torch.linalg.norm(w - x_star)) < 10 * r_end * float(torch.linalg.norm(x_star))
    assert h.final["feasible"] and h.final["projection_distance"] < r_end
    # rho scaled with the loss: same rho / scale at every scale (the invariance that gives the same answer)
    assert all(r > 0 for r in solver.rhos.values())


def test_auto_rho_trajectory_is_invariant_to_the_loss_scale():
    """Multiplying the loss by s and dividing the SGD step by s leaves every W-step unchanged when
    rho scales by s, which the adaptive rule does: the answers agree to float rounding, and
    rho / s agrees too.  Adam (invariant to the gradient's scale by itself) likewise."""
    res = {}
    for s in (0.01, 1.0, 100.0):
        w, _, _, solver, _ = _sparse_ls_fit(s, lambda p, s=s: torch.optim.SGD(p, lr=0.5 / s))
        res[s] = (w, solver.rhos["weight"] / s)
    tol = 1e4 * EPS  # a few thousand float64 roundings along 600 steps
    for s in (0.01, 100.0):
        torch.testing.assert_close(res[s][0], res[1.0][0], rtol=tol, atol=tol)
        assert res[s][1] == pytest.approx(res[1.0][1], rel=tol)
    ad = {}
    for s in (0.01, 100.0):
        # Adam is invariant to the gradient's scale once its eps scales with it too
        w, _, _, solver, _ = _sparse_ls_fit(s, lambda p, s=s: torch.optim.Adam(p, lr=1e-2, eps=1e-10 * s))
        ad[s] = (w, solver.rhos["weight"] / s)
    torch.testing.assert_close(ad[0.01][0], ad[100.0][0], rtol=tol, atol=tol)
    assert ad[0.01][1] == pytest.approx(ad[100.0][1], rel=tol)


def _orthonormal_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_auto_rho_best_rank_r_in_a_hand_written_loop(scale):
    """min 0.5 s ||W X - M X||^2 over rank(W) <= r, X X^T = I: Eckart-Young's truncated SVD, with
    the solver in a hand-written loop (observe_optimizer + horizon) and rho never set."""
    torch.manual_seed(0)
    m, n, r = 12, 10, 3
    M = torch.randn(m, n, dtype=torch.float64)
    X = _orthonormal_inputs(n)
    lin = nn.Linear(n, m, bias=False).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=r))], every=5)
    solver.prepare(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.3 / scale)
    steps = 1500
    solver.rho_schedule.observe_optimizer(opt)
    solver.rho_schedule.horizon = steps
    for _ in range(steps):
        loss = scale * 0.5 * (lin(X) - X @ M.T).pow(2).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    solver.finalize(lin)
    U, S, Vh = torch.linalg.svd(M)
    target = (U[:, :r] * S[:r]) @ Vh[:r]
    err = float(torch.linalg.norm(lin.weight.detach() - target) / torch.linalg.norm(target))
    # the fixed point is A_r; the relative gap left is below r_end, amplified at most by
    # s_1 / (s_r - s_{r+1}) (Wedin's perturbation bound for the top-r subspace)
    bound = solver.rho_schedule.r_end * float(S[0] / (S[r - 1] - S[r]))
    assert solver.residuals[-1]["primal"] < solver.rho_schedule.r_end
    assert err < bound, (err, bound)
    assert torch.linalg.matrix_rank(lin.weight).item() <= r


def test_every_rho_change_rescales_the_scaled_dual_exactly():
    """U <- (U + W - Z_new) * rho_old / rho_new on every update where rho changes: the unscaled
    dual rho * U is what the U-step made it, to float rounding."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 16, bias=False).double()
    spec = [ac.Constrain(nn.Linear, ac.Cardinality(density=0.2), view="identity")]
    solver = ac.Solver(spec, every=3)
    solver.prepare(lin)
    assert solver.rhos["weight"] == 0.0  # penalty off until the first step measured the scales
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    solver.rho_schedule.observe_optimizer(opt)
    solver.rho_schedule.horizon = 600  # a slow target: rho goes down and up within 60 steps
    x = torch.randn(32, 20, dtype=torch.float64)
    t = torch.randn(32, 16, dtype=torch.float64)
    changes = 0
    for i in range(60):
        loss = 0.5 * (lin(x) - t).pow(2).sum() / 32 + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (solver.steps + 1) % 3 == 0:  # an update follows inside this step(): predict it
            W = lin.weight.detach().clone()
            U0, rho_old = solver.U["weight"].clone(), solver.rhos["weight"]
            Z1 = ac.Cardinality(density=0.2).project(W + U0)
            solver.step()
            rho_new = solver.rhos["weight"]
            torch.testing.assert_close(solver.Z["weight"], Z1, rtol=0, atol=0)
            torch.testing.assert_close(rho_new * solver.U["weight"], rho_old * (U0 + W - Z1),
                                       rtol=8 * EPS, atol=8 * EPS * float(W.abs().max()) * max(rho_old, rho_new))
            changes += rho_new != rho_old
        else:
            solver.step()
        if i == 0:
            assert solver.rhos["weight"] > 0  # calibrated at the first step
    assert changes >= 3  # the test saw rho move


def _toy_data(n=96, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x[:, :classes].argmax(1)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _toy_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _toy_net_3(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_state_dict_round_trip_mid_run_continues_identically():
    """Snapshot (model, optimizer, solver) mid-run, restore into fresh objects, continue both:
    identical weights, Z, U and per-weight rho (the adaptive state travels with state_dict)."""
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    data = list(_toy_data())

    def run(net, solver, opt, batches):
        for x, y in batches:
            loss = nn.functional.cross_entropy(net(x), y) + solver.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            solver.step()

    net = _toy_net()
    s = ac.Solver(spec(), every=4).prepare(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    s.rho_schedule.observe_optimizer(opt)
    s.rho_schedule.horizon = 3 * len(data)
    run(net, s, opt, data[:5])
    snap = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()), s.state_dict())
    run(net, s, opt, data[5:] + data)

    net2 = _toy_net(seed=7)
    s2 = ac.Solver(spec(), every=4).prepare(net2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.5)
    net2.load_state_dict(snap[0])
    opt2.load_state_dict(snap[1])
    s2.load_state_dict(snap[2])
    run(net2, s2, opt2, data[5:] + data)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert s.rhos == s2.rhos  # per-weight rho (two layers of different gradient scale), restored exactly
    assert len(set(s.rho_schedule.rho0.values())) == 2
    for k in s.U:
        assert torch.equal(s.U[k], s2.U[k]) and torch.equal(s.Z[k], s2.Z[k])
    assert s2.rho_schedule.state_dict() == s.rho_schedule.state_dict()
    numeric = ac.Solver(spec(), rho=0.1).prepare(_toy_net())
    with pytest.raises(ValueError, match="adaptive rho state"):
        s2.load_state_dict(numeric.state_dict())


def test_checkpoint_resume_with_auto_rho_equals_uninterrupted(tmp_path):
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    ref = _toy_net(seed=3)
    s_ref = ac.Solver(spec(), every=4)
    s_ref.fit(ref, _toy_data(seed=5), epochs=4, progress=False)
    ck = tmp_path / "ck.pt"
    net = _toy_net(seed=3)
    ac.Solver(spec(), every=4).fit(net, _toy_data(seed=5), epochs=4, checkpoint=ck, progress=False,
                                   callbacks=[lambda solver, model, rec: rec["epoch"] == 1])
    torch.manual_seed(1234)
    net2 = _toy_net(seed=99)
    s2 = ac.Solver(spec(), every=4)
    s2.fit(net2, _toy_data(seed=5), epochs=4, checkpoint=ck, progress=False)
    for a, b in zip(ref.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert s2.rho_schedule.state_dict() == s_ref.rho_schedule.state_dict()


def test_finalize_reports_an_open_gap_and_history_records_both_sides(caplog):
    """A numeric rho far too small leaves the gap open: WARNING with the distance and the fix;
    history.final has the accuracy before and after the final projection."""
    loader = _toy_data()
    net = _toy_net()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.1))], rho=1e-6)
    with caplog.at_level(logging.WARNING, logger="admm_compress.solver"):
        h = s.fit(net, loader, epochs=2, val_loader=loader, progress=False)
    d = h.final["projection_distance"]
    assert d > s.finalize_warn_above
    msgs = [r.getMessage() for r in caplog.records if "had not closed" in r.getMessage()]
    assert len(msgs) == 1 and f"{d:.3g}" in msgs[0] and "rho='auto'" in msgs[0]
    assert {"before_finalize", "after_finalize"} <= set(h.final)
    assert 0 <= h.final["before_finalize"]["accuracy"] <= 100
    # the distance is the definition: the finalized weight vs the one just before
    net2 = _toy_net()
    s2 = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.1))], rho=1e-6)
    s2.fit(net2, loader, epochs=0, progress=False)  # direct compression: no updates, no warning
    assert s2.projection_distance > 0


def test_closed_gap_finalizes_silently(caplog):
    w, _, _, solver, h = None, None, None, None, None
    with caplog.at_level(logging.WARNING, logger="admm_compress.solver"):
        w, _, _, solver, h = _sparse_ls_fit(1.0, lambda p: torch.optim.SGD(p, lr=0.5))
    assert not [r for r in caplog.records if "had not closed" in r.getMessage()]
    assert h.final["projection_distance"] < solver.finalize_warn_above


def test_rho_arguments():
    spec = [ac.Constrain(nn.Linear, ac.LowRank(rank=2))]
    assert ac.Solver(spec).rho == "auto" and "rho=auto" in repr(ac.Solver(spec))
    with pytest.raises(ValueError, match=r"rho_growth=1.2 needs a numeric rho"):
        ac.Solver(spec, rho_growth=1.2)
    with pytest.raises(TypeError, match=r"rho must be a real number, got 'fast'"):
        ac.Solver(spec, rho="fast")
    custom = ac.AdaptiveRho(kappa=1.0)
    assert ac.Solver(spec, rho=custom).rho_schedule is custom
    with pytest.raises(ValueError, match=r"AdaptiveRho: kappa=0.0 is out of range"):
        ac.AdaptiveRho(kappa=0.0)
    # projection mode ignores rho; numeric rho keeps the geometric schedule
    assert ac.Solver(spec, mode="projection").rho == "auto"
    s = ac.Solver(spec, rho=0.1, rho_growth=2.0, rho_max=0.3).prepare(nn.Linear(6, 5))
    assert isinstance(s.rho_schedule, ac.GeometricRho) and s.rhos["weight"] == 0.1


def test_auto_rho_per_component_of_a_sum_raspa_default():
    """RASPA's default rho is "auto": each of L and S gets its own calibrated rho, and the run
    ends feasible (TT rank on L, cardinality on S)."""
    from admm_compress import methods

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    s = methods.raspa((2, 2), density=0.2, targets=nn.Linear, exclude="2", every=3)
    assert s.rho == "auto"
    h = s.fit(net, _toy_data(), epochs=2, progress=False)
    assert set(s.rhos) == {"0.weight#L", "0.weight#S"}
    assert all(r > 0 for r in s.rhos.values()) and s.rho_schedule.calibrated
    assert h.final["feasible"]


def _bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def _bn_data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed + 1))


def _fit_bn(recal, mode="admm"):
    net, loader = _bn_net(), _bn_data()
    s = ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.3))], mode=mode)
    s.bn_recalibration = recal
    h = s.fit(net, loader, epochs=2, finetune_epochs=1, val_loader=_bn_data(seed=7), progress=False)
    return net, loader, h


def test_fit_recalibrates_batchnorm_around_the_final_projection_without_touching_training():
    """ADMM fit recomputes the BN running statistics after the final projection and after fine-tuning
    (the penalty and the projection change the conv weights the running averages were taken on).
    The RNG states are restored, so the weights are bit-identical to a run without it; the
    statistics equal a recalibration of the final model on the same loader."""
    from admm_compress.training import recalibrate_bn

    a, loader, ha = _fit_bn(True)
    b, _, hb = _fit_bn(False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    bn_a, bn_b = a[1], b[1]
    assert not torch.equal(bn_a.running_var, bn_b.running_var)
    c = copy.deepcopy(a)
    recalibrate_bn(c, loader)  # loader order does not matter for a cumulative mean over all batches
    for m, r in zip(a.modules(), c.modules()):
        if isinstance(m, nn.BatchNorm2d):
            # the same 6 batches summed in another order: float32 rounding, ~6 eps relative << 1e-5
            torch.testing.assert_close(m.running_mean, r.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.running_var, r.running_var, rtol=1e-5, atol=1e-6)
    assert ha.final["feasible"] and {"before_finalize", "after_finalize", "after_finetune"} <= set(ha.final)


def test_projection_mode_keeps_the_running_statistics():
    """Projected SGD (LRPET, TRP) is left as it was: no recalibration."""
    a, _, _ = _fit_bn(True, mode="projection")
    b, _, _ = _fit_bn(False, mode="projection")
    for m, r in zip(a.modules(), b.modules()):
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_var, r.running_var) and torch.equal(m.running_mean, r.running_mean)


@pytest.mark.parametrize("epochs", [1, 3, 12])
def test_auto_cadence_gives_a_short_run_at_least_min_updates(epochs):
    """every="auto" (default) with rho="auto": once per epoch when the run has >= min_updates
    epochs, else every horizon // min_updates steps but no fewer than heavy-ball's response time
    (20 steps at momentum 0.9) and no more than an epoch; a numeric rho and every="epoch" keep
    one update per epoch."""
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    # 80 / 12 batches: the default settle leaves 1 / 6 ADMM epochs, room for min_admm_updates (3)
    # updates 20 steps apart (settle="auto" drops a shorter ADMM part; tested below)
    n = 1280 if epochs < 12 else 192
    n_batches = len(_toy_data(n=n))
    for kw in ({}, {"settle": 0}):
        s = ac.Solver(spec(), **kw)
        h = s.fit(_toy_net(), _toy_data(n=n), epochs=epochs, progress=False)
        admm = epochs - h.final.get("settle_epochs", 0)  # the settle epochs train on the set, no updates
        assert admm == (epochs if kw else epochs - s.settle_epochs(epochs, n_batches)) >= 1
        if admm >= s.min_updates:
            assert s.every_steps is None and s.n_updates == admm
        else:
            k = max(1, min(max(ac.Solver.response_steps(0.9), admm * n_batches // s.min_updates), n_batches))
            assert s.every_steps == k
            assert s.n_updates == admm * n_batches // k >= admm  # at least one update per epoch
    for kw in ({"rho": 0.1}, {"every": "epoch", "settle": 0}):
        s = ac.Solver(spec(), **kw)
        s.fit(_toy_net(), _toy_data(), epochs=epochs, progress=False)
        assert s.every_steps is None and s.n_updates == epochs
    with pytest.raises((TypeError, ValueError)):
        ac.Solver(spec(), every="sometimes")


def test_auto_cadence_leaves_the_w_step_its_response_time():
    """A short run with many steps per epoch: horizon // min_updates (6) is below heavy-ball's
    response time, so Z/U are updated every ceil(1 / (1 - sqrt(0.9))) = 20 steps (SGD, momentum
    0.9); without momentum (Adam is read as 0) the floor is 1 step and the plain rule holds."""
    assert [ac.Solver.response_steps(b) for b in (0.0, 0.5, 0.9, 0.99)] == [1, 4, 20, 200]
    data = _toy_data(n=480)  # 30 batches per epoch, 2 epochs: horizon 60
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    s = ac.Solver(spec(), settle=0)
    s.fit(_toy_net(), data, epochs=2, progress=False)
    assert s.every_steps == 20 and s.n_updates == 3
    s = ac.Solver(spec(), settle=0)
    s.fit(_toy_net(), data, epochs=2, progress=False, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    assert s.every_steps == 6 and s.n_updates == 10


def test_a_cadence_shorter_than_the_response_time_takes_a_relaxed_dual_step():
    """rho="auto" in fit with an explicit every below heavy-ball's response time (20 steps at
    momentum 0.9): U += (every / 20) (W - Z); at or above it, with Adam (response 1 step), with a
    numeric rho or every="auto" (floored at 20): the textbook step 1.  The step is applied
    exactly: from U = 0 one update gives U = gamma (W - Pi(W)), the next U + gamma (W - Pi(W + U))
    (gamma a power of two here, so both are exact in float32)."""
    data = _toy_data(n=480)  # 30 batches per epoch
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)
    for kw, fit_kw, gamma in (({"every": 10}, {}, 0.5), ({"every": 5}, {}, 0.25), ({"every": 20}, {}, 1.0),
                              ({"every": 40}, {}, 1.0), ({}, {}, 1.0), ({"every": 10}, {"optimizer": adam}, 1.0),
                              ({"every": 10, "rho": 0.1}, {}, 1.0), ({"every": "epoch"}, {}, 1.0)):
        s = ac.Solver(spec(), settle=0, **kw)
        s.fit(_toy_net(), data, epochs=1, progress=False, **fit_kw)
        assert s.dual_step == gamma, (kw, fit_kw)
    net = _toy_net()
    s = ac.Solver(spec(), rho=0.1).prepare(net)
    s.dual_step = 0.5
    W = {sl.key: sl.tensor().detach().clone() for sl in s.slots}

    def top_k(v, k):  # the cardinality projection by brute force: keep the k largest |entries|
        out = torch.zeros_like(v).reshape(-1)
        idx = v.reshape(-1).abs().argsort(descending=True)[:k]
        out[idx] = v.reshape(-1)[idx]
        return out.reshape(v.shape)

    s.update()
    for sl in s.slots:
        k = round(0.3 * W[sl.key].numel())
        assert torch.equal(s.U[sl.key], 0.5 * (W[sl.key] - top_k(W[sl.key], k)))
    U1 = {k: u.clone() for k, u in s.U.items()}
    s.update()
    for sl in s.slots:
        k = round(0.3 * W[sl.key].numel())
        assert torch.equal(s.U[sl.key], U1[sl.key] + 0.5 * (W[sl.key] - top_k(W[sl.key] + U1[sl.key], k)))


def _calibrated_rule(momentum):
    """An AdaptiveRho in the state calibrate() leaves (one weight "w", rho0 1, no ceiling in
    reach, starting residual 1, horizon 1000 steps: the target falls to 1e-3 by step 700)."""
    rule = AdaptiveRho()
    rule.momentum, rule.horizon = momentum, 1000
    rule.calibrated, rule.rho0, rule.cap, rule.r0 = True, {"w": 1.0}, {"w": 1e9}, {"w": 1.0}
    return rule


def test_rho_changes_at_most_factor_per_response_time_whatever_the_cadence():
    """The per-update limit is factor ** a with a = min(1, steps since the last update /
    response_steps) (20 steps at momentum 0.9): Z/U every 10 steps grows rho by sqrt(2) per
    update, 2 per 20 steps, as every 20 does; a decrease by at most factor ** (-a / 2).
    Without momentum (response 1 step) every cadence takes the full factor."""
    rule = _calibrated_rule(0.9)
    assert AdaptiveRho.response_steps(0.9) == 20 == ac.Solver.response_steps(0.9)
    rho, path = 1.0, []
    for steps in (10, 20, 40, 100, 105):  # intervals 10, 10, 20, 60, 5
        rho = rule.after_update({"w": rho}, {"w": 50.0}, steps)["w"]  # residual far above target
        path.append(rho)
    h, q = 2.0 ** 0.5, 2.0 ** 0.25
    assert path == [h, h * h, h * h * 2.0, h * h * 2.0 * 2.0, h * h * 2.0 * 2.0 * q]
    low = rule.after_update({"w": 1.0}, {"w": 1e-9}, 115)  # far below target (0.11 at step 115): decrease
    assert low == {"w": 1.0 / 2.0 ** 0.25}
    rule = _calibrated_rule(0.0)
    assert rule.after_update({"w": 1.0}, {"w": 50.0}, 1) == {"w": 2.0}
    assert rule.after_update({"w": 1.0}, {"w": 50.0}, 2) == {"w": 2.0}
    rule = _calibrated_rule(0.9)
    rule.after_update({"w": 1.0}, {"w": 50.0}, 10)
    again = AdaptiveRho()
    again.load_state_dict(rule.state_dict())  # the cadence is measured from the restored last step
    assert again.last_step == 10 and again.after_update({"w": 1.0}, {"w": 50.0}, 20) == {"w": h}


def test_checkpoint_resume_with_auto_cadence_equals_uninterrupted(tmp_path):
    """The cadence every="auto" picks is a function of the fit call, so a resumed short run
    updates at the same steps as an uninterrupted one."""
    spec = lambda: [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    ref = _toy_net(seed=3)
    s_ref = ac.Solver(spec())
    data = lambda: _toy_data(n=1280, seed=5)  # 80 batches: an ADMM part settle="auto" keeps
    s_ref.fit(ref, data(), epochs=3, progress=False)
    assert s_ref.every_steps is not None and s_ref.n_updates > 1
    ck = tmp_path / "ck.pt"
    ac.Solver(spec()).fit(_toy_net(seed=3), data(), epochs=3, checkpoint=ck, progress=False,
                          callbacks=[lambda solver, model, rec: rec["epoch"] == 0])
    net2 = _toy_net(seed=99)
    s2 = ac.Solver(spec())
    s2.fit(net2, data(), epochs=3, checkpoint=ck, progress=False)
    for a, b in zip(ref.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert s2.n_updates == s_ref.n_updates and s2.rho_schedule.state_dict() == s_ref.rho_schedule.state_dict()


# ---------------------------------------------------------------- settle (train on the set)
def test_settle_auto_resolves_from_the_sets_and_the_penalty():
    """settle="auto": half of fit's epochs (ceil, at least one ADMM epoch) for cardinality with
    rho="auto"; 0.8 for factor structures (low rank; TT and L + S only in runs shorter than
    min_updates epochs); none for a soft penalty, a numeric rho or projection mode; an explicit fraction
    is used as given."""
    card = [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    low = [ac.Constrain(nn.Linear, ac.LowRank(rank=2))]
    s = ac.Solver(card).prepare(_toy_net())
    assert s.settle_fraction() == s.auto_settle == 0.5
    assert [s.settle_epochs(e) for e in (0, 1, 2, 3, 4, 15)] == [0, 0, 1, 2, 2, 8]
    sl = ac.Solver(low).prepare(_toy_net())
    assert sl.settle_fraction() == sl.auto_settle_factors == 0.8
    assert [sl.settle_epochs(e) for e in (1, 2, 3, 10, 15)] == [0, 1, 2, 8, 12]
    mixed = [ac.Constrain("0", ac.Cardinality(density=0.3)), ac.Constrain("2", ac.LowRank(rank=2))]
    assert ac.Solver(mixed).prepare(_toy_net()).settle_fraction() == 0.8  # one factor form decides
    tt = [ac.Constrain("0", ac.TTRank((2,)), view=TTView((4, 8), (4, 4)))]
    lps = [ac.Constrain(nn.Linear, ac.Sum(ac.LowRank(rank=2), ac.Cardinality(density=0.1)))]
    for spec in (tt, lps, tt + [ac.Constrain("2", ac.Cardinality(density=0.3))]):
        s3 = ac.Solver(spec).prepare(_toy_net())  # TT and L + S settle only in a short run
        assert [s3.settle_epochs(e) for e in (4, 9, 10, 30)] == [3, 8, 0, 0]
    assert [sl.settle_epochs(e) for e in (9, 10, 30)] == [8, 8, 24]  # low rank settles in a long run too
    assert ac.Solver(tt, settle=0.5).prepare(_toy_net()).settle_epochs(30) == 15  # an explicit fraction holds
    assert ac.Solver([ac.Constrain(nn.Linear, ac.SchattenP(p=1.0, weight=1e-3))]).prepare(
        _toy_net()).settle_epochs(10) == 0
    assert ac.Solver(card, rho=0.1).prepare(_toy_net()).settle_epochs(10) == 0
    assert ac.Solver(card, mode="projection").prepare(_toy_net()).settle_epochs(10) == 0
    assert ac.Solver(low, settle=0.25).prepare(_toy_net()).settle_epochs(10) == 3
    assert ac.Solver(card, settle=0.9).prepare(_toy_net()).settle_epochs(3) == 2  # one ADMM epoch stays
    assert not ac.LowRank(rank=2).isometric_structure and ac.Cardinality(k=3).isometric_structure
    for bad in (1.0, -0.1, "half"):
        with pytest.raises((TypeError, ValueError), match="settle"):
            ac.Solver(card, settle=bad)


def test_settle_auto_drops_an_admm_part_too_short_for_three_dual_updates():
    """settle="auto" (with every="auto"): an ADMM part of fewer than min_admm_updates (3) x
    response_steps (20 at momentum 0.9) optimizer steps cannot run ADMM (one Z/U update at most),
    so every epoch settles instead: the final projection of the starting weights, then the mask
    trained -- "prune, then train".  An explicit settle or every, a numeric rho, or an
    optimizer without momentum (response time 1 step) keep the ADMM part."""
    card = [ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))]
    s = ac.Solver(card).prepare(_toy_net())
    assert (s.min_admm_updates, s.response_steps(0.9)) == (3, 20)
    # 4 epochs: settle 2, ADMM part 2 epochs; dropped below 2 * 30 = 60 steps per 3 updates
    assert [s.settle_epochs(4, n) for n in (6, 29, 30, 100)] == [4, 4, 2, 2]
    assert s.settle_epochs(4) == 2  # steps unknown (an iterator): kept
    plain = torch.optim.SGD(_toy_net().parameters(), lr=0.1)  # momentum 0: response time 1 step
    assert s.settle_epochs(4, 2, plain) == 2 and s.settle_epochs(4, 1, plain) == 4
    heavy = torch.optim.SGD(_toy_net().parameters(), lr=0.1, momentum=0.99)  # response time 200 steps
    assert s.response_steps(0.99) == 200
    assert s.settle_epochs(4, 300, heavy) == 2 and s.settle_epochs(4, 299, heavy) == 4
    assert ac.Solver(card, every=5).prepare(_toy_net()).settle_epochs(4, 6) == 2
    assert ac.Solver(card, settle=0.5).prepare(_toy_net()).settle_epochs(4, 6) == 2
    assert ac.Solver(card, rho=0.1).prepare(_toy_net()).settle_epochs(4, 6) == 0
    # fit: no ADMM epoch, no update; the support is the starting weights' top-k (the projection
    # of the weights fit started from), kept through the settle and fine-tuning epochs
    net = _toy_net()
    start = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)]
    s = ac.Solver(card)
    h = s.fit(net, _toy_data(), epochs=4, finetune_epochs=1, progress=False)
    assert [r["phase"] for r in h.epochs] == ["settle"] * 4 + ["finetune"]
    assert h.final["settle_epochs"] == 4 and s.n_updates == 0 and h.final["feasible"]
    for w0, m in zip(start, [m for m in net if isinstance(m, nn.Linear)]):
        k = round(0.3 * w0.numel())
        top = torch.zeros(w0.numel(), dtype=torch.bool)
        top[w0.abs().flatten().topk(k).indices] = True  # float32 normal draws: no ties
        assert torch.equal(m.weight.detach().flatten() != 0, top)


def test_fit_with_settle_runs_admm_then_the_set_at_the_training_lr_then_finetuning(caplog):
    """epochs = ADMM epochs + settle epochs (records "train" / "settle"), Z/U updates only in
    the ADMM part, the settle stage's optimizer is the training optimizer's kind and lr (a
    factory is called again), fine-tuning's its own; the result is on the set."""
    made = []

    def train_opt(params):
        made.append("train")
        return torch.optim.SGD(params, lr=0.07, momentum=0.9)

    def ft_opt(params):
        made.append("finetune")
        return torch.optim.SGD(params, lr=0.003)

    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))], every="epoch")
    net = _toy_net()
    caplog.set_level(logging.INFO, logger="admm_compress")
    h = s.fit(net, _toy_data(), epochs=5, finetune_epochs=2, optimizer=train_opt, finetune_optimizer=ft_opt,
              progress=False)
    assert [r["phase"] for r in h.epochs] == ["train"] * 2 + ["settle"] * 3 + ["finetune"] * 2
    assert h.final["settle_epochs"] == 3 and s.n_updates == 2
    assert made == ["train", "train", "finetune"]
    # an open gap before settle is reported at INFO (the settle epochs follow), not WARNING
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("finalize:")]
    assert [lv for lv, _ in msgs] == ([logging.INFO] if s.projection_distance > s.finalize_warn_above else [])
    assert all("3 settle epoch(s)" in m for _, m in msgs)
    assert s.settle_next == 0  # reset: a later finalize outside fit warns as before
    caplog.clear()
    for settle_next, level in ((2, logging.INFO), (0, logging.WARNING)):
        s.settle_next = settle_next
        s._report_projection({"0.weight": (0.5, 1.0)})  # moved by 50 %
        assert caplog.records[-1].levelno == level and s.projection_distance == 0.5
    s.settle_next = 0
    # a scheduler spans all `epochs`: settle continues it on its new optimizer
    opts = []
    s2 = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.3))])
    s2.fit(_toy_net(), _toy_data(), epochs=5, progress=False,
           optimizer=lambda p: opts.append(torch.optim.SGD(p, lr=0.08)) or opts[-1],
           scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e))
    assert len(opts) == 2 and opts[0].param_groups[0]["lr"] == pytest.approx(0.08 * 0.5 ** 2, rel=1e-12)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.08 * 0.5 ** 5, rel=1e-12)
    for m in (net[0], net[2]):
        assert int(torch.count_nonzero(m.weight)) <= round(0.3 * m.weight.numel())


def test_fit_settles_factors_at_their_own_fraction_of_the_training_lr(caplog):
    """Mixed spec (pruned layer 0, low-rank layer 2, ``L + S`` layer 4): the settle epochs rebuild
    the training optimizer (the factory is called again, with three groups) and a scheduler
    continues on it; the low-rank factors and the L factors of ``L + S`` (ScaledGD-
    preconditioned) train at ``min(lr, 0.03)`` (``preconditioned_settle_lr_scale="auto"``; a
    number: that multiple of lr), the S values of ``L + S`` at lr / 10, the pruned kept entries
    and everything else at lr; the weights end on their sets."""
    made, opts = [], []

    def train_opt(params):
        made.append("train")
        opts.append(torch.optim.SGD(params, lr=0.08, momentum=0.9))
        return opts[-1]

    def ft_opt(params):
        made.append("finetune")
        return torch.optim.SGD(params, lr=0.003)

    s = ac.Solver([ac.Constrain("0", ac.Cardinality(density=0.3)), ac.Constrain("2", ac.LowRank(rank=2)),
                   ac.Constrain("4", ac.Sum(ac.LowRank(rank=1), ac.Cardinality(density=0.2)))],
                  every="epoch")
    net = _toy_net_3()
    seen = {}

    def probe(solver, model, rec):  # the settle stage's groups, read while the factors exist
        if rec["phase"] == "settle" and not seen:
            ids = lambda i: {id(p) for p in model[i].parametrizations.weight.parameters()}
            pw = model[4].parametrizations.weight
            g0, g1, g2 = opts[-1].param_groups
            # L + S: its L factors (U, V: original0/1) are preconditioned, its S values (original2) not
            seen.update(lowrank={id(p) for p in g1["params"]} == ids(2) | {id(pw.original0), id(pw.original1)},
                        sum={id(p) for p in g2["params"]} == {id(pw.original2)},
                        kept=ids(0) <= {id(p) for p in g0["params"]}, lrs=(g0["lr"], g1["lr"], g2["lr"]))

    h = s.fit(net, _toy_data(), epochs=5, finetune_epochs=1, optimizer=train_opt, finetune_optimizer=ft_opt,
              scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e),
              callbacks=[probe], progress=False)
    assert [r["phase"] for r in h.epochs] == ["train"] + ["settle"] * 4 + ["finetune"]
    assert h.final["settle_epochs"] == 4 and s.n_updates == 1
    assert made == ["train", "train", "finetune"]
    assert seen["lowrank"] and seen["sum"] and seen["kept"]
    # preconditioned factors: "auto" = min(1, 0.03 / lr) of lr 0.08, i.e. lr 0.03, then the schedule
    assert seen["lrs"] == (pytest.approx(0.08 * 0.5 ** 2, rel=1e-12), pytest.approx(0.03 * 0.5 ** 2, rel=1e-12),
                           pytest.approx(0.008 * 0.5 ** 2, rel=1e-12))
    assert int(torch.linalg.matrix_rank(net[2].weight.detach())) <= 2  # float32 tolerance: a float32 product
    assert int(torch.count_nonzero(net[0].weight)) <= round(0.3 * net[0].weight.numel())
    # without the preconditioner the low-rank factors are slow factors again: two groups, lr / 10
    opts.clear()
    seen.clear()

    def probe2(solver, model, rec):
        if rec["phase"] == "settle" and not seen:
            seen["lrs"] = [g["lr"] for g in opts[-1].param_groups]

    s2 = ac.Solver([ac.Constrain("2", ac.LowRank(rank=2))], every="epoch")
    s2.precondition_factors = False
    s2.fit(_toy_net_3(), _toy_data(), epochs=5, finetune_epochs=1, optimizer=train_opt, callbacks=[probe2],
           progress=False)
    assert seen["lrs"] == [pytest.approx(0.08, rel=1e-12), pytest.approx(0.008, rel=1e-12)]
    # a numeric multiplier is that multiple of lr; "auto" below the cap is lr itself
    for scale, lr, want in ((0.3, 0.08, 0.024), ("auto", 0.01, 0.01)):
        opts.clear()
        seen.clear()
        s3 = ac.Solver([ac.Constrain("2", ac.LowRank(rank=2))], every="epoch")
        s3.preconditioned_settle_lr_scale = scale
        s3.fit(_toy_net_3(), _toy_data(), epochs=5, finetune_epochs=1, callbacks=[probe2], progress=False,
               optimizer=lambda params, lr=lr: opts.append(torch.optim.SGD(params, lr=lr, momentum=0.9)) or opts[-1])
        assert seen["lrs"] == [pytest.approx(lr, rel=1e-12), pytest.approx(want, rel=1e-12)]

    # a factory that regroups what it gets: its single group is kept (factors at its lr), with a WARNING
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="admm_compress")
    ac.Solver([ac.Constrain("2", ac.LowRank(rank=2))]).fit(
        _toy_net(), _toy_data(), epochs=2, progress=False,
        optimizer=lambda params: torch.optim.SGD([p for g in params for p in g["params"]]
                                                 if isinstance(params, list) else params, lr=0.05))
    assert any("parameter group(s) for the settle stage" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["inside", "boundary"])  # inside the settle stage / at its end
@pytest.mark.parametrize("kind", ["cardinality", "lowrank"])  # lowrank: two groups, factors at lr / 10
def test_resume_inside_settle_and_at_its_boundary_equals_uninterrupted(tmp_path, where, kind):
    """A run interrupted in the settle stage (its optimizer state is restored) or right after
    it (fine-tuning starts with a fresh optimizer, as uninterrupted) resumes bit-identically."""
    cset = (lambda: ac.Cardinality(density=0.3)) if kind == "cardinality" else (lambda: ac.LowRank(rank=2))
    n_settle = 2 if kind == "cardinality" else 3  # ceil(0.5 * 4) / ceil(0.8 * 4) capped at 3
    spec = lambda: [ac.Constrain(nn.Linear, cset())]
    kw = dict(epochs=4, finetune_epochs=2, progress=False,  # the schedule continues into settle
              scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.7 ** e))
    ref = _toy_net(seed=3)
    data = lambda: _toy_data(n=1280, seed=5)  # 80 batches: an ADMM part settle="auto" keeps
    ac.Solver(spec()).fit(ref, data(), **kw)
    stop = 1 if where == "inside" else n_settle  # epoch of the fine-tuning loop (settle, then fine-tuning)

    class Kill(Exception):
        pass

    def kill(solver, model, rec):
        if rec["phase"] != "train" and rec["epoch"] == stop:
            raise Kill  # before that epoch's checkpoint: the file holds the epoch before it

    ck = tmp_path / "ck.pt"
    with pytest.raises(Kill):
        ac.Solver(spec()).fit(_toy_net(seed=3), data(), checkpoint=ck, callbacks=[kill], **kw)
    torch.manual_seed(1234)
    net2 = _toy_net(seed=99)
    h = ac.Solver(spec()).fit(net2, data(), checkpoint=ck, **kw)
    assert h.final["settle_epochs"] == n_settle
    for a, b in zip(ref.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_reach_floor_lifts_a_small_gradient_balance_to_what_the_run_can_use():
    """rho0 = max(balance ||g|| / ||W - Z||, reach (1 - beta) / (eta T)), then capped by the
    damping ceiling kappa (1 - sqrt(beta))^2 / eta; reach=0 keeps the gradient balance."""
    w = {"a": torch.ones(4, 4, dtype=torch.float64)}  # float64: the norms are exact to ~1e-16
    z = {"a": torch.zeros(4, 4, dtype=torch.float64)}  # ||W - Z|| = 4
    g = {"a": torch.full((4, 4), 1e-4, dtype=torch.float64)}  # ||g|| = 4e-4: balance 1e-4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
    ceiling = 2 * (1 - math.sqrt(0.9)) ** 2 / 0.01
    for reach, horizon, want in ((1.0, 100, 0.1 / (0.01 * 100)), (0.0, 100, 1e-4), (1.0, 10, ceiling),
                                 (1.0, None, 1e-4)):
        r = ac.AdaptiveRho(reach=reach)
        r.observe_optimizer(opt)
        r.horizon = horizon
        r.snapshot({"a": w["a"] + 1e-3})  # any measured step: the optimizer's lr is used
        out = r.calibrate(w, g, z)
        assert out["a"] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="reach"):
        ac.AdaptiveRho(reach=-1.0)
