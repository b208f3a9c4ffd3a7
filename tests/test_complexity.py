"""complexity(): hand-computed MACs, flop_counter cross-check, zero-count errors,
parametrized layers, registry, no printing; latency()."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import parametrize

from admm_compress import models
from admm_compress.complexity import (Complexity, complexity, latency, register_counter,
                                      torch_macs, unregister_counter)


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def test_tiny_net_hand_computed_macs():
    m = tiny_net()
    conv = 4 * 3 * 3 * 3 * 25 + 4 * 25          # weights per output position + bias
    bn = 2 * 4 * 25                             # affine BN: scale and shift per element
    relu = 4 * 25
    fc = 100 * 3 + 3
    params = (4 * 27 + 4) + 2 * 4 + (300 + 3)
    c = complexity(m, (3, 5, 5), backend="pytorch", count_functional=False)
    assert c.macs == conv + bn + relu + fc
    assert c.params == params
    assert c.per_module == {"0": conv, "1": bn, "2": relu, "4": fc}
    # ptflops default also counts the F.relu call inside nn.ReLU (ptflops issue #139)
    c2 = complexity(m, (3, 5, 5), backend="pytorch")
    assert c2.macs == conv + bn + 2 * relu + fc
    assert c2.unattributed_macs == relu
    assert c2.macs == sum(c2.per_module.values()) + c2.unattributed_macs
    # aten: only convolutions and matrix products (bias included)
    c3 = complexity(m, (3, 5, 5), backend="aten")
    assert c3.macs == conv + fc and c3.params == params and c3.per_module == {}


@settings(max_examples=15, deadline=None)
@given(cin=st.integers(1, 4), cout=st.integers(1, 5), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), hw=st.integers(3, 7), out=st.integers(1, 6),
       groups=st.sampled_from([1, 2]))
def test_ptflops_matches_torch_flop_counter_on_plain_nets(cin, cout, k, stride, hw, out, groups):
    cin, cout = cin * groups, cout * groups
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    side = (hw + 2 * (k // 2) - k) // stride + 1
    m = nn.Sequential(conv, nn.Flatten(), nn.Linear(cout * side * side, out, bias=False))
    ref = torch_macs(m, (cin, hw, hw))
    assert complexity(m, (cin, hw, hw), backend="pytorch").macs == ref
    assert complexity(m, (cin, hw, hw), backend="aten").macs == ref


def test_resnet20_aten_equals_flop_counter_plus_fc_bias():
    m = models.resnet20()
    assert complexity(m, (3, 32, 32), backend="aten").macs == torch_macs(m, (3, 32, 32)) + 10


class Bilinear(nn.Module):
    """A custom layer ptflops does not know: y = x @ W."""

    def __init__(self, n=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return x @ self.w


def test_module_with_parameters_but_no_counter_raises():
    m = nn.Sequential(nn.Linear(4, 4), Bilinear())
    with pytest.raises(ValueError) as e:
        complexity(m, (4,), backend="pytorch")
    msg = str(e.value)
    assert "'1'" in msg and "Bilinear" in msg and "register_counter" in msg
    # aten counts the matmul without help
    assert complexity(m, (4,), backend="aten").macs == 4 * 4 + 4 + 4 * 4


def test_register_counter_allow_zero_and_custom_hooks():
    m = nn.Sequential(nn.Linear(4, 4), Bilinear())
    lin = 16 + 4
    register_counter(Bilinear, lambda mod, inputs, out: inputs[0].shape[0] * mod.w.numel())
    try:
        c = complexity(m, (4,))
        assert c.macs == lin + 16 and c.per_module["1"] == 16
    finally:
        unregister_counter(Bilinear)
    assert complexity(m, (4,), custom_hooks={Bilinear: lambda *a: 7}).macs == lin + 7
    assert complexity(m, (4,), allow_zero=[Bilinear]).macs == lin
    assert complexity(m, (4,), allow_zero=["1"]).macs == lin
    with pytest.raises(ValueError, match="Bilinear"):
        complexity(m, (4,), allow_zero=["0"])
    with pytest.raises(ValueError, match="int >= 0"):
        complexity(m, (4,), custom_hooks={Bilinear: lambda *a: -1})


def test_params_fn_overrides_parameter_count():
    m = nn.Sequential(nn.Linear(4, 4), Bilinear())
    register_counter(Bilinear, lambda *a: 0, params_fn=lambda mod: 3)
    try:
        assert complexity(m, (4,)).params == 20 + 3
    finally:
        unregister_counter(Bilinear)


def test_unused_module_with_parameters_raises():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="never called"):
        complexity(Net(), (4,))
    assert complexity(Net(), (4,), allow_zero=["unused"]).params == 20


class Product(nn.Module):
    """W = A @ B (a factor product, as in LoRITa)."""

    def __init__(self, m, n, r):
        super().__init__()
        self.A = nn.Parameter(torch.randn(m, r))
        self.B = nn.Parameter(torch.randn(r, n))

    def forward(self, w):
        return torch.matmul(self.A, self.B)


@pytest.mark.parametrize("backend", ["pytorch", "aten"])
def test_parametrized_layers_count_as_dense_layers(backend):
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 5))
    dense = complexity(m, (3, 4, 4), backend=backend)
    parametrize.register_parametrization(m[3], "weight", Product(5, 96, 2))
    parametrize.register_parametrization(m[0], "weight", _Reshaped(6, 3, 3, 3, 2))
    c = complexity(m, (3, 4, 4), backend=backend)
    assert c.macs == dense.macs                        # product of factors not counted
    # stored parameters: factors + biases + the `original` tensors parametrize keeps
    factors = (5 * 2 + 2 * 96) + (6 * 2 + 2 * 27)
    assert c.params == dense.params + factors
    assert parametrize.is_parametrized(m[0])           # model left as it was
    if backend == "pytorch":
        assert set(c.per_module) >= {"0", "3"} and c.per_module["3"] == 96 * 5 + 5


class _Reshaped(nn.Module):
    def __init__(self, o, i, kh, kw, r):
        super().__init__()
        self.shape = (o, i, kh, kw)
        self.A = nn.Parameter(torch.randn(o, r))
        self.B = nn.Parameter(torch.randn(r, i * kh * kw))

    def forward(self, w):
        return torch.matmul(self.A, self.B).reshape(self.shape)


def test_modes_restored_hooks_not_leaked_and_nothing_printed(capsys):
    m = models.resnet20()
    m.train()
    m.layer1.eval()
    hooks = [(len(c._forward_hooks), len(c._forward_pre_hooks)) for c in m.children()]
    for backend in ("pytorch", "aten"):
        complexity(m, (3, 32, 32), backend=backend)
    assert m.training and not m.layer1.training and m.layer2.training
    assert not any(mod.training for mod in m.layer1.modules())
    assert hooks == [(len(c._forward_hooks), len(c._forward_pre_hooks)) for c in m.children()]
    assert not any(hasattr(mod, "__flops__") for mod in m.modules())
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_failed_forward_raises_without_printing(capsys):
    m = nn.Sequential(nn.Linear(4, 3))
    for backend in ("pytorch", "aten"):
        with pytest.raises(RuntimeError, match="input_size"):
            complexity(m, (5,), backend=backend)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_argument_validation():
    m = tiny_net()
    with pytest.raises(ValueError, match="backend"):
        complexity(m, (3, 5, 5), backend="fvcore")
    with pytest.raises(ValueError, match="input_size"):
        complexity(m, (3, 0, 5))
    with pytest.raises(ValueError, match="input_size"):
        complexity(m, ())
    with pytest.raises(TypeError, match="model"):
        complexity("resnet20", (3, 32, 32))
    with pytest.raises(TypeError, match="module_cls"):
        register_counter(int, lambda *a: 0)
    with pytest.raises(TypeError, match="macs_fn"):
        register_counter(Bilinear, 3)
    with pytest.raises(KeyError):
        unregister_counter(Bilinear)


def test_reduction():
    base = Complexity(macs=200, params=100, backend="aten", input_size=(1,))
    small = Complexity(macs=50, params=75, backend="aten", input_size=(1,))
    assert small.reduction(base) == {"macs": 75.0, "params": 25.0}
    with pytest.raises(ValueError, match="backend"):
        Complexity(macs=1, params=1, backend="pytorch", input_size=(1,)).reduction(base)


def test_zoo_counts_on_pytorch_backend_do_not_raise():
    for name, kw, size in [("densenet40", {}, (3, 32, 32)), ("fcn", {}, (64,)),
                           ("vit", {"num_layers": 2, "num_heads": 2, "hidden": 16,
                                    "mlp_dim": 16}, (3, 32, 32))]:
        m = models.get_model(name, **kw)
        c = complexity(m, size, backend="pytorch")
        assert c.macs > 0 and c.params == sum(p.numel() for p in m.parameters())


def test_latency_statistics_and_validation():
    m = tiny_net().train()
    r = latency(m, (3, 5, 5), batch=2, repeats=7, warmup=1)
    assert 0 < r.p10 <= r.median <= r.p90
    assert len(r.times) == 7 and r.device == "cpu" and r.batch == 2
    assert m.training
    assert set(r.as_dict()) >= {"median_ms", "p10_ms", "p90_ms"}
    for kw, word in [({"batch": 0}, "batch"), ({"repeats": 0}, "repeats"),
                     ({"warmup": -1}, "warmup"), ({"device": "nodevice"}, "device")]:
        with pytest.raises(ValueError, match=word):
            latency(m, (3, 5, 5), **kw)


def test_parametrized_unknown_module_is_named_in_error():
    m = nn.Sequential(nn.Linear(4, 4), Bilinear())
    parametrize.register_parametrization(m[1], "w", Product(4, 4, 2))
    with pytest.raises(ValueError, match="parametrized Bilinear"):
        complexity(m, (4,))
    with pytest.raises(TypeError, match="aten"):
        complexity(m, (4,), backend="aten", custom_hooks={Bilinear: lambda *a: 0})


def test_complexity_and_latency_unwrap_a_data_parallel_wrapper():
    from torch import nn

    import admm_compress as ac

    class Wrapper(nn.DataParallel):
        def forward(self, *a, **k):  # a DDP wrapper's forward would take part in collectives
            raise AssertionError("the wrapper's forward was called")

    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    wrapped = Wrapper(model)
    a, b = ac.complexity(model, (12,)), ac.complexity(wrapped, (12,))
    assert (a.macs, a.params) == (b.macs, b.params)
    assert a.params == 12 * 8 + 8 + 8 * 3 + 3
    assert ac.latency(wrapped, (12,), repeats=3, warmup=1).median > 0
