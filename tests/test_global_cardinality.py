"""Cardinality(scope="global"): one budget of entries shared by every weight bound to the set.

The joint projection against its definition (brute force over all supports, hypothesis) and
against torch's own ``prune.global_unstructured``; the weighted ADMM Z-step against brute force;
a planted sparse least-squares problem whose support only a shared budget can hold, solved by
``fit`` with the default rho; finalize / projected SGD / export (equal outputs, counted MACs);
models we did not write; and the refusals.
"""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import admm_compress as ac
from admm_compress import functional as F
from admm_compress.specs import SpecError

EPS = torch.finfo(torch.float64).eps


def _brute_best(xs, k, weights):
    """min over every support of size k of the weighted energy removed, by enumeration."""
    flat = torch.cat([w * x.reshape(-1) ** 2 for x, w in zip(xs, weights)])
    total = float(flat.sum())
    return min(total - float(flat[list(c)].sum()) for c in itertools.combinations(range(flat.numel()), k))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_joint_topk_is_the_weighted_projection(sizes, data):
    """The masks keep exactly k entries and remove the least weighted energy over all supports
    (brute force; compared by objective value, so ties may pick either entry)."""
    n = sum(sizes)
    k = data.draw(st.integers(1, n))
    vals = data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))  # small integers: ties on purpose
    ws = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=len(sizes), max_size=len(sizes)))
    xs, o = [], 0
    for s in sizes:
        xs.append(torch.tensor(vals[o:o + s], dtype=torch.float64))
        o += s
    for weights in (None, ws):
        w = [1.0] * len(xs) if weights is None else weights
        masks = F.joint_topk_masks(xs, k, weights)
        assert sum(int(m.sum()) for m in masks) == k
        removed = sum(float((wb * x[~m] ** 2).sum()) for x, m, wb in zip(xs, masks, w))
        # integers times weights in {0.5, 1, 2, 3}: every term and sum is exact in float64; 1e-12 only
        # guards the order of summation
        assert removed == pytest.approx(_brute_best(xs, k, w), abs=1e-12)


def test_joint_topk_matches_torch_global_unstructured():
    """The unweighted joint masks are torch.nn.utils.prune.global_unstructured's (float64 normal
    weights: no ties)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).double()
    with torch.no_grad():
        model[2].weight.mul_(3.0)  # different scales: a per-layer rule would allocate differently
    ws = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    k = round(0.2 * sum(w.numel() for w in ws))
    ours = F.joint_topk_masks(ws, k)
    prune.global_unstructured([(model[0], "weight"), (model[2], "weight")], pruning_method=prune.L1Unstructured,
                              amount=sum(w.numel() for w in ws) - k)
    assert torch.equal(ours[0], model[0].weight_mask.bool()) and torch.equal(ours[1], model[2].weight_mask.bool())
    assert int(ours[0].sum()) != round(0.2 * ws[0].numel())  # the allocation is not the per-layer one


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        m[4].weight.mul_(4.0)
    return m


def test_finalize_keeps_the_global_top_k_and_reports_feasible():
    m = _mlp()
    ws = [m[i].weight.detach().clone() for i in (0, 2, 4)]
    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.1, scope="global"))]).prepare(m)
    feas = s.finalize(m)
    k = round(0.1 * sum(w.numel() for w in ws))
    masks = F.joint_topk_masks(ws, k)
    for i, mask, w in zip((0, 2, 4), masks, ws):
        assert torch.equal(m[i].weight.detach(), torch.where(mask, w, torch.zeros_like(w)))
    assert sum(int(torch.count_nonzero(m[i].weight)) for i in (0, 2, 4)) == k
    assert all(feas.values())


def test_two_specs_sharing_one_instance_share_the_budget():
    m = _mlp()
    ws = [m[i].weight.detach().clone() for i in (0, 2, 4)]
    g = ac.Cardinality(density=0.1, scope="global")
    s = ac.Solver([ac.Constrain("0", g), ac.Constrain("2", g), ac.Constrain("4", ac.Cardinality(density=0.5))])
    s.prepare(m).finalize(m)
    k = round(0.1 * (ws[0].numel() + ws[1].numel()))
    assert int(torch.count_nonzero(m[0].weight)) + int(torch.count_nonzero(m[2].weight)) == k
    assert int(torch.count_nonzero(m[4].weight)) == round(0.5 * ws[2].numel())


def test_admm_zstep_is_the_rho_weighted_minimizer():
    """With per-weight rhos the Z-step minimizes sum_b rho_b ||Z_b - V_b||^2 over the shared budget
    (brute force on a small problem), which is not the unweighted projection here."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)).double()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.4, scope="global"))], rho=1.0).prepare(m)
    keys = [sl.key for sl in s.slots]
    s.rhos[keys[0]], s.rhos[keys[1]] = 1.0, 9.0
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[3.0, -2.5, 0.1], [0.2, 1.9, -0.3]], dtype=torch.float64))
        m[1].weight.copy_(torch.tensor([[1.0, -0.2], [0.9, 0.1]], dtype=torch.float64))
    V = {sl.key: sl.tensor().detach().clone() for sl in s.slots}
    Z = s.zstep(V)
    k = round(0.4 * 10)
    got = sum(r * float(((Z[key] - V[key]) ** 2).sum()) for key, r in zip(keys, (1.0, 9.0)))
    # at most 10 float64 terms below 100 each: summation-order rounding ~1e-14
    assert got == pytest.approx(_brute_best([V[keys[0]], V[keys[1]]], k, [1.0, 9.0]), abs=1e-12)
    assert sum(int(torch.count_nonzero(Z[key])) for key in keys) == k
    unweighted = F.joint_topk_masks([V[keys[0]], V[keys[1]]], k)
    assert int(unweighted[1].sum()) != int(torch.count_nonzero(Z[keys[1]]))  # the weights changed the choice


class _TwoBlocks(nn.Module):
    """y = a(x[:, :n]) + b(x[:, n:]): two weights, one per half of the input."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.a = nn.Linear(n, 1, bias=False)
        self.b = nn.Linear(n, 1, bias=False)

    def forward(self, x):
        return self.a(x[:, :self.n]) + self.b(x[:, self.n:])


def test_auto_rho_recovers_a_planted_support_only_a_shared_budget_can_hold():
    """min 1/2 ||A x - y||^2 s.t. card(x_a) + card(x_b) <= 5, y = A x*, x* with 4 non-zeros in the
    first half and 1 in the second: a per-layer density (2 or 3 each) cannot hold x*; the global
    set with the default rho finds its support and value."""
    n, m_rows = 20, 80
    g = torch.Generator().manual_seed(1)
    A = torch.randn(m_rows, 2 * n, generator=g, dtype=torch.float64) / math.sqrt(m_rows)
    x_star = torch.zeros(2 * n, dtype=torch.float64)
    support = [1, 5, 9, 13, n + 7]
    x_star[support] = torch.tensor([1.5, -1.2, 1.8, -1.4, 1.6], dtype=torch.float64)
    y = A @ x_star
    torch.manual_seed(0)
    model = _TwoBlocks(n).double()
    solver = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=5 / (2 * n), scope="global"))], every=10)
    h = solver.fit(model, [(A, y)] * 10, epochs=40, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                   loss_fn=lambda out, t: 0.5 * (out[:, 0] - t).pow(2).sum(), progress=False)
    w = torch.cat([model.a.weight.detach()[0], model.b.weight.detach()[0]])
    assert set(torch.nonzero(w).flatten().tolist()) == set(support)
    # as in test_adaptive_rho: what is left is the primal residual the run reached (< r_end), times
    # ||x*|| and A's conditioning (< 10 for m = 2n Gaussian rows)
    r_end = solver.rho_schedule.r_end
    assert solver.residuals[-1]["primal"] < r_end
    assert float(torch.linalg.norm(w - x_star)) < 10 * r_end * float(torch.linalg.norm(x_star))
    assert h.final["feasible"]


def test_projected_sgd_keeps_the_shared_budget():
    m = _mlp()
    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.2, scope="global"))], mode="projection")
    s.prepare(m)
    rec = s.update()
    total = sum(m[i].weight.numel() for i in (0, 2, 4))
    assert sum(int(torch.count_nonzero(m[i].weight)) for i in (0, 2, 4)) == round(0.2 * total)
    assert rec["primal"] > 0


def test_export_equals_the_finalized_model_and_counts_the_kept_entries():
    m = _mlp().float()
    spec = [ac.Constrain(nn.Linear, ac.Cardinality(density=0.15, scope="global"))]
    s = ac.Solver(spec).prepare(m)
    s.finalize(m)
    removed = sum(int((m[i].weight == 0).sum()) for i in (0, 2, 4))
    dense_macs = ac.complexity(m, (12,)).macs
    for exported in (ac.export(m, s), ac.export(m, spec)):  # the solver or its plain spec
        x = torch.randn(7, 12)
        torch.testing.assert_close(exported(x), m(x), rtol=0, atol=0)
        # ptflops counts a sparse layer at its non-zeros: one MAC fewer per removed entry
        assert dense_macs - ac.complexity(exported, (12,)).macs == removed


def test_finalize_warns_when_the_budget_empties_a_layer(caplog):
    m = _mlp()  # its last layer is 4x larger: at density 0.15 the middle layer keeps nothing
    s = ac.Solver([ac.Constrain(nn.Linear, ac.Cardinality(density=0.15, scope="global"))]).prepare(m)
    with caplog.at_level("WARNING", logger="admm_compress.solver"):
        s.finalize(m)
    assert int(torch.count_nonzero(m[2].weight)) == 0
    assert "left no entries in 1 layer(s): 2.weight" in caplog.text


def test_export_of_an_unfinalized_model_projects_jointly():
    m = _mlp().float()
    spec = [ac.Constrain(nn.Linear, ac.Cardinality(density=0.15, scope="global"))]
    ref = ac.Solver(spec).prepare(m_ref := _mlp().float())
    ref.finalize(m_ref)
    exported = ac.export(m, spec)
    x = torch.randn(4, 12)
    torch.testing.assert_close(exported(x), m_ref(x), rtol=0, atol=0)


def test_refusals_name_the_parameter_and_the_fix():
    with pytest.raises(ValueError, match="scope must be one of"):
        ac.Cardinality(density=0.1, scope="model")
    with pytest.raises(ValueError, match="unstructured only.*group_dim=1"):
        ac.Cardinality(density=0.1, group_dim=1, scope="global")
    with pytest.raises(ValueError, match="takes density=.*k=3"):
        ac.Cardinality(k=3, scope="global")
    with pytest.raises(ValueError, match="scope='global'.*scope='layer'"):
        ac.Sum(ac.LowRank(rank=1), ac.Cardinality(density=0.1, scope="global"))
    with pytest.raises(SpecError, match="metric='bn'"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        ac.Solver([ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.1, scope="global"), metric="bn")]).prepare(model)


def test_torchvision_resnet18_global_prune_export():
    """A model we did not write: every Conv2d and the Linear under one budget; the export equals the
    finalized model and ptflops counts the kept entries (conv MACs = kept entries x positions)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    g = ac.Cardinality(density=0.05, scope="global")
    s = ac.Solver([ac.Constrain(nn.Conv2d, g), ac.Constrain(nn.Linear, g)]).prepare(model)
    s.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m in layers)
    kept = [int(torch.count_nonzero(m.weight)) for m in layers]
    assert sum(kept) == round(0.05 * total)
    assert len(set(round(k / m.weight.numel(), 3) for k, m in zip(kept, layers))) > 1  # not a uniform density
    exported = ac.export(model, s).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), exported(x)
    # float32: the masked dense conv sums the same products as the finalized one
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert ac.complexity(exported, (3, 64, 64)).macs < 0.2 * ac.complexity(model, (3, 64, 64)).macs
