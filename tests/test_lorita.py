"""LoRITa as a configuration of the general Solver (papers/004): prepare, Eq. 8, Prop. 4.2,
finalize (collapse + LSVT / GSVT / ISVT), export, fine-tuning, validation."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import admm_compress as ac
from admm_compress.compressor import Compressor
from admm_compress import models
from admm_compress.factorization import (factor_parameters, gsvt, is_factorized,
                                         lowrank_param_count)
from admm_compress.methods.lorita import LoRITaSolver, lorita

SETTINGS = settings(max_examples=20, deadline=None)


# ============================================================================ helpers
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)


class Grouped(nn.Module):
    """conv + plain linear + attention projections (no forward needed for GSVT)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)          # 6 x 36
        self.fc = nn.Linear(10, 6)              # 6 x 10
        self.attn = SelfAttention(6)            # 6 x 6 each


def _with_spectrum(m: int, n: int, s, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.tensor(s, dtype=torch.float64)
    return (U[:, :len(s)] * s) @ V[:, :len(s)].T


def _svd_r(w: torch.Tensor, r: int) -> torch.Tensor:
    mat = w.reshape(w.shape[0], -1).double()
    U, s, Vh = torch.linalg.svd(mat, full_matrices=False)
    return ((U[:, :r] * s[:r]) @ Vh[:r]).reshape(w.shape).to(w.dtype)


def _rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.reshape(w.shape[0], -1).double(), rtol=1e-5))


def _batches(n_batches=3, bs=16, shape=(64,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g))
            for _ in range(n_batches)]


def _perturb_factors(model: nn.Module, scale: float = 0.1):
    """Stand-in for training: random changes of every factor (factors become unbalanced)."""
    with torch.no_grad():
        for p in factor_parameters(model):
            p.add_(scale * torch.randn_like(p))


# ============================================================================ prepare
@pytest.mark.parametrize("n_factors", [2, 3])
def test_prepare_keeps_module_tree_state_dict_and_function(n_factors):
    model = SmallCNN()
    before = {n: type(m) for n, m in model.named_modules()}
    keys0 = set(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x)
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2", "fc")}
    s = lorita(n_factors, 1e-3, truncation=None, init="svd")
    assert isinstance(s, LoRITaSolver) and isinstance(s, Compressor) and not isinstance(s, ac.Solver)
    s.prepare(model)
    assert s.factorized == ["conv1", "conv2", "fc"]
    after = dict(model.named_modules())
    for name, cls in before.items():                  # same names, same (base) classes
        assert name in after and isinstance(after[name], cls)
    assert all(n in before or ".parametrizations" in n for n in after)
    expected = {k for k in keys0 if not k.endswith(".weight")} | {
        f"{l}.parametrizations.weight.original{i}" for l in ("conv1", "conv2", "fc") for i in range(n_factors)}
    assert set(model.state_dict()) == expected
    # the product is the original weight (balanced split) and the function is unchanged
    for n, w in w0.items():
        torch.testing.assert_close(model.get_submodule(n).weight, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    # collapse (finalize without truncation) gives back the original keys and a loadable state dict
    s.finalize(model)
    assert set(model.state_dict()) == keys0
    fresh = SmallCNN()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), y0, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already finalized"):
        s.finalize(model)


def test_prepare_vit_attention_groups_and_describe():
    model = models.vit(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden=8, mlp_dim=12)
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x)
    s = lorita(2, 1e-4, truncation="gsvt", keep=0.5, init="svd")
    s.prepare(model)
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    groups = s.groups()
    assert groups["conv"] == ["patch_embed"]
    assert groups["attention"] == [f"blocks.0.attn.{p}" for p in ("q", "k", "v", "out")]
    assert groups["linear"] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "head"]
    text = s.describe()
    assert "blocks.0.attn.q" in text and "attention" in text and "8x8 8x8" in text
    assert "patch_embed" in text and "8x48" in text


def test_prepare_twice_and_grouped_conv_skipped():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6, 2))
    s = lorita(2, 1e-4, truncation=None)
    s.prepare(model)
    assert s.factorized == ["1", "3"]                  # depthwise conv left alone
    with pytest.raises(ValueError, match="already has factorized"):
        lorita(2, 1e-4, truncation=None).prepare(model)


def test_n_factors_one_is_the_plain_baseline():
    model = models.fcn(depth=3, width=12)
    s = lorita(1, 1e-3, truncation="lsvt", rank=2)
    s.prepare(model)
    assert s.factorized == [] and not any(is_factorized(m) for m in model.modules())
    assert set(model.state_dict()) == set(models.fcn(depth=3, width=12).state_dict())
    w = model.layers[1].weight.detach().clone()
    s.finalize(model)
    torch.testing.assert_close(model.layers[1].weight.detach(), _svd_r(w, 2), atol=1e-5, rtol=1e-5)
    assert s.final_ranks == {"layers.0": 2, "layers.1": 2, "layers.2": 2}


# ============================================================================ Eq. 8: weight decay on the factors
@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_default_optimizer_decays_the_factors(n_factors):
    """One SGD step with zero data gradient: every factor shrinks by (1 - lr*wd), so the collapsed
    weight is (1 - lr*wd)^N W0 (decay on W itself would give (1 - lr*wd) W0); biases use
    other_weight_decay."""
    lr, wd = 0.5, 0.2
    model = models.fcn(depth=3, width=12)
    w0 = [l.weight.detach().clone() for l in model.layers]
    b0 = [l.bias.detach().clone() for l in model.layers]
    s = lorita(n_factors, wd, truncation=None, momentum=0.0, other_weight_decay=0.0, init="svd")
    seen = {}
    make = s.default_optimizer

    def spy(m, lr_):
        o = make(m, lr_)
        seen["opt"] = o
        seen["factors"] = {id(p) for p in factor_parameters(m)} if n_factors > 1 else \
            {id(l.weight) for l in m.layers}
        return o

    s.default_optimizer = spy
    zero = lambda out, y: 0.0 * out.sum()
    s.fit(model, _batches(1, shape=(64,)), epochs=1, loss_fn=zero, lr=lr)
    decayed = [g for g in seen["opt"].param_groups if g["weight_decay"] == wd]
    assert len(decayed) == 1 and {id(p) for p in decayed[0]["params"]} == seen["factors"]
    for l, w, b in zip(model.layers, w0, b0):
        torch.testing.assert_close(l.weight.detach(), (1 - lr * wd) ** n_factors * w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l.bias.detach(), b)


def test_user_optimizer_must_be_built_after_prepare():
    model = models.fcn(depth=2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reparameterized"):
        lorita(2, 1e-4, truncation=None).fit(model, _batches(1), epochs=1, optimizer=opt)
    model = models.fcn(depth=2, width=8)
    s = lorita(2, 1e-4, truncation=None)
    s.fit(model, _batches(1), epochs=1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4))
    assert s.steps == 1 and s.epochs_done == 1 and len(s.fit_times) == 1


def test_penalty_is_zero_and_steps_are_noops():
    model = models.fcn(depth=2, width=8)
    s = lorita(3, 1e-2, truncation=None).prepare(model)
    sd = copy.deepcopy(model.state_dict())
    assert float(s.penalty()) == 0.0
    assert s.step() is False and s.epoch_end() is False and not hasattr(s, "update")  # no Z/U splitting
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


# ============================================================================ Prop. 4.2
kinds = st.sampled_from(["linear", "conv"])


def _one_layer(kind, m, n, dtype=torch.float64):
    layer = nn.Linear(n, m) if kind == "linear" else nn.Conv2d(n, m, 2)
    return nn.Sequential(layer).to(dtype)


@SETTINGS
@given(kind=kinds, m=st.integers(1, 7), n=st.integers(1, 7), n_factors=st.integers(2, 4),
       wd=st.floats(1e-4, 1.0), seed=st.integers(0, 2**31 - 1))
def test_prop42_balanced_factors_attain_schatten(kind, m, n, n_factors, wd, seed):
    """sum_i ||F_i||_F^2 == N * sum_j sigma_j^(2/N) = N * SchattenP(p=2/N)(W) right after prepare."""
    torch.manual_seed(seed)
    model = _one_layer(kind, m, n)
    s = lorita(n_factors, wd, truncation=None, init="svd").prepare(model)
    W = model[0].weight.reshape(m, -1)
    sq = sum(f.pow(2).sum() for f in factor_parameters(model))
    schatten = ac.SchattenP(p=2.0 / n_factors)(W)
    sv = torch.linalg.svdvals(W)
    torch.testing.assert_close(sq, n_factors * schatten, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(schatten, sv[sv > 0].pow(2.0 / n_factors).sum(), atol=1e-9, rtol=1e-9)
    # the solver's spec states the same constraint: lambda/2 * sum ||F||^2 == SchattenP(2/N, lambda N/2)
    c = s.training_spec[0].constraint
    assert isinstance(c, ac.SchattenP) and c.p == pytest.approx(2.0 / n_factors)
    torch.testing.assert_close(s.factor_penalty(), s.schatten_penalty(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s.factor_penalty(), 0.5 * wd * sq, atol=1e-12, rtol=1e-12)


@SETTINGS
@given(kind=kinds, m=st.integers(1, 6), n=st.integers(1, 6), n_factors=st.integers(2, 4),
       shift=st.floats(0.0, 3.0), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_prop42_random_rebalancing_never_smaller(kind, m, n, n_factors, shift, seed, data):
    """F_i -> A F_i, F_{i+1} -> F_{i+1} A^{-1} (A random invertible) keeps W and never lowers
    sum ||F_i||^2 below N * SchattenP(p=2/N)(W), the value of the balanced split."""
    torch.manual_seed(seed)
    model = _one_layer(kind, m, n)
    lorita(n_factors, 1e-3, truncation=None).prepare(model)
    fs = factor_parameters(model)
    W0 = model[0].weight.detach().clone()
    bound = n_factors * ac.SchattenP(p=2.0 / n_factors)(W0.reshape(m, -1))
    i = data.draw(st.integers(0, n_factors - 2))
    d = fs[i].shape[0]
    A = torch.randn(d, d, dtype=torch.float64) + shift * torch.eye(d, dtype=torch.float64)
    sv = torch.linalg.svdvals(A)
    assume(float(sv.min()) > 1e-3 and float(sv.max() / sv.min()) < 1e6)
    with torch.no_grad():
        fi, fj = fs[i].clone(), fs[i + 1].clone()
        fs[i].copy_(A @ fi)
        fs[i + 1].copy_(fj @ torch.linalg.inv(A))
    torch.testing.assert_close(model[0].weight, W0, atol=1e-7, rtol=1e-7)
    total = sum(f.pow(2).sum() for f in fs)
    assert total >= bound * (1 - 1e-9) - 1e-12


# ============================================================================ truncation
@pytest.mark.parametrize("n_factors", [2, 3])
def test_collapse_then_lsvt_is_the_svd_truncation_of_the_product(n_factors):
    model = SmallCNN()
    s = lorita(n_factors, 1e-4, truncation="lsvt", rank_ratio=0.5).prepare(model)
    _perturb_factors(model)
    product = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2", "fc")}
    feasible = s.finalize(model)
    assert all(feasible.values()) and set(feasible) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for n, w in product.items():
        mod = model.get_submodule(n)
        assert not parametrize.is_parametrized(mod)
        r = max(1, int(0.5 * min(w.shape[0], w[0].numel())))
        assert s.final_ranks[n] == r and _rank(mod.weight) <= r
        torch.testing.assert_close(mod.weight.detach(), _svd_r(w, r), atol=1e-5, rtol=1e-4)
    assert all(isinstance(c.constraint, ac.LowRank) for c in s.spec)


def test_lsvt_fixed_rank():
    model = models.fcn(depth=3, width=12)
    s = lorita(2, 1e-4, truncation="lsvt", rank=3).prepare(model)
    _perturb_factors(model)
    s.finalize(model)
    assert s.final_ranks == {"layers.0": 3, "layers.1": 3, "layers.2": 3}
    assert all(_rank(l.weight) <= 3 for l in model.layers)


def test_gsvt_ranks_each_group_separately():
    """Normalized spectra chosen so that one joint sort gives different ranks than the paper's
    separate sorts for conv, linear and attention weights."""
    model = Grouped().double()
    spectra = {"conv": [1, .99, .98, .97, .96, .95], "fc": [1, .5, .25, .1, .05, .01],
               "attn.q": [1, .9, .7, .5, .3, .1], "attn.k": [1, .8, .6, .4, .2, .05]}
    with torch.no_grad():
        for i, (name, sv) in enumerate(spectra.items()):
            mod = model.get_submodule(name)
            m, n = mod.weight.shape[0], mod.weight[0].numel()
            mod.weight.copy_(_with_spectrum(m, n, [3.0 * v for v in sv], seed=i).reshape(mod.weight.shape))
    ref = copy.deepcopy(model)
    s = lorita(2, 1e-4, truncation="gsvt", keep=0.5, init="svd").prepare(model)
    assert s.groups() == {"conv": ["conv"], "linear": ["fc"], "attention": ["attn.q", "attn.k"]}
    s.finalize(model)
    assert s.final_ranks == {"conv": 3, "fc": 3, "attn.q": 3, "attn.k": 3}
    # brute force: the library GSVT called per group on the same weights
    assert gsvt(copy.deepcopy(ref), {"conv": ["conv"], "linear": ["fc"], "attention": ["attn.q", "attn.k"]},
                0.5) == s.final_ranks
    # a single global sort would have given other ranks
    assert gsvt(copy.deepcopy(ref), ["conv", "fc", "attn.q", "attn.k"], 0.5) == \
        {"conv": 6, "fc": 1, "attn.q": 3, "attn.k": 2}
    for name in spectra:
        assert _rank(model.get_submodule(name).weight) == s.final_ranks[name]


@pytest.mark.parametrize("source", ["finalize", "isvt_loader", "fit"])
def test_isvt_reaches_the_parameter_budget(source):
    model = models.fcn(depth=4, width=16)
    dense = 16 * 64 + 2 * 16 * 16 + 10 * 16
    batches = _batches(4, bs=40)
    kw = {"isvt_loader": batches} if source == "isvt_loader" else {}
    s = lorita(2, 1e-4, truncation="isvt", target_ratio=0.4, params_per_round=60, n_samples=50, **kw)
    if source == "fit":
        s.fit(model, batches, epochs=1, lr=0.01)
    else:
        s.prepare(model)
        _perturb_factors(model, 0.05)
        if source == "finalize":
            s.finalize(model, data=batches[0])
        else:
            s.finalize(model)
    shapes = {f"layers.{i}": (l.weight.shape[0], l.weight.shape[1]) for i, l in enumerate(model.layers)}
    kept = sum(lowrank_param_count(*shapes[n], r) for n, r in s.final_ranks.items())
    assert kept <= 0.4 * dense
    assert kept > 0.4 * dense - 60 - max(m + n for m, n in shapes.values())   # stops right after the target
    for n, r in s.final_ranks.items():
        assert _rank(model.get_submodule(n).weight) <= r


def test_isvt_without_data_raises():
    model = models.fcn(depth=2, width=8)
    s = lorita(2, 1e-4, truncation="isvt", target_params=100).prepare(model)
    with pytest.raises(ValueError, match="ISVT needs training data"):
        s.finalize(model)


def test_isvt_after_gsvt_starts_from_the_gsvt_ranks():
    model = models.fcn(depth=3, width=16)
    s = lorita(2, 1e-4, truncation="isvt", keep=0.5, target_ratio=0.9, params_per_round=40)
    s.prepare(model)
    s.finalize(model, data=_batches(1, bs=30)[0])
    # GSVT keeps half of each group's singular values; ISVT then never raises a rank
    assert sum(s.final_ranks.values()) <= int(0.5 * (16 + 16 + 10))


# ============================================================================ export, fine-tune
@pytest.mark.parametrize("truncation,kw", [("lsvt", {"rank_ratio": 0.25}), ("gsvt", {"keep": 0.3})])
def test_export_matches_truncated_model_and_saves_macs(truncation, kw):
    model = SmallCNN()
    s = lorita(3, 1e-4, truncation=truncation, **kw).prepare(model)
    _perturb_factors(model, 0.05)
    s.finalize(model)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    for compact in (ac.export(model, s.spec), ac.export(model, s), s.export(model)):
        compact.eval()
        assert all(not parametrize.is_parametrized(m) for m in compact.modules())
        torch.testing.assert_close(compact(x), model(x), atol=1e-5, rtol=1e-4)
    compact = ac.export(model, s.spec)
    c0 = ac.complexity(SmallCNN(), (3, 8, 8), backend="pytorch")
    c1 = ac.complexity(compact, (3, 8, 8), backend="pytorch")
    assert c1.macs < c0.macs and c1.params < c0.params


def test_fit_with_finetune_keeps_the_ranks():
    model = models.fcn(depth=3, width=16)
    s = lorita(3, 1e-4, truncation="lsvt", rank=3, optimizer="adam")
    batches = _batches(3)
    hist = s.fit(model, batches, epochs=2, lr=1e-3, finetune_epochs=2, val_loader=batches[:1])
    assert hist.final["feasible"] and [e["phase"] for e in hist.epochs] == ["train"] * 2 + ["finetune"] * 2
    assert "val_accuracy" in hist.epochs[0] and "after_finetune" in hist.final
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(_rank(l.weight) <= 3 for l in model.layers)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ac.export(model, s.spec)(x), model(x), atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip():
    model = models.fcn(depth=2, width=8)
    s = lorita(2, 1e-4, truncation=None).prepare(model)
    sd = s.state_dict()
    assert sd["n_factors"] == 2
    other = lorita(2, 1e-4, truncation=None).prepare(models.fcn(depth=2, width=8))
    other.load_state_dict(sd)
    with pytest.raises(ValueError, match="n_factors"):
        lorita(3, 1e-4, truncation=None).prepare(models.fcn(depth=2, width=8)).load_state_dict(sd)


# ============================================================================ validation
@pytest.mark.parametrize("kwargs,exc,match", [
    ({"n_factors": 0}, ValueError, "n_factors"),
    ({"n_factors": 2.5}, TypeError, "n_factors"),
    ({"n_factors": True}, TypeError, "n_factors"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
    ({"truncation": "svd"}, ValueError, "truncation"),
    ({"truncation": "gsvt"}, ValueError, "keep"),
    ({"truncation": "gsvt", "keep": 1.5}, ValueError, "keep"),
    ({"truncation": "gsvt", "keep": {"fc": 0.5}}, ValueError, "unknown group"),
    ({"truncation": "isvt"}, ValueError, "target_ratio"),
    ({"truncation": "isvt", "target_ratio": 1.0}, ValueError, "target_ratio"),
    ({"truncation": "lsvt", "rank": 2, "rank_ratio": 0.5}, ValueError, "at most one"),
    ({"truncation": "lsvt", "rank": 0}, ValueError, "rank"),
    ({"truncation": "gsvt", "keep": 3, "rank": 2}, ValueError, "rank"),
    ({"optimizer": "adamw"}, ValueError, "optimizer"),
    ({"inner": "max"}, ValueError, "inner"),
])
def test_bad_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lorita(**kwargs)


def test_defaults_from_the_design_contract():
    s = lorita(n_factors=3, weight_decay=5e-4)
    assert s.truncation == "lsvt" and s.rank_ratio == 0.5 and s.n_factors == 3
    model = models.fcn(depth=2, width=8)
    with pytest.raises(ac.specs.SpecError):
        lorita(2, 1e-4, targets="nothing.*").prepare(model)
    s = lorita(2, 1e-4, targets=["layers.0"], truncation=None).prepare(model)
    assert s.factorized == ["layers.0"]


def test_float64_middle_factors_do_not_share_storage():
    """N >= 4 in float64: every factor is its own tensor (optimizer updates stay separate)."""
    model = nn.Sequential(nn.Linear(5, 4)).double()
    lorita(4, 1e-3, truncation=None).prepare(model)
    fs = factor_parameters(model)
    assert len({p.data_ptr() for p in fs}) == len(fs)
    W0 = model[0].weight.detach().clone()
    with torch.no_grad():
        fs[1].mul_(2.0)
    torch.testing.assert_close(model[0].weight, 2.0 * W0)


# ============================================================ issue 17: the paper's LoRITa
def test_default_is_random_factors_with_the_papers_shapes():
    """Training from scratch (Sec. 5.1): independent random factors, inner = in for a Linear
    (square inner factors) -- every inner direction is used, unlike the SVD start, where the
    rows beyond min(m, n) are zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    w0 = model[0].weight.detach().clone()
    s = lorita(3, 1e-4, truncation=None).prepare(model)
    assert s.init == "random" and s.inner == "auto"
    F1, F2, F3 = factor_parameters(model)
    assert (F1.shape, F2.shape, F3.shape) == ((6, 6), (6, 6), (4, 6))
    assert all(torch.linalg.matrix_rank(f.detach()) == min(f.shape) for f in (F1, F2, F3))
    assert not torch.allclose(model[0].weight, w0, atol=1e-3)       # a fresh draw, not W
    svd = nn.Sequential(nn.Linear(6, 4))
    lorita(3, 1e-4, truncation=None, init="svd", inner="auto").prepare(svd)
    assert torch.linalg.matrix_rank(factor_parameters(svd)[0].detach()) == 4   # rows 5, 6 zero


def test_random_factors_give_the_layers_mean_square_in_expectation():
    """E[(F_3 F_2 F_1)_ab^2] = d^2 v^3 = mean(W^2): Monte Carlo over R independent draws, within
    5 standard errors estimated from the draws themselves (CLT)."""
    from admm_compress.factorization import random_factors

    target, R = 0.02, 400
    g = torch.Generator().manual_seed(0)
    ms = []
    for _ in range(R):
        F1, F2, F3 = random_factors((5, 7), 3, 7, mean_square=target, dtype=torch.float64, generator=g)
        ms.append(float((F3 @ F2 @ F1).pow(2).mean()))
    ms = torch.tensor(ms, dtype=torch.float64)
    se = float(ms.std() / R ** 0.5)
    assert abs(float(ms.mean()) - target) <= 5 * se
    # and each factor's entries have the variance v = (target / d^(N-1))^(1/N)
    v = (target / 70 ** 2) ** (1 / 3)                 # d = 70 below
    F = torch.cat([f.flatten() for f in random_factors((50, 70), 3, 70, mean_square=target,
                                                       dtype=torch.float64, generator=g)])
    # the sample variance of n Gaussians has relative standard deviation sqrt(2 / n)
    assert abs(float(F.pow(2).mean()) / v - 1) <= 5 * (2 / F.numel()) ** 0.5


def test_weight_decay_convention_paper_lambda_is_half_of_torchs():
    """torch weight_decay wd adds wd * F to the gradient = the gradient of the paper's Eq. 8
    penalty lambda * ||F||^2 with lambda = wd / 2."""
    model = nn.Sequential(nn.Linear(5, 3))
    s = lorita(2, 2e-3, truncation=None).prepare(model)
    assert s.paper_lambda == 1e-3
    factors = factor_parameters(model)
    pen = s.paper_lambda * sum(f.pow(2).sum() for f in factors)
    grads = torch.autograd.grad(pen, factors)
    for f, g in zip(factors, grads):
        torch.testing.assert_close(g, s.weight_decay * f.detach(), rtol=1e-6, atol=0)


def test_paper_preset():
    from admm_compress.methods.lorita import lorita_paper

    s = lorita_paper("fcn", n_factors=2, weight_decay=1e-4)
    assert (s.optimizer_name, s.truncation, s.init, s.inner) == ("adam", "isvt", "random", "auto")
    assert (s.keep, s.target_ratio, s.params_per_round, s.n_samples) == (0.5, 0.3, 500, 120)
    assert s.fit_defaults == {"lr": 1e-2, "finetune_epochs": 1}
    assert lorita_paper("cnn").fit_defaults["lr"] == 3e-4
    # fit takes the preset's lr unless given; the optimizer is Adam
    model = models.fcn(depth=2, width=8)
    s = lorita_paper("fcn", truncation=None, keep=None, target_ratio=None, finetune_epochs=0)
    seen = {}
    make = s.default_optimizer
    s.default_optimizer = lambda m, lr: seen.setdefault("opt", make(m, lr))
    s.fit(model, _batches(1, shape=(64,)), epochs=1, progress=False)
    assert isinstance(seen["opt"], torch.optim.Adam) and seen["opt"].param_groups[0]["lr"] == 1e-2
    # ViT: only the attention projections are over-parameterized (Sec. 5.3)
    vit = models.vit(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden=8, mlp_dim=12)
    sv = lorita_paper("vit").prepare(vit)
    assert sv.factorized == [f"blocks.0.attn.{p}" for p in ("q", "k", "v", "out")]
    assert sv.fit_defaults["lr"] == 3e-4
    with pytest.raises(ValueError, match="attention projection"):
        lorita(2, 1e-4, attention_only=True).prepare(models.fcn(depth=2, width=8))
    with pytest.raises(ValueError, match="arch='mlp'"):
        lorita_paper("mlp")
