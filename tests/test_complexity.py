"""complexity(): hand-computed MACs, flop_counter cross-check, zero-count errors,
parametrized layers, registry, no printing; latency()."""
import copy

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


# ------------------------------------------------------------------------------ attention
# Hand counts for self-attention on L tokens of width E with H heads (batch 1):
#   products  4 L E^2 (q, k, v, out projections) + 2 L^2 E (q k^T and A v over all heads)
#   biases    4 L E (one add per projection output; ptflops' aten backend counts them)
#   ptflops' nn.MultiheadAttention hook also adds L E (q scaling) + H L^2 (softmax)
def _mha_products(L, E):
    return 4 * L * E * E + 2 * L * L * E


class _SelfAttention(nn.Module):
    def __init__(self, E, H, batch_first, need_weights, masked):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.need_weights, self.masked = need_weights, masked

    def forward(self, x):
        mask = None
        if self.masked:  # a float mask makes PyTorch use baddbmm when weights are needed
            L = x.shape[1] if self.attn.batch_first else x.shape[0]
            mask = torch.zeros(L, L)
        return self.attn(x, x, x, need_weights=self.need_weights, attn_mask=mask)[0]


@pytest.mark.parametrize("batch_first, need_weights, masked",
                         [(True, True, False), (True, False, False), (False, True, True), (True, False, True)])
def test_multihead_attention_counts_in_eval_mode_both_backends(batch_first, need_weights, masked):
    """Eval mode takes PyTorch's fused MHA kernel, which ATen counters used to see as 0 MACs."""
    L, E, H = 5, 16, 2
    m = _SelfAttention(E, H, batch_first, need_weights, masked).eval()
    size = (L, E)  # counted input (1, L, E): L tokens if batch first, else 1 token in a batch of L
    L_tok, batch = (L, 1) if batch_first else (1, L)
    products = batch * _mha_products(L_tok, E)
    assert torch_macs(m, size) == products  # FlopCounterMode: FLOPs / 2 of every product
    assert complexity(m, size, backend="aten").macs == products + batch * 4 * L_tok * E
    assert complexity(m, size, backend="pytorch").macs == products + batch * (4 * L_tok * E + L_tok * E
                                                                              + H * L_tok * L_tok)


def test_transformer_encoder_counts_match_flop_counter_in_eval_mode():
    L, E, H, FF, depth = 6, 16, 2, 24, 2
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, batch_first=True), depth).eval()
    products = depth * (_mha_products(L, E) + 2 * L * E * FF)
    biases = depth * (4 * L * E + L * FF + L * E)
    assert torch_macs(enc, (L, E)) == products
    assert complexity(enc, (L, E), backend="aten").macs == products + biases
    pt = complexity(enc, (L, E), backend="pytorch")
    # + q scaling, softmax (ptflops MHA hook) + 2 LayerNorms (ptflops: 2 per element, affine)...
    # ... minus nothing: cross-check the attention part through per_module
    attn = sum(v for k, v in pt.per_module.items() if k.endswith("self_attn"))
    assert attn == depth * (_mha_products(L, E) + 4 * L * E + L * E + H * L * L)
    assert enc.training is False


def test_converted_attention_counts_as_the_stock_module():
    from admm_compress import attention

    L, E, H, FF = 6, 16, 2, 24
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, batch_first=True), 2,
                                  enable_nested_tensor=False)
    ours = attention.convert(copy.deepcopy(stock))
    for backend in ("pytorch", "aten"):
        assert complexity(ours, (L, E), backend=backend).macs == complexity(stock, (L, E), backend=backend).macs
    assert torch_macs(ours, (L, E)) == torch_macs(stock, (L, E))
    for need_weights, masked in ((True, False), (True, True)):  # the explicit-weights path too
        stock = _SelfAttention(E, H, True, need_weights, masked)
        ours = attention.convert(copy.deepcopy(stock))
        assert isinstance(ours.attn, attention.MultiheadAttention)
        for backend in ("pytorch", "aten"):
            assert complexity(ours, (L, E), backend=backend).macs == complexity(stock, (L, E), backend=backend).macs


def test_stock_vit_needs_no_allow_zero_and_aten_equals_flop_counter_plus_biases():
    tv = pytest.importorskip("torchvision")
    E, FF, C, P, depth = 16, 24, 10, 8, 2
    vit = tv.models.VisionTransformer(image_size=32, patch_size=P, num_layers=depth, num_heads=2,
                                      hidden_dim=E, mlp_dim=FF, num_classes=C)
    T = (32 // P) ** 2 + 1  # patches + class token
    c = complexity(vit, (3, 32, 32), backend="pytorch")  # class_token / pos_embedding: no error
    assert c.params == sum(p.numel() for p in vit.parameters())
    biases = (T - 1) * E + depth * (4 * T * E + T * FF + T * E) + C
    assert complexity(vit, (3, 32, 32), backend="aten").macs == torch_macs(vit, (3, 32, 32)) + biases


class _AddParam(nn.Module):
    """Owns a parameter that is only added (like a position embedding): costs 0 MACs."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4))
        self.scale = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x + self.pos


def test_zero_mac_check_flags_multiplied_parameters_only():
    m = nn.Sequential(nn.Linear(4, 4), _AddParam())
    assert complexity(m, (4,)).macs == 16 + 4
    m[1].forward = lambda x: (x + m[1].pos) @ m[1].scale  # now a parameter is multiplied
    with pytest.raises(ValueError, match=r"'1' \(_AddParam\) multiplies parameters of its own \(scale"):
        complexity(m, (4,))


class _TokenModel(nn.Module):
    def __init__(self, V=20, E=8):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.head = nn.Linear(E, 3)

    def forward(self, tokens, scale=None):
        y = self.head(self.emb(tokens)).mean(1)
        return y if scale is None else y * scale


def test_token_input_models_are_measurable():
    m = _TokenModel()
    L = 7
    expect = {"aten": L * 8 * 3 + L * 3, "pytorch": L * 8 * 3 + L * 3}
    for backend in ("pytorch", "aten"):
        a = complexity(m, (L,), backend=backend, input_dtype=torch.long)
        b = complexity(m, (L,), backend=backend, input_constructor=lambda s: torch.randint(0, 20, s))
        c = complexity(m, (L,), backend=backend,
                       input_constructor=lambda s: (torch.zeros(s, dtype=torch.long), torch.ones(())))
        d = complexity(m, (L,), backend=backend,
                       input_constructor=lambda s: {"tokens": torch.zeros(s, dtype=torch.long)})
        assert a.macs == b.macs == d.macs == expect[backend], backend
        assert c.macs >= a.macs  # the extra `* scale` is an element-wise op (0 for aten)
    assert torch_macs(m, (L,), input_dtype=torch.long) == L * 8 * 3
    r = latency(m, (L,), batch=2, repeats=2, warmup=0, input_dtype=torch.long)
    assert r.median > 0
    r = latency(m, (L,), batch=2, repeats=2, warmup=0, input_constructor=lambda s: {"tokens": torch.zeros(s, dtype=torch.long)})
    assert r.batch == 2
    with pytest.raises(RuntimeError, match="ptflops"):  # a float input into an Embedding fails clearly
        complexity(m, (L,))


def test_tied_embedding_and_head_count_once_without_error():
    m = _TokenModel(V=20, E=8)
    m.head = nn.Linear(8, 20, bias=False)
    m.head.weight = m.emb.weight  # weight tying: the table is multiplied by the (counted) head
    L = 5
    for backend in ("pytorch", "aten"):
        assert complexity(m, (L,), backend=backend, input_dtype=torch.long).macs == L * 8 * 20


def test_input_options_validation():
    m = _TokenModel()
    with pytest.raises(TypeError, match="input_dtype"):
        complexity(m, (3,), input_dtype="long")
    with pytest.raises(TypeError, match="input_constructor"):
        complexity(m, (3,), input_constructor=5)
    with pytest.raises(ValueError, match="not both"):
        latency(m, (3,), input_dtype=torch.long, input_constructor=lambda s: torch.zeros(s))
    with pytest.raises(TypeError, match=r"input_constructor\(1, 3\).*item 1 is a str"):
        complexity(m, (3,), input_constructor=lambda s: (torch.zeros(s, dtype=torch.long), "x"))
