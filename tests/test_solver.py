"""The solver on problems with known exact answers (cooper-style convergence tests), its
state, checkpoints and failure behaviour."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import admm_compress as ac
from admm_compress.training import CheckpointError, NonFiniteError


def _orthonormal_inputs(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return q  # rows are an orthonormal basis: sum_i x_i x_i^T = I


def _best_rank(M, r):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_admm_converges_to_best_rank_r_approximation():
    """min_W 0.5 ||W X - M X||^2 over rank(W) <= r with X X^T = I has the Eckart-Young solution.

    f has Lipschitz gradient L = 1; with inexact W-steps (5 SGD steps) nonconvex ADMM needs rho
    above L to converge (rho = 1 stalls at 6 % error, measured), so rho = 2."""
    torch.manual_seed(0)
    m, n, r = 12, 10, 3
    M = torch.randn(m, n, dtype=torch.float64)
    X = _orthonormal_inputs(n)
    lin = nn.Linear(n, m, bias=False).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=r))], rho=2.0, every=5)
    solver.prepare(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.3)
    for _ in range(1500):
        loss = 0.5 * (lin(X) - X @ M.T).pow(2).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    solver.finalize(lin)
    target = _best_rank(M, r)
    err = float(torch.linalg.norm(lin.weight.detach() - target) / torch.linalg.norm(target))
    assert err < 1e-4, err
    assert torch.linalg.matrix_rank(lin.weight).item() <= r
    assert solver.residuals[-1]["primal"] < 1e-4


def test_admm_recovers_planted_sparse_least_squares():
    """min_x 0.5 ||A x - y||^2 s.t. ||x||_0 <= k with y = A x*: the answer is x* (A well conditioned)."""
    g = torch.Generator().manual_seed(1)
    n, k, m = 40, 5, 80
    A = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(m)
    x_star = torch.zeros(n, dtype=torch.float64)
    support = torch.randperm(n, generator=g)[:k]
    x_star[support] = torch.randn(k, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(k, generator=g))
    y = A @ x_star
    lin = nn.Linear(n, 1, bias=False).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(k=k), view="identity")], rho=0.5, every=10)
    solver.prepare(lin)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(3000):
        loss = 0.5 * (A @ lin.weight[0] - y).pow(2).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    solver.finalize(lin)
    w = lin.weight.detach()[0]
    assert set(torch.nonzero(w).flatten().tolist()) == set(support.tolist())
    assert float(torch.linalg.norm(w - x_star)) < 1e-6


def test_admm_robust_pca_through_sum():
    """Planted M = L0 + S0 (rank 2 + 5 % sparse): ADMM on W = L + S with f = 0.5||W - M||^2 finds L0, S0."""
    g = torch.Generator().manual_seed(2)
    m, n, r = 30, 30, 2
    L0 = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    S0 = torch.zeros(m * n, dtype=torch.float64)
    k = int(0.05 * m * n)
    idx = torch.randperm(m * n, generator=g)[:k]
    S0[idx] = 5 * torch.randn(k, generator=g, dtype=torch.float64).sign()
    S0 = S0.reshape(m, n)
    M = L0 + S0
    lin = nn.Linear(n, m, bias=False).double()
    spec = [ac.Constrain(nn.Linear, ac.Sum(ac.LowRank(rank=r), ac.Cardinality(k=k)))]
    solver = ac.Solver(spec, rho=1.0, every=5)
    solver.prepare(lin)  # registers W = L + S
    opt = torch.optim.SGD(lin.parameters(), lr=0.3)
    for _ in range(2000):
        loss = 0.5 * (lin.weight - M).pow(2).sum() + solver.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        solver.step()
    solver.finalize(lin)
    L = lin.parametrizations.weight.original0.detach()
    S = lin.parametrizations.weight.original1.detach()
    assert float(torch.linalg.norm(L - L0) / torch.linalg.norm(L0)) < 1e-4
    assert float(torch.linalg.norm(S - S0) / torch.linalg.norm(S0)) < 1e-4
    assert int(torch.count_nonzero(S)) <= k


def test_penalty_is_the_real_squared_norm_and_duals_accumulate():
    lin = nn.Linear(6, 5, bias=False)
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.3)
    solver.prepare(lin)
    W = lin.weight.detach()
    Z = solver.Z["weight"]
    assert torch.allclose(Z, ac.LowRank(rank=2).project(W))
    assert torch.equal(solver.U["weight"], torch.zeros_like(W))
    assert torch.allclose(solver.penalty(), 0.15 * (W - Z).pow(2).sum())
    with torch.no_grad():
        lin.weight.add_(0.1)
    W1 = lin.weight.detach().clone()
    solver.update()
    Z1 = ac.LowRank(rank=2).project(W1)
    assert torch.allclose(solver.Z["weight"], Z1, atol=1e-6)
    assert torch.allclose(solver.U["weight"], W1 - Z1, atol=1e-6)


def test_geometric_rho_rescales_scaled_duals():
    lin = nn.Linear(6, 5, bias=False)
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=1))], rho=0.1, rho_growth=2.0, rho_max=0.3)
    solver.prepare(lin)
    solver.update()
    u_scaled = solver.U["weight"].clone()
    assert solver.rhos["weight"] == pytest.approx(0.2)
    # unscaled dual rho * U equals the one before the rho change: 0.1 * (W - Z)
    W, Z = lin.weight.detach(), solver.Z["weight"]
    assert torch.allclose(0.2 * u_scaled, 0.1 * (W - Z), atol=1e-7)
    solver.update()
    solver.update()
    assert solver.rhos["weight"] == pytest.approx(0.3)


def test_equal_shapes_are_batched_and_match_unbatched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=3))], rho=1.0)
    s.prepare(net)
    for i in (0, 2, 4):
        W = net[i].weight.detach()
        assert torch.allclose(s.Z[f"{i}.weight"], ac.LowRank(rank=3).project(W), atol=1e-6)


def test_projection_mode_is_projected_sgd():
    torch.manual_seed(0)
    lin = nn.Linear(10, 8)
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], mode="projection", every=3)
    s.prepare(lin)
    assert float(s.penalty()) == 0.0
    w0 = lin.weight.detach().clone()
    assert not s.step() and not s.step()
    assert torch.equal(lin.weight, w0)
    assert s.step()
    assert torch.allclose(lin.weight, ac.LowRank(rank=2).project(w0), atol=1e-6)
    assert s.U == {} and s.Z == {}


def test_state_dict_round_trip():
    lin = nn.Linear(6, 5, bias=False)
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.3, rho_growth=1.5)
    s.prepare(lin)
    s.step(); s.update(); s.epoch_end()
    sd = s.state_dict()
    s2 = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.3, rho_growth=1.5)
    s2.prepare(lin)
    s2.load_state_dict(sd)
    for k in ("Z", "U"):
        assert torch.equal(getattr(s2, k)["weight"], getattr(s, k)["weight"])
    assert s2.rhos == s.rhos and s2.steps == s.steps and s2.epochs_done == s.epochs_done
    other = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.3).prepare(nn.Sequential(nn.Linear(6, 5)))
    with pytest.raises(ValueError, match="solver state is for weights"):
        other.load_state_dict(sd)


def _toy_data(n=96, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1))
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _toy_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_fit_feasible_after_finalize_and_history():
    loader = _toy_data()
    net = _toy_net()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=3))], rho=0.05)
    h = s.fit(net, loader, epochs=3, val_loader=loader, progress=False)
    assert len(h.epochs) == 3 and h.final["feasible"]
    assert all(torch.linalg.matrix_rank(net[i].weight) <= 3 for i in (0, 2))
    assert {"loss", "train_accuracy", "primal", "dual", "rho", "val_accuracy", "wall"} <= set(h.epochs[0])
    assert len(h.updates) == 3


def test_fit_finetune_keeps_structure():
    loader = _toy_data()
    net = _toy_net()
    spec = [ac.Constrain("0", ac.LowRank(rank=3)), ac.Constrain("2", ac.Cardinality(k=40), view="identity")]
    s = ac.Solver(spec, rho=0.05)
    s.fit(net, loader, epochs=1, finetune_epochs=2, progress=False)
    w0, w2 = net[0].weight, net[2].weight
    assert type(net[0]) is nn.Linear and "parametrizations" not in dict(net.named_children())
    assert torch.linalg.matrix_rank(w0) <= 3
    assert int(torch.count_nonzero(w2)) <= 40


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Interrupt after epoch 2 of 4 (a kill between epochs), resume: identical weights."""
    spec = lambda: [ac.Constrain(nn.Linear, ac.LowRank(rank=3))]
    ref_net = _toy_net(seed=3)
    ac.Solver(spec(), rho=0.05).fit(ref_net, _toy_data(seed=5), epochs=4, progress=False)

    ck = tmp_path / "ck.pt"
    net = _toy_net(seed=3)
    stop_after_two = lambda solver, model, rec: rec["epoch"] == 1
    ac.Solver(spec(), rho=0.05).fit(net, _toy_data(seed=5), epochs=4, checkpoint=ck,
                                   callbacks=[stop_after_two], progress=False)
    assert ck.exists()
    torch.manual_seed(1234)  # a different process state
    net2 = _toy_net(seed=99)
    ac.Solver(spec(), rho=0.05).fit(net2, _toy_data(seed=5), epochs=4, checkpoint=ck, progress=False)
    for a, b in zip(ref_net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_from_other_model_and_garbage_are_refused(tmp_path):
    ck = tmp_path / "ck.pt"
    ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.05).fit(
        _toy_net(), _toy_data(), epochs=1, checkpoint=ck, progress=False)
    before = ck.read_bytes()
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match="another model"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.05).fit(
            other, _toy_data(), epochs=2, checkpoint=ck, progress=False)
    assert ck.read_bytes() == before
    bad = tmp_path / "bad.pt"
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.05).fit(
            _toy_net(), _toy_data(), epochs=2, checkpoint=bad, progress=False)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    ck = tmp_path / "ck.pt"
    net = _toy_net()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.05)
    s.fit(net, _toy_data(), epochs=1, checkpoint=ck, progress=False)
    before = ck.read_bytes()
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        return F.cross_entropy(out, y) * (float("nan") if calls["n"] > 3 else 1.0)

    with pytest.raises(NonFiniteError, match="loss became nan"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.05).fit(
            net, _toy_data(), epochs=3, checkpoint=ck, loss_fn=loss_fn, progress=False)
    assert ck.read_bytes() == before


def test_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], rho=0.0)
    with pytest.raises(ValueError, match="mode"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], mode="sgd")
    with pytest.raises(ValueError, match="every"):
        ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))], every=0)
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))])
    with pytest.raises(RuntimeError, match="not prepared"):
        s.penalty()
    with pytest.raises(ValueError, match="epochs"):
        s.fit(_toy_net(), _toy_data(), epochs=-1)
    with pytest.raises(ValueError, match="not a valid torch device"):
        s.fit(_toy_net(), _toy_data(), epochs=1, device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_without_cuda():
    net = _toy_net()
    w = net[0].weight.detach().clone()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))])
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        s.fit(net, _toy_data(), epochs=1, device="cuda")
    assert torch.equal(net[0].weight, w)


def test_solver_export_equals_finalized_model_and_repr_tells_the_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    solver = ac.Solver([ac.Constrain("0", ac.LowRank(rank=2))], rho=0.1)
    assert "prepared" not in repr(solver) and "rho=0.1" in repr(solver)
    solver.prepare(model)
    solver.finalize(model)
    assert "prepared on 1 weight(s)" in repr(solver)
    compact = solver.export(model)
    x = torch.randn(4, 12)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert ac.complexity(compact, (12,)).params < ac.complexity(model, (12,)).params


def test_method_solvers_repr_their_own_settings():
    from admm_compress import methods

    assert repr(methods.lorita(2, 1e-3)) == "LoRITaSolver(n_factors=2, weight_decay=0.001, truncation='lsvt', specs=1)"
    assert repr(methods.decomposable_net((0.1, 0.3), lam=0.4)).startswith(
        "DecomposableNetSolver(rank_ratio=(0.1, 0.3), lam=0.4, criterion='global'")
