"""Realizations of the exported "oki" TT chain (admm_compress.layers.tt_realize): exact, counted by ptflops."""
import copy
import warnings

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress.layers import SumBranches
from admm_compress.specs import replace_module
from admm_compress.layers.tt_realize import (REALIZATIONS, chain_realizations, is_oki_chain, realization_macs,
                                             realize_tt)
from admm_compress.methods.raspa import raspa
from admm_compress.views import TTView


def _tol(ref: torch.Tensor, n_terms: int) -> dict:
    # float64 rounding: each output sums n_terms products (plus refactoring of the same sums)
    eps = torch.finfo(torch.float64).eps
    return {"rtol": 0.0, "atol": 10 * n_terms * eps * max(1.0, float(ref.detach().abs().max()))}


def _net(padding_mode="zeros"):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1, padding_mode=padding_mode), nn.ReLU(),
                         nn.Conv2d(24, 24, (3, 5), padding=(2, 1), dilation=(2, 1), bias=False)).double()


def _exported(net, ranks=(4, 3)):
    torch.manual_seed(0)
    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.TTRank(ranks), view=TTView.oki())]).prepare(net)
    solver.finalize(net)
    return ac.export(net, solver)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_every_realization_computes_the_chain(padding_mode):
    torch.manual_seed(0)
    ex = _exported(_net(padding_mode))
    chains = [m for m in ex.modules() if is_oki_chain(m)]
    assert len(chains) == 3
    for chain in chains:
        x = torch.randn(2, chain[0].in_channels, 11, 9, dtype=torch.float64)
        ref = chain(x)
        reals = chain_realizations(chain)
        assert list(reals) == list(REALIZATIONS)
        n = chain[0].in_channels * chain[1].weight[0].numel()
        for name, m in reals.items():
            torch.testing.assert_close(m(x), ref, **_tol(ref, n), msg=name)
        # each is stock layers: a conv or a Sequential of convs
        assert isinstance(reals["dense"], nn.Conv2d) and len(reals["fold_first"]) == len(reals["fold_last"]) == 2


def test_realization_macs_are_what_ptflops_counts():
    torch.manual_seed(0)
    ex = _exported(_net())
    for chain in [m for m in ex.modules() if is_oki_chain(m)]:
        x = torch.randn(1, chain[0].in_channels, 12, 10, dtype=torch.float64)
        out = chain(x)
        pin, pout = x[0, 0].numel(), out[0, 0].numel()
        macs = realization_macs(chain, pin, pout)
        for name, m in chain_realizations(chain).items():
            counted = ac.complexity(m, tuple(x.shape[1:])).macs
            assert counted == macs[name], name


@pytest.mark.parametrize("rule", ["macs", "latency"])
def test_realize_tt_keeps_the_model_and_counts_what_it_exports(rule):
    torch.manual_seed(0)
    net = _net()
    ex = _exported(net)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
    rep = realize_tt(ex, rule, x, repeats=3, warmup=0)
    assert len(rep) == 3 and all(r["chosen"] in REALIZATIONS for r in rep)
    torch.testing.assert_close(ex(x), ref, **_tol(ref, 24 * 15 * 3))
    if rule == "macs":  # the fewest MACs at the layer's real resolution, and the model's count is their sum
        assert all(r["macs"][r["chosen"]] == min(r["macs"].values()) for r in rep)
    total = ac.complexity(ex, (3, 16, 16)).macs
    # the exported count: the chosen realizations' MACs + the rest of the model (two ReLUs, as ptflops counts them)
    relu = ac.complexity(nn.ReLU(), (16, 16, 16)).macs + ac.complexity(nn.ReLU(), (24, 8, 8)).macs
    assert total == sum(r["macs"][r["chosen"]] for r in rep) + relu


def test_realize_tt_without_input_uses_per_position_macs():
    torch.manual_seed(0)
    ex = _exported(_net(), ranks=(2, 2))
    rep = realize_tt(ex, "macs", allow_dense=False)
    assert all(r["chosen"] != "dense" for r in rep)
    with pytest.raises(ValueError, match="example_inputs"):
        realize_tt(ex, "latency")
    with pytest.raises(ValueError, match="rule"):
        realize_tt(ex, "fastest")


def test_lplus_s_densified_sum_is_exact_and_dense_counted():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).double()
    solver = raspa(tt_ranks=(3, 3), density=0.05, decompose_iters=1)
    solver.prepare(net)
    solver.finalize(net)
    ex = ac.export(net, solver)
    assert sum(isinstance(m, SumBranches) for m in ex.modules()) == 2
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    ref = net(x)
    dense_macs = ac.complexity(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                             nn.Conv2d(16, 16, 3, padding=1)), (8, 10, 10)).macs
    # margin 0 with a forced choice: time a model where every L + S layer takes the dense sum
    forced = copy.deepcopy(ex)
    from admm_compress.layers import tt_realize

    for name, m in list(forced.named_modules()):
        if isinstance(m, SumBranches):
            replace_module(forced, name, tt_realize._sum_dense(m))
    torch.testing.assert_close(forced(x), ref, **_tol(ref, 16 * 9 * 2))
    assert ac.complexity(forced.float(), (8, 10, 10)).macs == dense_macs
    # the latency rule keeps the model's function whatever it picks
    realize_tt(ex, "latency", x, sum_dense=True, repeats=3, warmup=0)
    torch.testing.assert_close(ex(x), ref, **_tol(ref, 16 * 9 * 2))


def test_realized_model_scripts_and_exports():
    torch.manual_seed(0)
    net = _net()
    ex = _exported(net)
    chains = [n for n, m in ex.named_modules() if is_oki_chain(m)]
    for name, kind in zip(chains, ("fold_first", "fold_last", "dense")):  # one of each non-chain form
        replace_module(ex, name, chain_realizations(ex.get_submodule(name))[kind])
    ex.eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        tol = _tol(ref, 24 * 15 * 3)
        torch.testing.assert_close(ex(x), ref, **tol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
            scripted = torch.jit.script(ex)
        torch.testing.assert_close(scripted(x), ref, **tol)
        torch.testing.assert_close(torch.export.export(ex, (x,)).module()(x), ref, **tol)


def test_only_oki_chains_are_recognized():
    c = lambda i, o, k=1, **kw: nn.Conv2d(i, o, k, bias=kw.pop("bias", False), **kw)  # noqa: E731
    assert is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3, padding=1), c(3, 8, bias=True)))
    # the first map must be a bias-free, unstrided 1x1; the middle bias-free; channels must chain
    assert not is_oki_chain(nn.Sequential(c(8, 2, bias=True), c(2, 3, 3), c(3, 8)))
    assert not is_oki_chain(nn.Sequential(c(8, 2, stride=2), c(2, 3, 3), c(3, 8)))
    assert not is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3, bias=True), c(3, 8)))
    assert not is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3), c(4, 8)))
    assert not is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3), c(3, 8, 3)))
    assert not is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3, groups=1), nn.ReLU()))
    assert not is_oki_chain(nn.Sequential(c(8, 2), c(2, 3, 3)))
    with pytest.raises(ValueError, match="chain"):
        chain_realizations(nn.Sequential(c(8, 2), c(2, 3, 3)))


@pytest.mark.parametrize("rule", ["macs", "latency"])
def test_export_tt_realization_equals_the_chain_export(rule):
    """``ac.export(..., tt_realization=...)`` realizes the chains per layer; same outputs, and the
    MACs rule never counts more than the chain export (ptflops)."""
    torch.manual_seed(0)
    net = _net()
    solver = ac.Solver([ac.Constrain(nn.Conv2d, ac.TTRank((4, 3)), view=TTView.oki())]).prepare(net)
    solver.finalize(net)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    chain = ac.export(net, solver).eval()
    real = ac.export(net, solver, tt_realization=rule, example_inputs=x[:1]).eval()
    with torch.no_grad():
        ref = chain(x)
        torch.testing.assert_close(real(x), ref, **_tol(ref, 24 * 15 * 4))
    if rule == "macs":
        assert ac.complexity(real, (3, 12, 10)).macs <= ac.complexity(chain, (3, 12, 10)).macs


def test_export_tt_realization_arguments_are_checked_before_any_work():
    net = _net()
    spec = [ac.Constrain(nn.Conv2d, ac.TTRank((4, 3)), view=TTView.oki())]
    with pytest.raises(ValueError, match="tt_realization must be one of 'chain', 'macs', 'latency', got 'fast'"):
        ac.export(net, spec, tt_realization="fast")
    with pytest.raises(ValueError, match="tt_realization='latency' needs example_inputs"):
        ac.export(net, spec, tt_realization="latency")
