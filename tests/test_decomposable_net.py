"""Decomposable-Net as a configuration of the Solver (papers/002): Eq. 1 + Eq. 12 gradient,
rank sampling, export at any size with BN recalibration, argument errors, trained-model claim.

The truncated-SVD backward (gradcheck, clipping, degenerate spectra) and Prop. 1 on matrices and
channel-wise conv views are tested in test_lowrank_autograd.py / test_rank_selection.py; here
they are checked again only through this module's own code paths.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import admm_compress as ac
from admm_compress.methods.decomposable_net import (DecomposableNetSolver, decomposable_net,
                                                    recalibrate_bn)
from admm_compress.rank_selection import (dn_matrix, dn_unmatrix, global_rank_selection,
                                          uniform_rank_selection)
from admm_compress.specs import SpecError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cnn(in_ch=3, dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 6, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).to(dtype)


def set_separated_spectra(solver, model, ratio=0.6, seed=0):
    """Give every decomposed weight a view with singular values top * ratio^i (no clipping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for L in solver._layers_for(model):
            m, n = dn_matrix(L.weight.detach(), L.scheme).shape  # the paper's orientation
            k = min(m, n)
            U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))
            V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
            s = torch.tensor([2.0 * ratio ** i for i in range(k)], dtype=F64)
            mat = (U * s) @ V.mT
            L.weight.copy_(dn_unmatrix(mat, tuple(L.weight.shape), L.scheme).to(L.weight.dtype))


def naive_truncate(mat, r):
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


# ------------------------------------------------------------------ argument errors
@pytest.mark.parametrize("kwargs, words", [
    (dict(rank_ratio=(0.3, 0.2)), ["alpha_l=0.3", "alpha_u=0.2"]),
    (dict(rank_ratio=(0.25, 0.25)), ["alpha_l=0.25", "alpha_u=0.25"]),
    (dict(rank_ratio=(0.0, 0.25)), ["alpha_l"]),
    (dict(rank_ratio=(0.1, 1.5)), ["alpha_u"]),
    (dict(lam=1.5), ["lam=1.5", "[0.0, 1.0]"]),
    (dict(lam=-0.1), ["lam=-0.1"]),
    (dict(criterion="sv"), ["criterion='sv'"]),
    (dict(scheme="tucker"), ["scheme='tucker'"]),
    (dict(scheme={"0": "diag"}), ["scheme['0']"]),
    (dict(min_rank=0), ["min_rank=0"]),
    (dict(clip=1.0), ["clip=1.0"]),
    (dict(rank_rule="papers"), ["rank_rule='papers'", "official", "paper", "reserve"]),
    (dict(export_ratio=0.0), ["export_ratio=0.0"]),
])
def test_bad_arguments_raise_at_construction(kwargs, words):
    with pytest.raises(ValueError) as e:
        decomposable_net(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_rank_ratio_must_be_a_pair():
    with pytest.raises(TypeError, match="rank_ratio"):
        decomposable_net(rank_ratio=0.25)


def test_unsupported_layers_and_unmatched_scheme_glob_raise_at_prepare():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(SpecError, match=r"layer '0'.*groups=2"):
        decomposable_net(targets=nn.Conv2d).prepare(model)
    with pytest.raises(SpecError, match=r"layer '0'.*Conv1d"):
        decomposable_net(targets=nn.Conv1d).prepare(nn.Sequential(nn.Conv1d(2, 3, 3)))
    with pytest.raises(SpecError, match="'nope'"):
        decomposable_net(scheme={"nope": "spatial"}).prepare(small_cnn())


def test_scheme_per_layer_and_1x1_is_channel():
    s = decomposable_net(scheme={"3": "spatial", "*": "channel"})
    s.prepare(small_cnn())
    schemes = {L.name: L.scheme for L in s.layers}
    assert schemes == {"0": "channel", "3": "spatial", "6": "channel", "10": "channel"}
    s2 = decomposable_net(scheme="spatial").prepare(small_cnn())
    assert {L.name: L.scheme for L in s2.layers}["6"] == "channel"      # 1 x 1 kernel
    # the library spatial view (kh*O, kw*I): the transpose of the paper's (kw*I, kh*O), same spectrum
    assert {L.name: L.matrix_shape for L in s2.layers}["3"] == (3 * 12, 3 * 8)


# --------------------------------------------------------------- Eq. 1 / Eq. 12 gradient
@pytest.mark.parametrize("lam, rescale", [(0.3, True), (1.0, True), (0.5, False)])
def test_joint_gradient_equals_definition(lam, rescale):
    """p.grad = (1-lam) dL(W)/dp + lam * c_p dL(P_r(W))/dp with c_p = ||g_f|| / ||g_low|| for the
    decomposed weights (Eq. 12) and 1 for the shared parameters, where the low-rank gradient is
    computed independently by torch's own SVD autograd on float64 weights whose views have
    well-separated singular values (no clipping: the custom backward is exact)."""
    torch.manual_seed(0)
    model = small_cnn(dtype=F64).train()
    s = decomposable_net(rank_ratio=(0.2, 0.6), lam=lam, scheme={"3": "spatial"}, min_rank=2,
                         rescale=rescale, seed=3)
    s.prepare(model)
    set_separated_spectra(s, model)
    ref = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, dtype=F64)
    y = torch.randint(0, 5, (6,))
    weights_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss, out = s.backward(model, x, y, F.cross_entropy)
    ranks = s.last["ranks"]
    assert any(ranks[L.name] < L.full_rank for L in s.layers)
    # reference
    named = dict(ref.named_parameters())
    lf = F.cross_entropy(ref(x), y)
    gf = dict(zip(named, torch.autograd.grad(lf, list(named.values()))))
    subst = {n: b.clone() for n, b in ref.named_buffers()}
    for L in s.layers:
        w = named[L.key]
        mat = dn_matrix(w, L.scheme)
        subst[L.key] = dn_unmatrix(naive_truncate(mat, ranks[L.name]), tuple(w.shape), L.scheme)
    ll = F.cross_entropy(functional_call(ref, subst, (x,)), y)
    gl = dict(zip(named, torch.autograd.grad(ll, list(named.values()), allow_unused=True)))
    torch.testing.assert_close(loss, ((1 - lam) * lf + lam * ll).detach())
    decomposed = {L.key for L in s.layers}
    for n, p in model.named_parameters():
        g_low = gl[n] if gl[n] is not None else torch.zeros_like(p)
        c = (gf[n].norm() / g_low.norm()) if (n in decomposed and rescale) else 1.0
        torch.testing.assert_close(p.grad, (1 - lam) * gf[n] + lam * c * g_low, rtol=1e-7, atol=1e-10)
    # weights untouched; running statistics are those of the full-rank pass only
    for k, v in model.named_parameters():
        assert torch.equal(v, weights_before[k])
    for (k, v), (_, v_ref) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(out, model(x).detach())   # outputs are the full network's


def test_lam_zero_is_normal_learning():
    model = small_cnn()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    s = decomposable_net(lam=0.0).prepare(model)
    s.backward(model, x, y, F.cross_entropy)
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert s.last["ranks"] is None


def test_step_finite_with_repeated_singular_values():
    """Weights whose views have all-equal singular values (orthogonal): the clipped backward
    keeps the joint gradient finite (the unclipped K of Eq. 7 would divide by zero)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.copy_(torch.linalg.qr(torch.randn(8, 8))[0])
    s = decomposable_net(rank_ratio=(0.3, 0.6), min_rank=1, seed=0).prepare(model)
    for _ in range(5):
        model.zero_grad()
        s.backward(model, torch.randn(16, 8), torch.randint(0, 8, (16,)), F.cross_entropy)
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_gradcheck_through_conv_views():
    """The glue (dn_matrix -> clipped truncated SVD -> dn_unmatrix) is differentiated correctly:
    gradcheck in float64 on conv weights with well-separated view spectra, both schemes."""
    for scheme in ("channel", "spatial"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3)).to(F64)
        s = decomposable_net(scheme=scheme, min_rank=1).prepare(model)
        set_separated_spectra(s, model, ratio=0.5)
        L = s.layers[0]
        w = L.weight.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: s.low_rank_weight(L, t, 2), (w,), atol=1e-6)


# -------------------------------------------------------------------- rank sampling
@pytest.mark.parametrize("criterion", ["global", "uniform", "energy"])
@pytest.mark.parametrize("rule, floor_mode", [("official", "clip"), ("paper", "none"), ("reserve", "reserve")])
def test_sampled_ranks_follow_the_criterion(criterion, rule, floor_mode):
    model = small_cnn()
    s = decomposable_net(rank_ratio=(0.2, 0.7), criterion=criterion, min_rank=2, seed=1,
                         rank_rule=rule).prepare(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for _ in range(3):
        s.backward(model, x, y, F.cross_entropy)
        z = s.last["keep_ratio"]
        assert 0.2 <= z <= 0.7
        svals = [torch.linalg.svdvals(dn_matrix(L.weight.detach(), L.scheme)) for L in s.layers]
        if criterion == "uniform":
            want = uniform_rank_selection([L.full_rank for L in s.layers], z, 2)
        else:
            want = global_rank_selection(svals, keep_ratio=z, min_rank=2, floor_mode=floor_mode,
                                         criterion="sv" if criterion == "global" else "energy")
        assert [s.last["ranks"][L.name] for L in s.layers] == want


def test_keep_ratio_sequence_resumes_from_state_dict():
    model = small_cnn()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    s = decomposable_net(seed=7).prepare(model)
    s.backward(model, x, y, F.cross_entropy)
    sd = s.state_dict()
    rest = []
    for _ in range(3):
        s.backward(model, x, y, F.cross_entropy)
        rest.append(s.last["keep_ratio"])
    s2 = decomposable_net(seed=123).prepare(model)
    s2.load_state_dict(sd)
    again = []
    for _ in range(3):
        s2.backward(model, x, y, F.cross_entropy)
        again.append(s2.last["keep_ratio"])
    assert again == rest


def test_fit_keeps_the_model_full_rank():
    torch.manual_seed(0)
    model = small_cnn()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    s = decomposable_net(rank_ratio=(0.1, 0.5), seed=0)
    hist = s.fit(model, data, epochs=2, progress=False)
    assert len(hist.epochs) == 2 and hist.final["feasible"]
    assert float(s.penalty()) == 0.0 and not hasattr(s, "Z") and not hasattr(s, "U")  # no Z/U splitting
    assert len(s.epoch_stats) == 2 and 0.1 <= s.epoch_stats[-1]["keep_ratio"] <= 0.5
    for L in s.layers:  # never projected
        assert int(torch.linalg.matrix_rank(dn_matrix(L.weight.detach(), L.scheme))) == L.full_rank


def test_finetune_keeps_the_joint_objective_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(3)]
    s = decomposable_net(rank_ratio=(0.1, 0.5), seed=0)
    hist = s.fit(model, data, epochs=1, finetune_epochs=2, progress=False, checkpoint=tmp_path / "ck.pt")
    assert [e["phase"] for e in hist.epochs] == ["train", "finetune", "finetune"]
    assert len(s.epoch_stats) == 3  # the low-rank pass ran in every fine-tuning epoch too
    assert s.last["loss_low"] is not None
    assert not any(type(m).__name__ == "ParametrizationList" for m in model.modules())  # no frozen structure
    for L in s.layers:
        assert int(torch.linalg.matrix_rank(dn_matrix(L.weight.detach(), L.scheme))) == L.full_rank
    assert ac.training.load_checkpoint(tmp_path / "ck.pt")["phase"] == "finetune"


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_export_equals_truncated_model_and_costs_less(scheme):
    torch.manual_seed(0)
    model = small_cnn().eval()
    s = decomposable_net(scheme=scheme, min_rank=2).prepare(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 8, 8)
    dense = ac.complexity(model, (3, 8, 8), backend="pytorch")
    for z in (0.3, 0.6):
        compact = s.export(model, rank_ratio=z, input_size=(3, 8, 8))
        ranks = compact.decomposable_net_ranks
        trunc = s.truncate(model, ranks)
        torch.testing.assert_close(compact(x), trunc(x), rtol=1e-4, atol=1e-5)
        for L in s.layers:      # the truncation is the best rank-r approximation of the view
            w = dict(trunc.named_modules())[L.name].weight
            torch.testing.assert_close(dn_matrix(w, L.scheme),
                                       naive_truncate(dn_matrix(L.weight.detach(), L.scheme), ranks[L.name]),
                                       rtol=1e-4, atol=1e-5)
        c = ac.complexity(compact, (3, 8, 8), backend="pytorch")
        assert c.macs < dense.macs and c.params < dense.params
        assert {type(m) for m in compact.modules()} <= {nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
                                                         nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}
        assert not compact.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_macs_budget_fits_and_is_maximal():
    torch.manual_seed(0)
    model = small_cnn().eval()
    s = decomposable_net(min_rank=1).prepare(model)
    size = (3, 8, 8)
    dense = ac.complexity(model, size, backend="pytorch").macs
    for frac in (0.5, 0.75):
        budget = frac * dense
        compact = s.export(model, macs=budget, input_size=size)
        assert ac.complexity(compact, size, backend="pytorch").macs <= budget
        ranks = compact.decomposable_net_ranks
        for L in s.layers:     # one more basis in any layer no longer fits (or is impossible)
            if ranks[L.name] < L.full_rank:
                bigger = dict(ranks, **{L.name: ranks[L.name] + 1})
                c = ac.complexity(s.export(model, ranks=bigger, input_size=size), size, backend="pytorch")
                assert c.macs > budget


def test_bn_recalibration_recomputes_statistics_for_the_size():
    torch.manual_seed(0)
    model = small_cnn().eval()
    s = decomposable_net(min_rank=2).prepare(model)
    batches = [(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    plain = s.export(model, rank_ratio=0.4)
    recal = s.export(model, rank_ratio=0.4, bn_loader=batches, bn_batches=2)
    # expected: mean over the first 2 batches of the batch mean / unbiased variance of each BN input
    bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = {bn: [] for bn in bns}
    hooks = [bn.register_forward_hook(lambda m, i, o: seen[m].append(i[0].detach())) for bn in bns]
    plain.train()
    with torch.no_grad():
        for xb, _ in batches[:2]:
            plain(xb)
    for h in hooks:
        h.remove()
    got = [m for m in recal.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, bn_new in zip(bns, got):
        mean = torch.stack([a.mean((0, 2, 3)) for a in seen[bn]]).mean(0)
        var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in seen[bn]]).mean(0)
        torch.testing.assert_close(bn_new.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn_new.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn_new.momentum == 0.1 and not bn_new.training
    assert recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), batches) == 0


class _Exploding:
    def __iter__(self):
        raise AssertionError("the loader must not be touched")


def test_target_below_floors_raises_naming_layer_before_any_work():
    model = small_cnn()
    s = decomposable_net(min_rank=5, rank_rule="reserve").prepare(model)  # floors 5, 5, 5, 5 of R = 8, 12, 6, 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank_ratio=0\.05.*'0': floor 5 of R=8.*smallest admissible"):
        s.export(model, rank_ratio=0.05, bn_loader=_Exploding())
    with pytest.raises(ValueError, match=r"macs=1,000 .*floors.*'\d+' at rank 5"):
        s.export(model, macs=1000, input_size=(3, 8, 8), bn_loader=_Exploding())
    with pytest.raises(ValueError, match=r"layer '3': rank=2 is below its floor"):
        s.export(model, ranks={"3": 2}, bn_loader=_Exploding())
    with pytest.raises(ValueError, match=r"layer '3': rank=13 exceeds its full rank R=12"):
        s.export(model, ranks={"3": 13})
    with pytest.raises(ValueError, match="not decomposed"):
        s.export(model, ranks={"conv9": 3})
    with pytest.raises(ValueError, match="at most one"):
        s.export(model, rank_ratio=0.5, macs=1e6)
    with pytest.raises(ValueError, match="input_size"):
        s.export(model, macs=1e6)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


# ------------------------------------------------------------ Prop. 1 via truncate()
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(2, 7), inp=st.integers(2, 7))
def test_prop1_truncate_layer_error_non_increasing(seed, out, inp):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out)).to(F64)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(out, inp, generator=g, dtype=F64))
    x = torch.randn(9, inp, generator=g, dtype=F64)
    s = decomposable_net(min_rank=1).prepare(model)
    y = model(x).detach()
    R = min(out, inp)
    with torch.no_grad():
        errs = [float(((y - s.truncate(model, {"0": r})(x)) ** 2).sum()) for r in range(1, R + 1)]
    tol = 1e-10 * (float((y ** 2).sum()) + 1)
    assert all(a >= b - tol for a, b in zip(errs, errs[1:])) and errs[-1] <= tol


# ---------------------------------------------------------------- the paper's claim
def _tiny_cnn():
    def block(i, o, st_):
        return [nn.Conv2d(i, o, 3, stride=st_, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 32, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def test_trained_model_degrades_gracefully_and_beats_normal_training_truncated():
    """8x8 digits, a 3-conv BN network, 8 epochs each of Decomposable-Net (lam=0.5,
    Z ~ U(0.01, 0.5)) and of normal learning (lam=0), same init and data order.  At Z = 1, 0.7,
    0.5, 0.3 (ranks from the decomp-net model, BN recalibrated per size): accuracy falls (within
    1.5 points of noise) as the size shrinks; at the compressed sizes it is not worse than the
    normally trained network truncated to the same ranks, and at the smallest size (where
    truncating a normally trained network destroys it) clearly better.  Measured on this setup
    (2026-12-02, torch 2.14.1): 97.5 / 97.2 / 96.4 / 94.2 % vs 98.9 / 95.8 / 93.6 / 74.2 %; an
    earlier machine gave 86.7 / 61.1 % for the last two baseline sizes, so the gap at Z = 0.5 is
    not asserted (one test image is 0.28 points)."""
    torch.manual_seed(0)
    train, test = ac.data.digits(batch_size=64, flat=False)
    init = _tiny_cnn()
    trained = {}
    for lam in (0.5, 0.0):
        model = copy.deepcopy(init)
        torch.manual_seed(0)
        s = decomposable_net(rank_ratio=(0.01, 0.5), lam=lam, seed=0)
        s.fit(model, train, epochs=8, lr=0.05, progress=False,
              scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 8))
        trained[lam] = (s, model)
    (dn, dn_model), (base, base_model) = trained[0.5], trained[0.0]
    acc_dn, acc_base = [], []
    for z in (1.0, 0.7, 0.5, 0.3):
        ranks = dn.select_ranks(dn_model, rank_ratio=z)
        acc_dn.append(ac.evaluate(dn.export(dn_model, ranks=ranks, bn_loader=train), test)["accuracy"])
        acc_base.append(ac.evaluate(base.export(base_model, ranks=ranks, bn_loader=train), test)["accuracy"])
    print("decomp-net", acc_dn, "base truncated", acc_base)
    assert all(b <= a + 1.5 for a, b in zip(acc_dn, acc_dn[1:]))
    assert acc_dn[-1] < acc_dn[0]
    assert acc_dn[0] > 90.0
    assert acc_dn[1] >= acc_base[1] - 1.0
    assert all(d >= b - 1.0 for d, b in zip(acc_dn[1:], acc_base[1:]))
    assert acc_dn[-1] > acc_base[-1] + 5.0


# ------------------------------------------------- export through the generic export (issue 17)
def _dn_factor_module(L, m, r):
    """Decomposable-Net's own factor layers (the solver's exporter before issue 16)."""
    from admm_compress.methods._decomposable_net.rank_selection import dn_factor_convs, dn_factor_linear

    if isinstance(m, nn.Linear):
        first_w, second_w, bias = dn_factor_linear(m.weight, m.bias, r)
        first = nn.Linear(m.in_features, r, bias=False)
        second = nn.Linear(r, m.out_features, bias=bias is not None)
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias is not None:
            second.bias.copy_(bias)
        return nn.Sequential(first, second)
    kwargs = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                  padding_mode=m.padding_mode)
    return dn_factor_convs(m.weight, m.bias, r, L.scheme, kwargs).to_sequential()


def _reference_export(s, model, ranks, input_size):
    """The pre-issue-17 export path: Decomposable-Net's own factorization (dn_factor_convs /
    dn_factor_linear) where the factor pair is cheaper, the truncated weight otherwise."""
    layers = s._layers_for(model)
    costs = s._cost_fns(layers, s._geometry(model, layers, input_size))
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for L, (dense, _, fact) in zip(layers, costs):
            r = ranks[L.name]
            if r >= L.full_rank:
                continue
            m = mods[L.name]
            if fact(r) < dense:
                parent, _, attr = L.name.rpartition(".")
                setattr(out.get_submodule(parent) if parent else out, attr, _dn_factor_module(L, m, r))
            else:
                m.weight.copy_(s.low_rank_weight(L, m.weight.detach(), r))
    return out


def _structure(model):
    return [(type(m).__name__, getattr(m, "kernel_size", None), getattr(m, "in_channels", getattr(m, "in_features", None)),
             getattr(m, "out_channels", getattr(m, "out_features", None)), getattr(m, "stride", None))
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_export_through_generic_export_equals_the_previous_export(scheme):
    torch.manual_seed(0)
    model = small_cnn().eval()
    s = decomposable_net(scheme=scheme, min_rank=2).prepare(model)
    x = torch.randn(5, 3, 8, 8)
    for z in (0.3, 0.6, 0.9):
        compact = s.export(model, rank_ratio=z, input_size=(3, 8, 8), bn_loader=False)
        ref = _reference_export(s, model, compact.decomposable_net_ranks, (3, 8, 8))
        assert _structure(compact) == _structure(ref)
        # float32 factorizations of the same truncation: a few ulps of the output scale
        torch.testing.assert_close(compact(x), ref(x), rtol=1e-4, atol=1e-5)


def test_export_spec_is_one_lowrank_spec_per_layer_at_the_configured_size(caplog):
    torch.manual_seed(0)
    model = small_cnn().eval()
    s = decomposable_net(rank_ratio=(0.1, 0.5), min_rank=2, scheme="spatial").prepare(model)
    assert s.export_ratio == 0.5                       # default: alpha_u
    with caplog.at_level("WARNING"):
        specs = s.export_spec()
    assert "without recalibrating its BatchNorm statistics" in caplog.text
    assert "bn_loader" in caplog.text
    ranks = s.select_ranks(model, 0.5)
    want = {L.name: (ranks[L.name], "matrix" if isinstance(L.module, nn.Linear) else L.scheme)
            for L in s.layers if ranks[L.name] < L.full_rank}
    got = {c.target: (c.constraint.rank, c.view) for c in specs}
    assert got == want and all(isinstance(c.constraint, ac.LowRank) for c in specs)
    compact = ac.export(model, specs)
    ours = s.export(model, bn_loader=False)          # no target: the configured size too
    assert ours.decomposable_net_ranks == ranks
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compact(x), ours(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact(x), s.truncate(model, ranks)(x), rtol=1e-4, atol=1e-5)


def test_paper_rule_rank_zero_exports_a_bias_only_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    with torch.no_grad():      # layer 2 has tiny singular values: the global cut drops all of them
        model[2].weight.mul_(1e-4)
    s = decomposable_net(rank_ratio=(0.1, 0.5), rank_rule="paper").prepare(model)
    ranks = s.select_ranks(model, 0.5)
    assert ranks["2"] == 0 and all(L.floor == 0 for L in s.layers)
    official = decomposable_net(rank_ratio=(0.1, 0.5), min_rank=2).prepare(model).select_ranks(model, 0.5)
    assert official["2"] == 2
    compact = s.export(model, rank_ratio=0.5)
    x = torch.randn(7, 6, dtype=F64)
    torch.testing.assert_close(compact(x), s.truncate(model, ranks)(x), rtol=1e-10, atol=1e-12)
    # the layer's output is its bias alone, for every input
    h = torch.relu(compact[0](x))
    torch.testing.assert_close(compact[2](h), model[2].bias.expand(7, 8), rtol=0, atol=0)
    assert isinstance(compact[2], nn.Sequential) and compact[2][0].out_features == 1
    # in training the rank-0 layer's low-rank weight is zero
    L = s.layers[1]
    assert torch.count_nonzero(s.low_rank_weight(L, L.weight, 0)) == 0


class _Counting:
    def __init__(self, batches):
        self.batches, self.seen = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.seen += 1
            yield b


def test_bn_statistics_on_the_whole_fit_loader_by_default_and_bounded_on_request(caplog):
    torch.manual_seed(0)
    model = small_cnn()
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(5)]
    s = decomposable_net(min_rank=2, seed=0)
    loader = _Counting(batches)
    s.fit(model, loader, epochs=1, lr=0.01, progress=False)
    loader.seen = 0
    s.export(model, rank_ratio=0.5)
    assert loader.seen == len(batches)                 # footnote 1: the whole training set
    loader.seen = 0
    s.export(model, rank_ratio=0.5, bn_batches=2)
    assert loader.seen == 2                            # the bounded-cost option
    # without a fit loader: a warning, statistics untouched
    fresh = decomposable_net(min_rank=2).prepare(small_cnn())
    with caplog.at_level("WARNING"):
        fresh.export(fresh._model_ref, rank_ratio=0.5)
    assert "not recalibrated" in caplog.text


def test_default_optimizer_is_nesterov_with_weight_decay_on_weights_only(monkeypatch):
    model = small_cnn()
    s = decomposable_net().prepare(model)
    opt = s.default_optimizer(model, 0.1)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    # fit and its fine-tuning use it too (fine-tuning at lr / 10)
    made = []
    real = DecomposableNetSolver.paper_sgd
    monkeypatch.setattr(DecomposableNetSolver, "paper_sgd",
                        staticmethod(lambda params, lr: made.append(lr) or real(params, lr)))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    decomposable_net(min_rank=2, seed=0).fit(small_cnn(), batches, epochs=1, lr=0.2, finetune_epochs=1,
                                             progress=False)
    assert made == [0.2, pytest.approx(0.02)]
