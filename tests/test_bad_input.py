"""Catalogue of the inputs users get wrong, fed to every public entry point.

Each case asserts the exception type and that the message names the parameter and the value
(``pytest.raises(..., match=...)``); where a model or a checkpoint file exists, that it is left
exactly as it was (tensors compared with ``torch.equal``, files byte for byte).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress import data, methods, models
from admm_compress.specs import SpecError
from admm_compress.training import CheckpointError, NonFiniteError, load_checkpoint

NAN = float("nan")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train fastest (and deterministically) on one thread; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _raises(exc, match, fn):
    with pytest.raises(exc, match=match) as info:
        fn()
    return info


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys(), "the model's state_dict keys changed"
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed"


# =========================================================================== sets
SET_CONSTRUCTORS = [
    # (constructor, exception, message must contain)
    (lambda: ac.LowRank(rank=0), ValueError, r"rank=0 is out of range; allowed: 1 <= rank"),
    (lambda: ac.LowRank(rank=-3), ValueError, r"rank=-3 is out of range"),
    (lambda: ac.LowRank(rank=True), TypeError, r"rank must be an integer, got True \(bool\)"),
    (lambda: ac.LowRank(rank=2.0), TypeError, r"rank must be an integer, got 2.0 \(float\)"),
    (lambda: ac.LowRank(rank=NAN), TypeError, r"rank must be an integer, got nan"),
    (lambda: ac.LowRank(rank="8"), TypeError, r"rank must be an integer, got '8' \(str\)"),
    (lambda: ac.LowRank(ratio=0.0), ValueError, r"ratio=0.0 is out of range; allowed: ratio in \(0.0, 1.0\]"),
    (lambda: ac.LowRank(ratio=1.5), ValueError, r"ratio=1.5 is out of range"),
    (lambda: ac.LowRank(ratio=NAN), ValueError, r"ratio=nan is out of range"),
    (lambda: ac.LowRank(ratio=True), TypeError, r"ratio must be a real number, got True"),
    (lambda: ac.LowRank(energy=0), ValueError, r"energy=0.0 is out of range"),
    (lambda: ac.LowRank(), ValueError, r"give exactly one of rank=, ratio=, energy=; got none"),
    (lambda: ac.LowRank(rank=2, ratio=0.5), ValueError, r"exactly one of .* got rank, ratio"),
    (lambda: ac.LowRank(rank=2, min_rank=0), ValueError, r"min_rank=0 is out of range"),
    (lambda: ac.Cardinality(k=0), ValueError, r"k=0 is out of range; allowed: 1 <= k"),
    (lambda: ac.Cardinality(k=-1), ValueError, r"k=-1 is out of range"),
    (lambda: ac.Cardinality(k=True), TypeError, r"k must be an integer, got True \(bool\)"),
    (lambda: ac.Cardinality(k=2.5), TypeError, r"k must be an integer, got 2.5 \(float\)"),
    (lambda: ac.Cardinality(density=0), ValueError, r"density=0.0 is out of range; allowed: density in \(0.0, 1.0\]"),
    (lambda: ac.Cardinality(density=1.1), ValueError, r"density=1.1 is out of range"),
    (lambda: ac.Cardinality(density=NAN), ValueError, r"density=nan is out of range"),
    (lambda: ac.Cardinality(density=-0.1), ValueError, r"density=-0.1 is out of range"),
    (lambda: ac.Cardinality(), ValueError, r"exactly one of k= and density=; got none"),
    (lambda: ac.Cardinality(k=3, density=0.5), ValueError, r"exactly one of k= and density=; got both"),
    (lambda: ac.Cardinality(k=3, group_dim=1.0), TypeError, r"group_dim must be an integer, got 1.0"),
    (lambda: ac.TTRank(0), ValueError, r"ranks=0 is out of range"),
    (lambda: ac.TTRank((4, 0)), ValueError, r"ranks\[1\]=0 is out of range"),
    (lambda: ac.TTRank(()), ValueError, r"ranks=\(\) is empty"),
    (lambda: ac.TTRank((2.0, 3)), TypeError, r"ranks\[0\] must be an integer, got 2.0"),
    (lambda: ac.TTRank((True, 3)), TypeError, r"ranks\[0\] must be an integer, got True"),
    (lambda: ac.TTRank(True), TypeError, r"ranks must be an int or a tuple of ints, got True"),
    (lambda: ac.TTRank(NAN), TypeError, r"ranks must be an int or a tuple of ints, got nan"),
    (lambda: ac.SchattenP(p=0), ValueError, r"p=0.0 is out of range; allowed: p in \(0.0, 1.0\]"),
    (lambda: ac.SchattenP(p=1.5), ValueError, r"p=1.5 is out of range"),
    (lambda: ac.SchattenP(p=NAN), ValueError, r"p=nan is out of range"),
    (lambda: ac.SchattenP(p=True), TypeError, r"p must be a real number, got True"),
    (lambda: ac.SchattenP(p=0.5, weight=-1), ValueError, r"weight=-1.0 is out of range"),
    (lambda: ac.Sum(ac.LowRank(rank=1), 3), TypeError, r"Sum: b must be a ConstraintSet .* got 3"),
    (lambda: ac.Sum(ac.LowRank(rank=1), ac.SchattenP(0.5)), TypeError, r"Sum: b must be a ConstraintSet .*SchattenP"),
    (lambda: ac.Sum(ac.LowRank(rank=1), ac.Cardinality(k=1), iters=0), ValueError, r"iters=0 is out of range"),
]


@pytest.mark.parametrize("make, exc, match", SET_CONSTRUCTORS)
def test_set_constructors(make, exc, match):
    _raises(exc, match, make)


X45 = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
SET_CALLS = [
    # impossible sizes for the tensor given
    (lambda: ac.Cardinality(k=100).project(X45), ValueError,
     r"k=100 is larger than the 20 entries of a tensor of shape \(4, 5\); allowed: 1 <= k <= 20"),
    (lambda: ac.Cardinality(k=5, group_dim=0).project(X45), ValueError, r"k=5 is larger than the 4 slices along dim 0"),
    (lambda: ac.Cardinality(k=1, group_dim=2).project(X45), ValueError, r"group_dim=2 is out of range for a 2-way"),
    (lambda: ac.TTRank((2, 2)).project(X45), ValueError, r"ranks=\(2, 2\) has length 2 but a 2-way tensor needs 1"),
    (lambda: ac.LowRank(rank=1).project(torch.randn(5)), ValueError, r"at least 2 dimensions, got shape \(5,\)"),
    (lambda: ac.LowRank(rank=1).project(torch.randn(0, 3)), ValueError, r"non-empty matrices, got shape \(0, 3\)"),
    (lambda: ac.SchattenP(0.5)(torch.randn(3, 0)), ValueError, r"non-empty matrices, got shape \(3, 0\)"),
    # wrong kinds of tensors
    (lambda: ac.LowRank(rank=1).project([[1.0, 2.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    (lambda: ac.LowRank(rank=1).project(torch.ones(3, 3, dtype=torch.long)), TypeError,
     r"x must be a floating-point tensor, got dtype torch.int64"),
    (lambda: ac.LowRank(rank=1).project(torch.full((3, 3), NAN)), ValueError, r"x has 9 non-finite entries"),
    (lambda: ac.Cardinality(k=1).project(torch.tensor([1.0, math.inf])), ValueError, r"x has 1 non-finite"),
    # bad tolerances and prox steps
    (lambda: ac.LowRank(rank=1).contains(X45, atol=-1.0), ValueError, r"atol=-1.0 is out of range"),
    (lambda: ac.LowRank(rank=1).contains(X45, rtol=NAN), ValueError, r"rtol=nan is out of range"),
    (lambda: ac.SchattenP(0.5).prox(X45, -1.0), ValueError, r"tau=-1.0 is out of range"),
    (lambda: ac.SchattenP(0.5).prox(X45, NAN), ValueError, r"tau=nan is out of range"),
    (lambda: ac.Sum(ac.LowRank(rank=1), ac.Cardinality(k=2)).project((X45, torch.randn(3, 3))), ValueError,
     r"components of x must have one shape, got \(4, 5\) and \(3, 3\)"),
]


@pytest.mark.parametrize("call, exc, match", SET_CALLS)
def test_set_operators(call, exc, match):
    _raises(exc, match, call)


def test_set_operators_never_modify_their_input_when_they_raise():
    x = torch.randn(4, 5)
    x[0, 0] = NAN
    before = x.clone()
    with pytest.raises(ValueError, match="non-finite"):
        ac.LowRank(rank=1).project(x)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


# =========================================================================== specs
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10))


def _depthwise():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4))


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.c3 = nn.Conv3d(2, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 4)
        self.lstm = nn.LSTM(4, 4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")


def _odd_layers():
    torch.manual_seed(0)
    return _Odd()


LR1 = ac.LowRank(rank=1)
SPEC_CONSTRUCTION = [
    (lambda: ac.Constrain(nn.Linear, "lowrank"), TypeError, r"constraint must be a set or penalty .* got str"),
    (lambda: ac.Constrain(3, LR1), TypeError, r"target must be a glob string, a module type or a predicate.*got 3"),
    (lambda: ac.Constrain((nn.Linear, "conv*"), LR1), TypeError, r"a tuple target must hold module types"),
    (lambda: ac.Constrain(nn.Linear, LR1, view=42), TypeError, r"view must be a view name or a View, got 42"),
    (lambda: ac.Constrain(nn.Linear, LR1, metric="bm"), ValueError, r"metric='bm' is not allowed; choose None or 'bn'"),
    (lambda: ac.Constrain(nn.Linear, LR1, rho=-1), ValueError, r"rho=-1.0 is out of range"),
    (lambda: ac.Constrain(nn.Linear, LR1, rho=NAN), ValueError, r"rho=nan is out of range"),
    # an unknown view name is refused when the spec is built (even if it would select nothing)
    (lambda: ac.Constrain(nn.Linear, LR1, view="rows"), ValueError, r"view='rows' is not a known view; choose one of"),
    (lambda: ac.Constrain(nn.Conv2d, LR1, view="chanel"), ValueError,
     r"view='chanel' is not a known view \(did you mean 'channel'\?\)"),
    (lambda: ac.Constrain(nn.Linear, LR1, skip_unexportable=1), TypeError, r"skip_unexportable must be a bool"),
]


@pytest.mark.parametrize("make, exc, match", SPEC_CONSTRUCTION)
def test_constrain_constructor(make, exc, match):
    _raises(exc, match, make)


SPEC_RESOLUTION = [
    # (model factory, spec, message)
    (_mlp, [ac.Constrain("conv*", LR1)], r"Constrain\('conv\*', .*\(spec\[0\]\) selects no layer of Sequential; "
                                         r"layers with a 'weight' are: 0, 2"),
    (_mlp, [ac.Constrain("1", LR1)], r"selects no layer"),  # the ReLU has no weight
    (_mlp, [ac.Constrain(nn.Conv2d, LR1)], r"Constrain\('Conv2d'.* selects no layer"),
    (_mlp, [ac.Constrain(nn.Linear, LR1), ac.Constrain("0", ac.LowRank(rank=2))],
     r"on layer '0': weight '0.weight' is already constrained by spec\[0\]"),
    (_mlp, [ac.Constrain(nn.Linear, LR1), ac.Constrain(nn.Linear, ac.Cardinality(k=1))], r"already constrained"),
    (_mlp, [ac.Constrain(nn.Linear, LR1, view="spatial")], r"on layer '0': view 'spatial' needs a Conv2d weight"),
    (_mlp, [ac.Constrain(nn.Linear, ac.TTRank((2, 2)))], r"layer '0'.*TTRank acts on a tensorized weight: pass view="),
    (_mlp, [ac.Constrain("2", ac.Cardinality(k=1000))], r"layer '2'.*k=1000 is larger than the 18 entries"),
    (_mlp, [ac.Constrain(nn.Linear, ac.Cardinality(k=2, group_dim=3))], r"layer '0'.*group_dim=3.*use 0 or 1"),
    (_mlp, [ac.Constrain(nn.Linear, LR1, param="weigth")], r"Linear has no tensor parameter 'weigth'"),
    (_convnet, [ac.Constrain(nn.Conv2d, ac.TTRank((2, 2)))], r"layer '0'.*view 'channel'.*TTRank acts on a tensorized weight"),
    # everything export could not realize is refused here, before training (issue 13, item 5)
    (_convnet, [ac.Constrain(nn.Conv2d, ac.Cardinality(k=2, group_dim=-1))], r"layer '0'.*group_dim=-1.*use 0 or 1"),
    (_convnet, [ac.Constrain(nn.Conv2d, ac.LowRank(rank=1), view="identity")], r"layer '0'.*view='identity' keeps the conv weight 4-D.*view='channel'"),
    (_convnet, [ac.Constrain(nn.Conv2d, ac.SchattenP(p=0.5, weight=1e-3), view="identity")], r"layer '0'.*view='identity'"),
    (_depthwise, [ac.Constrain("1", ac.Cardinality(density=0.5, group_dim=1))], r"layer '1'.*groups=4.*use unstructured Cardinality"),
    (_depthwise, [ac.Constrain("1", ac.LowRank(rank=1))], r"layer '1'.*groups=4.*exclude it"),
    (_odd_layers, [ac.Constrain(nn.Embedding, ac.Cardinality(density=0.5))], r"layer 'emb'.*Embedding has no compact exported form"),
    (_odd_layers, [ac.Constrain(nn.ConvTranspose2d, ac.Cardinality(density=0.5))], r"layer 'up'.*transposed convolution"),
    (_odd_layers, [ac.Constrain(nn.ConvTranspose2d, ac.Cardinality(k=1, group_dim=1), view="identity")], r"layer 'up'.*transposed"),
    (_odd_layers, [ac.Constrain(nn.Conv3d, ac.Cardinality(density=0.5))], r"layer 'c3'.*SparseConv2d, not Conv3d"),
    (_odd_layers, [ac.Constrain(nn.BatchNorm2d, ac.Cardinality(density=0.5))], r"layer 'bn'.*BatchNorm2d has no compact"),
    (_odd_layers, [ac.Constrain(nn.Linear, ac.Cardinality(density=0.5), param="bias")], r"layer 'lin'.*'bias' of Linear cannot be exported"),
    (_odd_layers, [ac.Constrain(nn.LSTM, ac.LowRank(rank=1), param="weight_ih_l0")], r"layer 'lstm'.*'weight_ih_l0' of LSTM cannot be exported"),
    (_odd_layers, [ac.Constrain("reflect", ac.LowRank(rank=1), view="spatial")], r"layer 'reflect'.*padding_mode='reflect'.*view='channel'"),
]


@pytest.mark.parametrize("model_fn, spec, match", SPEC_RESOLUTION)
def test_spec_resolution_refused_before_any_change(model_fn, spec, match):
    model = model_fn()
    snap = _snapshot(model)
    _raises(SpecError, match, lambda: ac.resolve(spec, model))
    solver = ac.Solver(spec, rho=1e-2)
    _raises(SpecError, match, lambda: solver.prepare(model))
    _raises(SpecError, match, lambda: ac.export(model, spec))
    _assert_unchanged(model, snap)
    assert not solver.bindings, "a refused prepare must not leave the solver half prepared"


@pytest.mark.parametrize("spec, exc, match", [
    ([], SpecError, r"spec is empty"),
    ("layers.*", TypeError, r"spec must be a Constrain or a list of Constrain, got str"),
    ([ac.Constrain(nn.Linear, LR1), "0"], TypeError, r"spec\[1\] must be an admm_compress.Constrain, got str"),
    (None, TypeError, r"got NoneType"),
])
def test_spec_container(spec, exc, match):
    _raises(exc, match, lambda: ac.Solver(spec))
    _raises(exc, match, lambda: ac.export(_mlp(), spec))


def test_resolve_and_export_refuse_a_non_module():
    spec = [ac.Constrain(nn.Linear, LR1)]
    _raises(TypeError, r"model must be a torch.nn.Module, got str", lambda: ac.resolve(spec, "model"))
    _raises(TypeError, r"model must be a torch.nn.Module, got str", lambda: ac.Solver(spec).prepare("model"))
    _raises(TypeError, r"export: model must be a torch.nn.Module, got OrderedDict \(a state_dict\?",
            lambda: ac.export(_mlp().state_dict(), spec))
    model = _mlp()
    snap = _snapshot(model)
    _raises(TypeError, r"export: inplace must be a bool, got 'yes'", lambda: ac.export(model, spec, inplace="yes"))
    _assert_unchanged(model, snap)


def test_export_of_non_finite_weights_is_refused_and_leaves_the_model():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = NAN
    snap = _snapshot(model)
    _raises(ValueError, r"non-finite entries", lambda: ac.export(model, [ac.Constrain(nn.Linear, LR1)]))
    now = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(now[k].nan_to_num(7.0), v.nan_to_num(7.0)), k


# =========================================================================== Solver
SPEC = [ac.Constrain("0", ac.LowRank(rank=2))]
SOLVER_CONSTRUCTOR = [
    (dict(rho=0), ValueError, r"rho=0.0 for Constrain\('0'.*ADMM needs rho > 0"),
    (dict(rho=-1.0), ValueError, r"rho=-1.0 is out of range"),
    (dict(rho=NAN), ValueError, r"rho=nan is out of range"),
    (dict(rho="1e-3"), TypeError, r"rho must be a real number, got '1e-3'"),
    (dict(mode="adm"), ValueError, r"mode='adm' is not allowed; choose one of"),
    (dict(every=0), ValueError, r"every=0 is out of range"),
    (dict(every=2.5), TypeError, r"every must be an integer, got 2.5"),
    (dict(every=True), TypeError, r"every must be an integer, got True"),
    (dict(every="batch"), TypeError, r"every must be an integer, got 'batch'"),
    (dict(rho_growth=0.5), ValueError, r"rho_growth=0.5 is out of range"),
    (dict(rho_max=0), ValueError, r"rho_max=0.0 is out of range"),
    (dict(tol=-1e-3), ValueError, r"tol=-0.001 is out of range"),
    (dict(skip_below=NAN), ValueError, r"skip_below=nan is out of range"),
]


@pytest.mark.parametrize("kw, exc, match", SOLVER_CONSTRUCTOR)
def test_solver_constructor(kw, exc, match):
    _raises(exc, match, lambda: ac.Solver(SPEC, **kw))


def test_solver_used_before_prepare():
    s = ac.Solver(SPEC)
    for call in (s.penalty, s.step, s.epoch_end, s.update, s.finalize, lambda: s.load_state_dict({})):
        _raises(RuntimeError, r"Solver is not prepared: call solver.prepare\(model\)", call)


def test_load_state_dict_of_another_model_or_spec():
    model = _mlp()
    s = ac.Solver(SPEC, rho=0.1).prepare(model)
    other = ac.Solver([ac.Constrain(nn.Linear, LR1)], rho=0.1).prepare(_mlp())
    _raises(ValueError, r"solver state is for weights \['0.weight', '2.weight'\], but this solver binds \['0.weight'\]",
            lambda: s.load_state_dict(other.state_dict()))
    sd = s.state_dict()
    sd["Z"] = {"0.weight": torch.zeros(2, 2)}
    _raises(ValueError, r"solver state Z\[0.weight\] has shape \(2, 2\), the weight has \(6, 8\)",
            lambda: s.load_state_dict(sd))
    proj = ac.Solver(SPEC, mode="projection").prepare(_mlp())
    _raises(ValueError, r"mode='projection', this solver has mode='admm'", lambda: s.load_state_dict(proj.state_dict()))
    _raises(TypeError, r"sd must be a dict from Solver.state_dict\(\), got list", lambda: s.load_state_dict([]))
    _raises(ValueError, r"sd lacks \['rhos'\]",
            lambda: s.load_state_dict({k: v for k, v in s.state_dict().items() if k != "rhos"}))
    # nothing is half-loaded: a bad second entry leaves the first one as it was
    z_before = {k: v.clone() for k, v in s.Z.items()}
    sd = s.state_dict()
    sd["Z"] = {k: torch.full_like(v, 7.0) for k, v in sd["Z"].items()}
    sd["U"] = {"0.weight": torch.zeros(1)}
    _raises(ValueError, r"U\[0.weight\] has shape \(1,\)", lambda: s.load_state_dict(sd))
    assert all(torch.equal(s.Z[k], z_before[k]) for k in z_before)


# ---------------------------------------------------------------- fit
def _loader(n_batches=3, nan_from_epoch=None):
    """A re-iterable loader of fixed random digits-like batches (64 features, 10 classes).

    From epoch ``nan_from_epoch`` on, the inputs of the second batch are NaN.
    """
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n_batches)]

    class Loader:
        epoch = 0

        def __len__(self):
            return n_batches

        def __iter__(self):
            e, self.epoch = self.epoch, self.epoch + 1
            for i, (x, y) in enumerate(batches):
                if nan_from_epoch is not None and e >= nan_from_epoch and i == 1:
                    x = torch.full_like(x, NAN)
                yield x, y
    return Loader()


def _fcn():
    torch.manual_seed(0)
    return models.fcn(depth=3, width=16)


FSPEC = [ac.Constrain("layers.0", ac.LowRank(rank=2))]


def _fit(model, loader=None, spec=FSPEC, **kw):
    kw.setdefault("progress", False)
    return ac.Solver(spec, rho=0.05).fit(model, _loader() if loader is None else loader, **kw)


@pytest.fixture
def good_checkpoint(tmp_path):
    """A checkpoint written by one epoch of ``_fcn`` under ``FSPEC``; returns (path, bytes)."""
    path = tmp_path / "ck.pt"
    _fit(_fcn(), epochs=1, checkpoint=path)
    return path, path.read_bytes()


FIT_ARGS = [
    (dict(epochs=-1), ValueError, r"fit: epochs=-1 is out of range; allowed: 0 <= epochs"),
    (dict(epochs=1.5), TypeError, r"fit: epochs must be an integer, got 1.5 \(float\)"),
    (dict(epochs=True), TypeError, r"fit: epochs must be an integer, got True \(bool\)"),
    (dict(epochs=NAN), TypeError, r"fit: epochs must be an integer, got nan"),
    (dict(finetune_epochs=-2), ValueError, r"fit: finetune_epochs=-2 is out of range"),
    (dict(lr=0.0), ValueError, r"fit: lr=0.0 is out of range; allowed: lr in \(0.0, inf\]"),
    (dict(lr=NAN), ValueError, r"fit: lr=nan is out of range"),
    (dict(loader=None), ValueError, r"fit: loader is None"),
    (dict(loader=[]), ValueError, r"fit: loader is empty \(len\(loader\) == 0\)"),
    (dict(loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 64),
                                                                            torch.zeros(0, dtype=torch.long)))),
     ValueError, r"fit: loader is empty"),
    (dict(val_loader=[]), ValueError, r"fit: val_loader is empty"),
    (dict(optimizer="sgd"), TypeError, r"fit: optimizer must be a torch.optim.Optimizer or a factory .* got str"),
    (dict(finetune_optimizer="sgd"), TypeError, r"fit: finetune_optimizer must be .* got str"),
    (dict(loss_fn="cross_entropy"), TypeError, r"fit: loss_fn must be callable, got 'cross_entropy'"),
    (dict(scheduler=3), TypeError, r"fit: scheduler must be callable, got 3"),
    (dict(callbacks=[print, 3]), TypeError, r"fit: callbacks must be callables .* got 3"),
    (dict(progress="yes"), TypeError, r"fit: progress must be a bool or None, got 'yes'"),
    (dict(checkpoint=123), TypeError, r"fit: checkpoint must be a file path .* got int"),
    (dict(device="gpu"), ValueError, r"device='gpu' is not a valid torch device"),
    (dict(device=3.5), ValueError, r"device=3.5 is not a valid torch device"),
    (dict(device="cuda"), RuntimeError, r"device='cuda' was asked for, but CUDA is not available"),
    (dict(device="cuda:1"), RuntimeError, r"device='cuda:1' was asked for, but CUDA is not available"),
]


@pytest.mark.parametrize("kw, exc, match", FIT_ARGS, ids=[str(list(c[0]))[1:-1] + f"-{i}" for i, c in enumerate(FIT_ARGS)])
def test_fit_arguments_refused_before_any_work(kw, exc, match, monkeypatch, good_checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a CUDA machine
    path, good = good_checkpoint
    kw = dict(kw)
    loader = kw.pop("loader", "default")
    model = _fcn()
    snap = _snapshot(model)
    kw.setdefault("checkpoint", path)
    solver = ac.Solver(FSPEC, rho=0.05)
    _raises(exc, match, lambda: solver.fit(model, _loader() if loader == "default" else loader, **kw))
    _assert_unchanged(model, snap)
    assert path.read_bytes() == good
    assert not solver.bindings, "fit refused its arguments but prepared the solver"


def test_fit_refuses_a_non_module_and_a_directory_checkpoint(tmp_path):
    _raises(TypeError, r"fit: model must be a torch.nn.Module, got OrderedDict \(a state_dict\?", lambda: _fit(_fcn().state_dict()))
    _raises(ValueError, r"fit: checkpoint='.*' is a directory; give a file path", lambda: _fit(_fcn(), checkpoint=tmp_path))


def test_fit_bad_batches():
    _raises(ValueError, r"each batch of the loader must be \(inputs, targets\), got Tensor",
            lambda: _fit(_fcn(), loader=[torch.zeros(4, 64)]))
    _raises(ValueError, r"got tuple of length 1", lambda: _fit(_fcn(), loader=[(torch.zeros(4, 64),)]))


def test_nan_batch_stops_fit_and_keeps_last_good_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    model = _fcn()
    seen = {}

    def keep(solver, m, rec):  # runs after each epoch, right before its checkpoint is written
        seen[rec["epoch"]] = _snapshot(m)

    loader = _loader(nan_from_epoch=1)
    _raises(NonFiniteError, r"the training loss became nan at epoch 1, step 1; .*last checkpoint .* is intact",
            lambda: _fit(model, loader=loader, epochs=3, checkpoint=path, callbacks=[keep]))
    assert list(seen) == [0]
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and ck["phase"] == "train"
    for k, v in seen[0].items():
        assert torch.equal(ck["model"][k], v), k
    good = path.read_bytes()
    # rerunning on the same bad data fails the same way and still leaves the checkpoint alone
    _raises(NonFiniteError, r"became nan at epoch 1", lambda: _fit(_fcn(), loader=_loader(nan_from_epoch=0), epochs=3,
                                                                  checkpoint=path))
    assert path.read_bytes() == good
    # with good data it resumes from that checkpoint and finishes
    hist = _fit(_fcn(), epochs=2, checkpoint=path)
    assert [r["epoch"] for r in hist.epochs] == [0, 1] and math.isfinite(hist.epochs[-1]["loss"])


def test_diverging_weights_stop_fit(tmp_path):
    path = tmp_path / "ck.pt"
    _raises(NonFiniteError, r"(loss became (nan|inf))|(parameter '.*' became non-finite)",
            lambda: _fit(_fcn(), epochs=3, lr=1e30, checkpoint=path))
    assert not path.exists(), "no checkpoint of a diverged epoch may be written"


# ---------------------------------------------------------------- checkpoints
class _Evil:
    """Unpickling this would create ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _write_foreign(kind: str, path: Path, tmp: Path) -> None:
    if kind == "truncated":
        _fit(_fcn(), epochs=1, checkpoint=path)
        b = path.read_bytes()
        path.write_bytes(b[: len(b) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    elif kind == "pickle_code":
        torch.save({"format": "admm_compress.fit/1", "payload": _Evil(tmp / "pwned")}, path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "other_file":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    elif kind == "other_format":
        _fit(_fcn(), epochs=1, checkpoint=path)
        ck = load_checkpoint(path)
        ck["format"] = "someone-else/2"
        torch.save(ck, path)
    elif kind == "bad_phase":
        _fit(_fcn(), epochs=1, checkpoint=path)
        ck = load_checkpoint(path)
        ck["phase"] = "warmup"
        torch.save(ck, path)
    elif kind == "other_model":
        torch.manual_seed(0)
        _fit(models.fcn(depth=3, width=8), epochs=1, checkpoint=path)
    elif kind == "other_spec":
        _fit(_fcn(), epochs=1, checkpoint=path, spec=[ac.Constrain("layers.1", ac.LowRank(rank=2))])
    elif kind == "other_mode":
        ac.Solver(FSPEC, mode="projection").fit(_fcn(), _loader(), epochs=1, checkpoint=path, progress=False)
    elif kind == "other_optimizer":
        _fit(_fcn(), epochs=1, checkpoint=path,
             optimizer=lambda p: torch.optim.SGD([{"params": list(p)[:2]}, {"params": []}], lr=0.1))
    else:  # pragma: no cover
        raise AssertionError(kind)


CHECKPOINTS = [
    ("truncated", r"cannot be read safely .*truncated, not a torch.save file"),
    ("empty", r"cannot be read safely"),
    ("garbage", r"cannot be read safely"),
    ("pickle_code", r"cannot be read safely \(UnpicklingError: Weights only load failed.*carries objects other"),
    ("not_a_dict", r"holds a list, expected a dict"),
    ("other_file", r"lacks \['format', 'model', .*not written by admm_compress.Solver.fit"),
    ("other_format", r"has format 'someone-else/2'; expected 'admm_compress.fit/1'"),
    ("bad_phase", r"has phase='warmup'; expected 'train' or 'finetune'"),
    ("other_model", r"is from another model: \d+ mismatching state_dict entries \(e.g. \['layers.0.weight: "
                    r"\(8, 64\) vs \(16, 64\)'"),
    ("other_spec", r"is from another spec: its solver state constrains \['layers.1.weight'\], "
                   r"this solver binds \['layers.0.weight'\]"),
    ("other_mode", r"written by a solver with mode='projection'; this solver has mode='admm'"),
    ("other_optimizer", r"optimizer state has parameter groups of sizes \[2, 0\], this optimizer has \[6\]"),
]


@pytest.mark.parametrize("kind, match", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_unusable_checkpoint_is_refused_and_left_alone(kind, match, tmp_path):
    path = tmp_path / "ck.pt"
    _write_foreign(kind, path, tmp_path)
    before = path.read_bytes()
    model = _fcn()
    snap = _snapshot(model)
    info = _raises(CheckpointError, match, lambda: _fit(model, epochs=2, checkpoint=path))
    assert str(path) in str(info.value), "the message names the file"
    _assert_unchanged(model, snap)
    assert path.read_bytes() == before
    assert not (tmp_path / "pwned").exists(), "unpickling executed code from the checkpoint"


# =========================================================================== export / complexity
COMPLEXITY = [
    ((32,), RuntimeError, r"input_size=\(32,\).*mat1 and mat2 shapes cannot be multiplied.*first layer 'layers.0' "
                          r"is an nn.Linear with in_features=64"),
    ((0,), ValueError, r"input_size entry=0 is out of range"),
    ((-64,), ValueError, r"input_size entry=-64 is out of range"),
    ((64.0,), TypeError, r"input_size entry must be an integer, got 64.0"),
    ((True,), TypeError, r"input_size entry must be an integer, got True"),
    ("64", ValueError, r"input_size must be a non-empty tuple of positive ints .* got '64'"),
    ((), ValueError, r"input_size must be a non-empty tuple .* got \(\)"),
    (None, ValueError, r"input_size must be a non-empty tuple .* got None"),
]


@pytest.mark.parametrize("size, exc, match", COMPLEXITY)
def test_complexity_input_size(size, exc, match):
    model = _fcn()
    snap = _snapshot(model)
    _raises(exc, match, lambda: ac.complexity(model, size))
    _assert_unchanged(model, snap)
    assert model.training, "the train/eval flag must be restored after a failed count"


def test_complexity_conv_input_with_batch_dimension():
    _raises(RuntimeError, r"input_size=\(1, 3, 32, 32\).*first layer 'conv1' is an nn.Conv2d with in_channels=3, "
                          r"expecting input_size=\(3, H, W\) without the batch dimension",
            lambda: ac.complexity(models.resnet20(), (1, 3, 32, 32)))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(backend="fvcore"), ValueError, r"backend='fvcore' is not allowed; choose one of"),
    (dict(custom_hooks=[1]), TypeError, r"custom_hooks must be a mapping or None, got list"),
    (dict(allow_zero=[3]), TypeError, r"allow_zero entries must be module-name globs .* got 3"),
    (dict(count_functional="yes"), TypeError, r"count_functional must be a bool, got 'yes'"),
])
def test_complexity_options(kw, exc, match):
    _raises(exc, match, lambda: ac.complexity(_fcn(), (64,), **kw))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(batch=0), ValueError, r"batch=0 is out of range"),
    (dict(repeats=1.5), TypeError, r"repeats must be an integer, got 1.5"),
    (dict(warmup=-1), ValueError, r"warmup=-1 is out of range"),
    (dict(device="gpu"), ValueError, r"device='gpu' is not a valid torch device"),
    (dict(device="cuda"), RuntimeError, r"device='cuda' was asked for, but CUDA is not available"),
])
def test_latency_arguments(kw, exc, match, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _raises(exc, match, lambda: ac.latency(_fcn(), (64,), repeats=kw.pop("repeats", 1), warmup=kw.pop("warmup", 0), **kw))


def test_evaluate_on_missing_cuda_and_empty_loader(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _raises(RuntimeError, r"device='cuda' was asked for, but CUDA is not available",
            lambda: ac.evaluate(_fcn(), _loader(), device="cuda"))
    _raises(ValueError, r"evaluate: the loader yielded no batch", lambda: ac.evaluate(_fcn(), []))


# =========================================================================== data
DATA = [
    (lambda: data.digits(batch_size=0), ValueError, r"batch_size=0 is out of range; allowed: 1 <= batch_size"),
    (lambda: data.digits(batch_size=-8), ValueError, r"batch_size=-8 is out of range"),
    (lambda: data.digits(batch_size=32.0), TypeError, r"batch_size must be an integer, got 32.0 \(float\)"),
    (lambda: data.digits(batch_size=True), TypeError, r"batch_size must be an integer, got True \(bool\)"),
    (lambda: data.digits(test_fraction=0), ValueError, r"test_fraction=0.0 is out of range"),
    (lambda: data.digits(test_fraction=1), ValueError, r"test_fraction=1.0 is out of range"),
    (lambda: data.digits(test_fraction=NAN), ValueError, r"test_fraction=nan is out of range"),
    (lambda: data.digits(test_fraction=0.001), ValueError, r"test_fraction=0.001 leaves 2 test"),
    (lambda: data.digits(seed=-1), ValueError, r"seed=-1 is out of range"),
    (lambda: data.digits(flat="yes"), TypeError, r"flat must be a bool, got 'yes'"),
    (lambda: data.digits(num_workers=-1), ValueError, r"num_workers=-1 is out of range"),
    (lambda: data.digits32(size=4), ValueError, r"size=4 is out of range; allowed: 8 <= size"),
    (lambda: data.synthetic(shape=()), ValueError, r"shape must be a non-empty tuple of positive ints, got \(\)"),
    (lambda: data.synthetic(shape=(3, 0, 4)), ValueError, r"shape entry=0 is out of range"),
    (lambda: data.synthetic(n=0), ValueError, r"n=0 is out of range"),
    (lambda: data.synthetic(num_classes=0), ValueError, r"num_classes=0 is out of range"),
    (lambda: data.get_loaders("cifar11"), ValueError, r"unknown dataset name='cifar11'; choose one of \['cifar10'"),
    (lambda: data.info("imagenet"), ValueError, r"unknown dataset name='imagenet'"),
    (lambda: data.cifar10(root="/nonexistent-admm"), FileNotFoundError,
     r"CIFAR-10 not found: expected the folder '/nonexistent-admm/cifar-10-batches-py'"),
]


@pytest.mark.parametrize("call, exc, match", DATA)
def test_data_functions(call, exc, match):
    _raises(exc, match, call)


# =========================================================================== methods
METHODS = [
    (lambda: methods.lrpet(pruning_ratio=1.0), ValueError, r"lrpet: pruning_ratio=1.0 is out of range; allowed: "
                                                          r"pruning_ratio in \[0.0, 1.0\)"),
    (lambda: methods.lrpet(pruning_ratio=-0.1), ValueError, r"pruning_ratio=-0.1 is out of range"),
    (lambda: methods.lrpet(pruning_ratio=NAN), ValueError, r"pruning_ratio=nan is out of range"),
    (lambda: methods.lrpet(pruning_ratio=True), TypeError, r"pruning_ratio must be a real number, got True"),
    (lambda: methods.lrpet(pruning_ratio="0.5"), TypeError, r"pruning_ratio must be a real number, got '0.5'"),
    (lambda: methods.lrpet(min_rank=0), ValueError, r"lrpet: min_rank=0 is out of range"),
    (lambda: methods.lorita(n_factors=0), ValueError, r"lorita: n_factors=0 is out of range"),
    (lambda: methods.lorita(n_factors=2.0), TypeError, r"lorita: n_factors must be an integer, got 2.0"),
    (lambda: methods.lorita(weight_decay=-1), ValueError, r"lorita: weight_decay=-1.0 is out of range"),
    (lambda: methods.lorita(weight_decay=NAN), ValueError, r"lorita: weight_decay=nan is out of range"),
    (lambda: methods.lorita(truncation="svd"), ValueError, r"lorita: truncation='svd' is not allowed"),
    (lambda: methods.lorita(rank=0), ValueError, r"lorita: rank=0 is out of range"),
    (lambda: methods.lorita(rank_ratio=1.5), ValueError, r"lorita: rank_ratio=1.5 is out of range"),
    (lambda: methods.lorita(optimizer="rmsprop"), ValueError, r"lorita: optimizer='rmsprop' is not allowed"),
    (lambda: methods.lorita(truncation="gsvt"), ValueError, r"truncation='gsvt' needs keep="),
    (lambda: methods.raspa(tt_ranks=0), ValueError, r"raspa: tt_ranks=0 is out of range"),
    (lambda: methods.raspa(tt_ranks=(0, 2)), ValueError, r"raspa: tt_ranks\[0\]=0 is out of range"),
    (lambda: methods.raspa(tt_ranks=()), TypeError, r"raspa: tt_ranks must be a positive int or a non-empty tuple"),
    (lambda: methods.raspa(tt_ranks=2.5), TypeError, r"tt_ranks must be .* got 2.5"),
    (lambda: methods.raspa(tt_ranks=(True, 2)), TypeError, r"tt_ranks\[0\] must be an integer, got True"),
    (lambda: methods.raspa(density=0), ValueError, r"raspa: density=0.0 is out of range"),
    (lambda: methods.raspa(density=1.5), ValueError, r"raspa: density=1.5 is out of range"),
    (lambda: methods.raspa(density=NAN), ValueError, r"raspa: density=nan is out of range"),
    (lambda: methods.raspa(rho=0), ValueError, r"raspa: rho=0.0 is out of range"),
    (lambda: methods.decomposable_net(rank_ratio=(0.5, 0.1)), ValueError,
     r"rank_ratio=\(0.5, 0.1\): alpha_l=0.5 must be smaller than alpha_u=0.1"),
    (lambda: methods.decomposable_net(rank_ratio=(0, 0.25)), ValueError, r"alpha_l=0.0 is out of range"),
    (lambda: methods.decomposable_net(rank_ratio=(0.1, 1.5)), ValueError, r"alpha_u=1.5 is out of range"),
    (lambda: methods.decomposable_net(rank_ratio=(NAN, 0.2)), ValueError, r"alpha_l=nan is out of range"),
    (lambda: methods.decomposable_net(rank_ratio=0.3), TypeError, r"rank_ratio must be a pair .* got 0.3"),
    (lambda: methods.decomposable_net(lam=1.5), ValueError, r"decomposable_net: lam=1.5 is out of range"),
    (lambda: methods.decomposable_net(lam=NAN), ValueError, r"lam=nan is out of range"),
    (lambda: methods.decomposable_net(criterion="bogus"), ValueError, r"criterion='bogus' is not allowed"),
    (lambda: methods.decomposable_net(scheme="diag"), ValueError, r"scheme='diag' is not allowed"),
    (lambda: methods.decomposable_net(min_rank=0), ValueError, r"min_rank=0 is out of range"),
    (lambda: methods.trp(energy=0), ValueError, r"trp: energy=0.0 is out of range"),
    (lambda: methods.trp(energy=NAN), ValueError, r"trp: energy=nan is out of range"),
    (lambda: methods.trp(nuclear_weight=-1), ValueError, r"trp: nuclear_weight=-1.0 is out of range"),
    (lambda: methods.trp(every=0), ValueError, r"every=0 is out of range"),
    (lambda: methods.trp(every=2.5), TypeError, r"every must be an integer, got 2.5"),
]


@pytest.mark.parametrize("make, exc, match", METHODS)
def test_method_constructors(make, exc, match):
    _raises(exc, match, make)


def test_method_on_a_model_it_cannot_handle_leaves_the_model():
    """LRPET constrains convolutions: an MLP has none (spec matches nothing)."""
    model = _mlp()
    snap = _snapshot(model)
    _raises(SpecError, r"selects no layer of Sequential", lambda: methods.lrpet(0.5).prepare(model))
    _assert_unchanged(model, snap)


# =========================================================================== CLI
CLI = [
    (["run", "digits_fnc", "lrpet"], r"unknown problem 'digits_fnc' \(did you mean 'digits_fcn'\?\); valid problems:"),
    (["run", "digits_fcn", "lrpt"], r"unknown solver 'lrpt' \(did you mean 'lrpet'\?\); valid solvers:"),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_rate=0.5"],
     r"unknown parameter 'pruning_rate' \(did you mean 'pruning_ratio'\?\)"),
    (["run", "digits_fcn", "lrpet", "--set", "problem.bogus=1"], r"unknown parameter 'bogus'"),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_ratio"], r"--set expects key=value, got 'pruning_ratio'"),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_ratio=1.5"],
     r"solver 'lrpet' with pruning_ratio=1.5.*pruning_ratio=1.5 is out of range"),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_ratio=abc"], r"pruning_ratio must be a real number, got 'abc'"),
    (["run", "digits_fcn", "lrpet", "--set", "depth=0"], r"problem 'digits_fcn' with depth=0: depth=0 is out of range"),
    (["run", "digits_fcn", "lrpet", "--epochs", "-1"], r"--epochs=-1 must be >= 0"),
    (["run", "digits_fcn", "lrpet", "--threads", "0"], r"--threads=0 must be >= 1"),
    (["run", "digits_fcn", "lrpet", "--device", "cuda"], r"device='cuda' was asked for, but CUDA is not available"),
    (["run", "digits_fcn", "lrpet", "--device", "gpu"], r"device='gpu' is not a valid torch device"),
    (["bench", "digits_fcn", "--solvers", "lrpet", "nope"], r"unknown solver 'nope'"),
    (["bench", "digits_fcn", "--solvers", "lrpet", "raspa", "--set", "raspa.density=2"],
     r"solver 'raspa' with .*density=2.*raspa: density=2.0 is out of range"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, match", CLI, ids=[" ".join(c[0][1:]) or c[0][0] for c in CLI])
def test_cli_usage_errors_exit_2_before_any_work(argv, match, tmp_path, monkeypatch, capsys):
    from admm_compress.cli import main

    monkeypatch.chdir(ROOT)  # problems/ and solvers/ are found from the repository root
    monkeypatch.delenv("ADMM_COMPRESS_PATH", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    extra = ["--out", str(out), "--no-progress"] if argv[0] in ("run", "bench") else []
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not out.exists(), "a refused command must not create its output folder"


# every CLI value is checked before the dense pretraining (which would fail the test if it ran)
CLI_VALUES = [
    (["run", "digits_fcn", "lrpet", "--set", "epochs=-1"], r"Problem 'digits_fcn': epochs=-1 is out of range"),
    (["run", "digits_fcn", "lrpet", "--set", "pretrain_epochs=-1"], r"pretrain_epochs=-1 is out of range"),
    (["run", "digits_fcn", "lrpet", "--set", "finetune_epochs=-2"], r"finetune_epochs=-2 is out of range"),
    (["run", "digits_fcn", "lrpet", "--set", "lr=-1"], r"lr=-1.0 is out of range; allowed: lr in \(0.0, inf\]"),
    (["run", "digits_fcn", "lrpet", "--set", "lr=nan"], r"--set lr=nan: parameters must be finite numbers"),
    (["run", "digits_fcn", "lrpet", "--set", "lr=abc"], r"lr must be a real number, got 'abc'"),
    (["run", "digits_fcn", "admm_lowrank", "--set", "view=chanel"], r"view='chanel' is not a known view"),
    (["run", "digits_fcn", "trp", "--set", "view=chanel"], r"trp: view='chanel' is not allowed"),
    (["run", "digits_fcn", "lorita", "--set", "lr_scale=0"], r"lr_scale=0.0 is out of range"),
    (["run", "digits_fcn", "lorita", "--set", "target_ratio=2"], r"target_ratio=2.0 is out of range"),
    (["run", "digits_fcn", "decomposable_net", "--set", "export_ratio=2"], r"export_ratio=2.0 is out of range"),
    (["run", "digits_fcn", "lrpet", "--set", "include_linear=maybe"],
     r"include_linear='maybe' of solver 'lrpet' must be true or false"),
    (["run", "digits_fcn", "lrpet", "--set", "pruning_ration=0.5"], r"did you mean 'pruning_ratio'"),
    (["run", "digits_fcn", "lrpet", "--seed", "-1"], r"seed -1 must be >= 0"),
    (["run", "best_rank_r", "admm_lowrank", "--set", "steps_per_epoch=0"], r"train_loader yields no batch"),
    (["run", "best_rank_r", "admm_lowrank", "--set", "tolerance=-1"], r"tolerance=-1.0 is out of range"),
    (["run", "robust_pca", "admm_lowrank", "--set", "density=2"], r"robust_pca: density=2.0 is out of range"),
    (["run", "schatten_completion", "admm_lowrank", "--set", "observed=0"], r"observed=0.0 is out of range"),
    (["bench", "digits_fcn", "--solvers", "lrpet", "--set", "lr=inf"], r"--set lr=inf: parameters must be finite"),
    (["bench", "digits_fcn", "--solvers", "dense", "lrpet", "--set", "pretrain_epochs=-1"],
     r"pretrain_epochs=-1 is out of range"),
]


@pytest.mark.parametrize("argv, match", CLI_VALUES, ids=[" ".join(c[0][1:]) for c in CLI_VALUES])
def test_cli_values_are_refused_before_pretraining(argv, match, tmp_path, monkeypatch, capsys):
    from admm_compress import registry
    from admm_compress.cli import main

    def no_training(*a, **k):
        raise AssertionError("training started before the bad value was refused")

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ADMM_COMPRESS_PATH", raising=False)
    monkeypatch.setattr(registry, "train_dense", no_training)
    monkeypatch.setattr(ac.Solver, "fit", no_training)
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not out.exists(), "a refused command must not create its output folder"


def test_cli_unwritable_outputs_are_refused_before_pretraining(tmp_path, monkeypatch, capsys):
    from admm_compress import registry
    from admm_compress.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ADMM_COMPRESS_PATH", raising=False)
    monkeypatch.setattr(registry, "train_dense", lambda *a, **k: pytest.fail("training started"))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for argv, match in [
        (["run", "digits_fcn", "lrpet", "--out", str(afile / "sub")],
         rf"--out '{re.escape(str(afile / 'sub'))}' cannot be written"),
        (["run", "digits_fcn", "lrpet", "--out", str(afile)], rf"--out '{re.escape(str(afile))}' exists and is not a folder"),
        (["bench", "digits_fcn", "--solvers", "lrpet", "--out", str(tmp_path / "b"), "--report", str(afile / "rep")],
         rf"--report folder '{re.escape(str(afile))}' exists and is not a folder"),
        (["bench", "digits_fcn", "--solvers", "lrpet", "--out", str(tmp_path / "b"), "--report",
          str(afile / "sub" / "rep")], rf"--report folder '{re.escape(str(afile / 'sub'))}' cannot be written"),
    ]:
        assert main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(match, err), err
    assert not (tmp_path / "b").exists()  # nothing created when a later output check fails
    (tmp_path / "o" / "results.json").mkdir(parents=True)  # a folder where a result file goes
    assert main(["run", "digits_fcn", "lrpet", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "results.json' is a folder" in capsys.readouterr().err


def test_fit_checkpoint_in_an_unwritable_place_is_refused_before_training(tmp_path):
    model = _mlp()
    snap = _snapshot(model)
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad = afile / "run.pt"
    _raises(ValueError, rf"fit: checkpoint='{re.escape(str(bad))}' cannot be written",
            lambda: ac.Solver(SPEC, rho=0.1).fit(model, [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))],
                                                 epochs=1, checkpoint=bad, progress=False))
    _assert_unchanged(model, snap)
    # a missing folder is created (the run can write there)
    ok = tmp_path / "new" / "deeper" / "run.pt"
    ac.Solver(SPEC, rho=0.1).fit(_mlp(), [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], epochs=1,
                                 checkpoint=ok, progress=False)
    assert ok.is_file()


def test_fit_with_inputs_the_model_cannot_take_names_the_batch_shape():
    model = _mlp()
    snap = _snapshot(model)
    bad = [(torch.randn(4, 32), torch.randint(0, 10, (4,)))]
    _raises(ValueError, r"cannot take the loader's first batch of epoch 0 \(inputs \(4, 32\), targets \(4,\)\)",
            lambda: ac.Solver(SPEC, rho=0.1).fit(model, bad, epochs=1, progress=False))
    _assert_unchanged(model, snap)


def test_fused_attention_parameter_refused_at_prepare():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    spec = [ac.Constrain("0", ac.Cardinality(density=0.5), param="in_proj_weight")]
    snap = _snapshot(model)
    _raises(SpecError, r"layer '0'.*in_proj_weight.*attention\.convert\(model\)", lambda: ac.Solver(spec).prepare(model))
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attr, value, exc, match", [
    ("preconditioned_settle_lr_scale", "fast", ValueError,
     r"preconditioned_settle_lr_scale='fast'.*'auto' or a positive"),
    ("preconditioned_settle_lr_scale", 0.0, ValueError, r"preconditioned_settle_lr_scale.*0\.0"),
    ("preconditioned_settle_lr_scale", NAN, ValueError, r"preconditioned_settle_lr_scale.*nan"),
    ("preconditioned_settle_max_lr", -0.1, ValueError, r"preconditioned_settle_max_lr.*-0\.1"),
    ("slow_settle_lr_scale", "x", TypeError, r"slow_settle_lr_scale.*'x'"),
])
def test_settle_multipliers_are_checked_before_the_first_epoch(attr, value, exc, match):
    model = _mlp()
    snap = _snapshot(model)
    s = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(rank=2))])
    setattr(s, attr, value)
    _raises(exc, match, lambda: s.fit(model, _loader(), epochs=2, progress=False))
    _assert_unchanged(model, snap)
