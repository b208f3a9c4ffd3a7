"""TT ranks for a latency budget: the knapsack against brute force, the budget on a model, the export."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import admm_compress as ac
from admm_compress.layers import tt as tt_layers
from admm_compress.methods.raspa import tt_unfolding_spectra
from admm_compress.methods.tt_latency_ranks import knapsack_min_error, rank_grid, tt_ranks_for_latency
from admm_compress.views import TTView


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_knapsack_equals_brute_force_on_integer_costs(data):
    """Integer costs and resolution = budget: every cost is a whole number of steps, so the
    dynamic program is exact -- its summed error equals the brute-force minimum over all choices
    within the budget, and the choice fits."""
    groups = data.draw(st.integers(1, 4))
    errors, costs = [], []
    for _ in range(groups):
        n = data.draw(st.integers(1, 4))
        errors.append(data.draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)))
        costs.append(data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)))
    floor = sum(min(c) for c in costs)
    budget = data.draw(st.integers(max(1, floor), floor + 20))
    pick = knapsack_min_error(errors, costs, budget, resolution=budget)
    assert sum(c[p] for c, p in zip(costs, pick)) <= budget
    best = min(sum(e[i] for e, i in zip(errors, ch)) for ch in itertools.product(*(range(len(e)) for e in errors))
               if sum(c[i] for c, i in zip(costs, ch)) <= budget)
    assert sum(e[p] for e, p in zip(errors, pick)) == best


def test_knapsack_rounds_costs_up_so_the_choice_always_fits():
    rng = np.random.default_rng(0)
    for _ in range(50):
        costs = [rng.uniform(0.1, 1.0, 5) for _ in range(6)]
        errors = [rng.uniform(0, 1, 5) for _ in range(6)]
        budget = sum(c.min() for c in costs) * 1.3
        pick = knapsack_min_error(errors, costs, budget, resolution=64)
        assert sum(c[p] for c, p in zip(costs, pick)) <= budget
    with pytest.raises(ValueError, match="below the smallest total cost"):
        knapsack_min_error([[0.0, 1.0]], [[2.0, 3.0]], 1.0)
    with pytest.raises(ValueError, match="same non-zero number of groups"):
        knapsack_min_error([[0.0]], [[1.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="negative"):
        knapsack_min_error([[0.0]], [[-1.0]], 1.0)


def test_rank_grid():
    assert rank_grid(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert rank_grid(12) == [1, 2, 4, 8, 12]
    assert rank_grid(1) == [1]


def _net():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():  # decaying spectra, so layers differ in how much rank they need
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.logspace(0, -2, m.weight.shape[0]).reshape(-1, 1, 1, 1))
    return net


def _discarded(net, ranks):
    """Summed TT-SVD energy bound the ranks discard (relative to each layer's ||W||^2)."""
    mods = dict(net.named_modules())
    out = 0.0
    for n, (a, b) in ranks.items():
        _, s1, s2 = tt_unfolding_spectra(mods[n].weight, TTView.oki())
        out += float((s1[a:] ** 2).sum() + (s2[b:] ** 2).sum())
    return out


def _finalized_solver(net, ranks):
    """``net`` prepared and finalized at ``ranks`` (oki view); the solver, ready for ``export``."""
    solver = ac.Solver([ac.Constrain(n, ac.TTRank(r), view=TTView.oki()) for n, r in ranks.items()])
    solver.prepare(net)
    solver.finalize(net)
    return solver


class _Table:
    """A latency table standing in for the device: the chain's MACs, plus 50 % for a rank that is
    not a multiple of 16 (what ONNX Runtime measured on AVX-512); counts the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, layer, ranks, input_shape):
        self.calls.append((layer, ranks, tuple(input_shape)))
        pos = math.prod(input_shape[1:])
        if ranks is None:
            return float(layer.weight.numel() * pos)
        _, macs = tt_layers.tt_layer_cost(TTView.oki(), tuple(layer.weight.shape), ranks, pos, pos, padded=True)
        return macs * (1.0 if all(r % 16 == 0 for r in ranks) else 1.5)


@pytest.mark.parametrize("reduction", [0.4, 0.6])
def test_latency_ranks_meet_the_budget_with_the_least_discarded_energy(reduction):
    net, table = _net(), _Table()
    ranks = tt_ranks_for_latency(net, reduction, input_size=(3, 8, 8), exclude="0", latency_fn=table)
    assert sorted(ranks) == ["2", "4", "6"]
    layers = {n: m for n, m in net.named_modules() if n in ranks}  # every one sees 8x8 inputs
    cost = {n: table(m, ranks[n], (m.in_channels, 8, 8)) for n, m in layers.items()}
    dense = {n: table(m, None, (m.in_channels, 8, 8)) for n, m in layers.items()}
    budget = (1 - reduction) * sum(dense.values())
    assert sum(cost.values()) <= budget

    # optimal by brute force over the candidate sets, for the costs the dynamic program uses
    # (each rounded up to a whole step of budget / 4096, which is what guarantees the fit)
    spectra = {id(m): tt_unfolding_spectra(m.weight, TTView.oki())[1:] for m in layers.values()}
    memo = {}

    def err(m, r):
        if (id(m), r) not in memo:
            s1, s2 = spectra[id(m)]
            memo[id(m), r] = float((s1[r[0]:] ** 2).sum() + (s2[r[1]:] ** 2).sum())
        return memo[id(m), r]

    def cands(m):
        a, K, c = m.out_channels, 9, m.in_channels
        out = []
        for r1 in rank_grid(a):
            for r2 in rank_grid(c):
                if r1 <= min(a, K * c) and r2 <= min(c, K * r1):
                    p, mac = tt_layers.tt_layer_cost(TTView.oki(), tuple(m.weight.shape), (r1, r2), 64, 64,
                                                     padded=True)
                    if p < m.weight.numel() and mac <= m.weight.numel() * 64:
                        out.append((r1, r2))
        return out

    names = list(layers)
    step = budget / 4096

    options = [[(err(layers[n], r), math.ceil(table(layers[n], r, (layers[n].in_channels, 8, 8)) / step - 1e-9))
                for r in cands(layers[n])] for n in names]
    best = min(sum(o[0] for o in combo) for combo in itertools.product(*options)
               if sum(o[1] for o in combo) <= 4096)
    got = sum(err(layers[n], ranks[n]) for n in names)
    # equal up to the order of summing three float64 energies (the library sums suffix cumsums)
    assert got == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_identical_layers_are_timed_once_and_a_looser_budget_loses_no_more_energy():
    net, table = _net(), _Table()
    tight = tt_ranks_for_latency(net, 0.6, input_size=(3, 8, 8), exclude="0", latency_fn=table)
    seen = [(c[0].in_channels, c[0].out_channels, c[1], c[2]) for c in table.calls]
    assert len(seen) == len(set(seen))  # layers 4 and 6 (32 -> 32, 8x8) share every timing
    loose = tt_ranks_for_latency(net, 0.3, input_size=(3, 8, 8), exclude="0", latency_fn=_Table())
    assert _discarded(net, loose) <= _discarded(net, tight)


def test_latency_ranks_export_to_chains_equal_to_the_finalized_model():
    net = _net()
    ranks = tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), exclude="0", latency_fn=_Table())
    solver = _finalized_solver(net, ranks)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        ex = ac.export(net, solver)
        got = ex(x)
    # float32 chains of three convolutions against one: rounding of sums of ~300 products
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert sum(isinstance(m, nn.Conv2d) for m in ex.modules()) == 1 + 3 * len(ranks)


class _FormTable(_Table):
    """The table with a form: ``fold_last`` 20 % cheaper than the chain, ``fold_first`` 10 % dearer."""

    def __call__(self, layer, ranks, input_shape, form="chain"):
        base = super().__call__(layer, ranks, input_shape)
        return base * {"chain": 1.0, "fold_last": 0.8, "fold_first": 1.1}[form]


def test_forms_are_candidates_and_realize_forms_applies_them_exactly():
    """With the two-conv forms as candidates the plan keeps no less energy (a superset of
    candidates, same budget), picks the cheaper form where it fits, and realize_forms turns the
    exported chains into those forms without changing the outputs."""
    from admm_compress.layers.tt_realize import is_oki_chain
    from admm_compress.methods.tt_latency_ranks import realize_forms

    net = _net()
    three = ("chain", "fold_first", "fold_last")
    plain = tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), exclude="0", latency_fn=_FormTable())
    ranks, forms = tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), exclude="0", latency_fn=_FormTable(),
                                        forms=three, return_forms=True)
    assert set(forms) == set(ranks) and set(forms.values()) <= set(three) and "fold_last" in forms.values()
    # a superset of candidates under the same rounded budget: no more energy discarded (same
    # float64 sums, up to their order when the two plans differ)
    assert _discarded(net, ranks) <= _discarded(net, plain) * (1 + 1e-12)
    solver = _finalized_solver(net, ranks)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        ex = realize_forms(ac.export(net, solver), forms)
        torch.testing.assert_close(ex(x), ref, rtol=1e-4, atol=1e-5)  # as _export_equal (float32 conv sums)
    for n, f in forms.items():
        assert is_oki_chain(ex.get_submodule(n)) == (f == "chain")
    with pytest.raises(ValueError, match="not an oki TT chain"):
        realize_forms(ex, {n: "fold_last" for n, f in forms.items() if f != "chain"})
    with pytest.raises(ValueError, match="forms"):
        tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), forms=("dense",))
    with pytest.raises(ValueError, match="layout='oki'"):
        tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), forms=three, layout="paired")


@pytest.mark.parametrize("backend", ["eager", "ort"])
def test_measure_tt_layer_times_the_dense_layer_and_its_exported_chain(backend):
    """The timing path itself (values depend on the machine, so only that it runs and returns a
    time; "ort" also checks the ONNX Runtime outputs against eager inside ort_latency)."""
    if backend == "ort":
        pytest.importorskip("onnxruntime")
    from admm_compress.methods.tt_latency_ranks import measure_tt_layer

    conv = _net()[2]
    for ranks, form in ((None, "chain"), ((16, 4), "chain"), ((16, 4), "fold_last"), ((16, 4), "fold_first")):
        ms = measure_tt_layer(conv, ranks, (16, 8, 8), backend=backend, repeats=2, form=form)
        assert math.isfinite(ms) and ms > 0


def test_layers_without_a_tt_export_are_refused_before_any_timing():
    """A depthwise convolution has no TT export (prepare refuses it): both planners name it and the
    fix before measuring anything; filtering it out plans the rest."""
    from admm_compress.methods.raspa import tt_ranks_for_budget

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 32, 3, padding=1))
    table = _Table()
    with pytest.raises(ValueError, match=r"'1': TT export of a grouped/depthwise convolution \(groups=16\).*"
                                         r"m.groups == 1"):
        tt_ranks_for_latency(net, 0.3, input_size=(3, 8, 8), exclude="0", latency_fn=table)
    assert table.calls == []
    with pytest.raises(ValueError, match="grouped/depthwise"):
        tt_ranks_for_budget(net, 0.3, exclude="0")
    ranks = tt_ranks_for_latency(net, 0.3, input_size=(3, 8, 8), latency_fn=table,
                                 targets=lambda n, m: isinstance(m, nn.Conv2d) and m.groups == 1 and n != "0")
    assert list(ranks) == ["2"]


def test_bad_input_names_the_parameter():
    net = _net()
    with pytest.raises(ValueError, match="reduction"):
        tt_ranks_for_latency(net, 1.0, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), backend="tensorrt")
    with pytest.raises(ValueError, match="layout"):
        tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), layout="eq9")
    with pytest.raises(TypeError, match="latency_fn"):
        tt_ranks_for_latency(net, 0.5, input_size=(3, 8, 8), latency_fn=3)
    with pytest.raises(ValueError, match=r"reduction=0.99 .*out of reach.*largest reachable reduction"):
        tt_ranks_for_latency(net, 0.99, input_size=(3, 8, 8), exclude="0", latency_fn=_Table())
