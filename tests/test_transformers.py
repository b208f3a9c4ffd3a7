"""Transformers through the whole life cycle: prepare -> fit -> finalize -> export -> same outputs.

nn.MultiheadAttention reads ``out_proj.weight`` and nn.TransformerEncoderLayer's inference fast
path reads ``linear1.weight`` / ``linear2.weight``; export replaces them by compact modules, so
the exported model must hold :mod:`admm_compress.attention`'s modules that *call* their
projections.  Each case compares the exported model with the finalized (projected) one.
"""
import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import admm_compress as ac
from admm_compress import attention, methods
from admm_compress.specs import resolve

torchvision = pytest.importorskip("torchvision")

E, H, FF, L, V, C = 32, 2, 64, 6, 50, 10
EPS = torch.finfo(torch.float32).eps


def _tol(ref: torch.Tensor, depth: int = 16, width: int = FF) -> float:
    """Float32 bound for two evaluation orders of the same function: each of ``depth`` products
    of inner size <= ``width`` may differ by ~``width * eps`` relative (U (V x) against (U V) x,
    fused against unfused attention), scaled by the output magnitude."""
    return depth * width * EPS * max(1.0, float(ref.detach().abs().max()))


# ---------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """nn.TransformerEncoder classifier on (N, L, E) float inputs."""

    def __init__(self, batch_first=True, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        y = self.enc(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


class BareAttention(nn.Module):
    """One nn.MultiheadAttention (called with need_weights=True, its default) and a head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


class TokenLM(nn.Module):
    """Embedding + TransformerEncoder + per-token head: integer token input."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(E, V)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)))


def tiny_vit():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=E, mlp_dim=FF, num_classes=C)
    # torchvision zero-initializes the head: outputs would be 0 whatever the encoder computes
    nn.init.normal_(vit.heads.head.weight, std=0.5)
    return vit


def _lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


MODELS = {  # name: (factory, input_size, kind, loss_fn)
    "vit": (tiny_vit, (3, 32, 32), "image", None),
    "encoder_batch_first": (lambda: Encoder(True), (L, E), "seq", None),
    "encoder_seq_first_prenorm": (lambda: Encoder(False, norm_first=True), (L, E), "seq", None),
    "mha": (BareAttention, (L, E), "seq", None),
    "token_lm": (TokenLM, (L,), "tokens", _lm_loss),
}


def _loader(kind, n=16, batch=8):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, C, (n,), generator=g)
    elif kind == "tokens":
        x, y = torch.randint(0, V, (n, L), generator=g), torch.randint(0, V, (n, L), generator=g)
    else:
        x, y = torch.randn(n, L, E, generator=g), torch.randint(0, C, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _count_kw(kind):
    return {"input_dtype": torch.long} if kind == "tokens" else {}


def _assert_same_outputs(ref, out, x):
    for mode in ("eval", "train"):  # every model here has dropout 0, so train mode is deterministic
        ref.train(mode == "train")
        out.train(mode == "train")
        with torch.no_grad():
            a, b = ref(x), out(x)
        assert a.abs().max() > 1e-3 and a.std() > 1e-4  # not a constant (the check would be vacuous)
        assert torch.allclose(a, b, rtol=0, atol=_tol(a)), (mode, float((a - b).abs().max()))
    ref.eval()
    out.eval()


def _assert_fused_modules_replaced(model):
    for name, m in model.named_modules():
        if type(m) is nn.MultiheadAttention:
            assert type(m.out_proj) in attention._STOCK_LINEAR, name
        if type(m) is nn.TransformerEncoderLayer:
            assert type(m.linear1) is nn.Linear and type(m.linear2) is nn.Linear, name


# ------------------------------------------------------------------------- compatibility matrix
SOLVERS = {
    "lowrank": lambda: ac.Solver(ac.Constrain(nn.Linear, ac.LowRank(ratio=0.25)), rho=1e-3),
    "sparse": lambda: ac.Solver(ac.Constrain(nn.Linear, ac.Cardinality(density=0.3)), rho=1e-3),
    "lrpet_linear": lambda: methods.lrpet(0.6, include_linear=True),
    "lorita": lambda: methods.lorita(rank_ratio=0.25),
    "decomposable_net": lambda: methods.decomposable_net(seed=0),
}
DN_RATIO = 0.5  # above the per-layer floors min(5, R_l) of these 32-wide models


@pytest.mark.parametrize("solver_name", list(SOLVERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_prepare_fit_export_matches_finalized(model_name, solver_name):
    make, input_size, kind, loss_fn = MODELS[model_name]
    model, solver = make(), SOLVERS[solver_name]()
    loader = _loader(kind)
    if solver_name == "lrpet_linear" and model_name != "vit":
        # lrpet's default targets are Conv2d (the paper's); a conv-free model is refused up front
        with pytest.raises(ac.specs.SpecError, match="lrpet:conv.*selects no layer"):
            solver.fit(model, loader, epochs=1, loss_fn=loss_fn, progress=False)
        return
    solver.fit(model, loader, epochs=1, loss_fn=loss_fn, progress=False)
    if solver_name == "decomposable_net":
        ranks = solver.select_ranks(model, DN_RATIO)
        ref, out = solver.truncate(model, ranks), solver.export(model, ranks=ranks)
    else:
        ref, out = model, ac.export(model, solver)
        assert torch.equal(torch.cat([p.flatten() for p in solver.export(model).parameters()]),
                           torch.cat([p.flatten() for p in out.parameters()]))
    _assert_fused_modules_replaced(out)
    x = loader[0][0]
    _assert_same_outputs(ref, out, x)
    for backend in ("pytorch", "aten"):
        dense = ac.complexity(ref, input_size, backend=backend, **_count_kw(kind)).macs
        small = ac.complexity(out, input_size, backend=backend, **_count_kw(kind)).macs
        if solver_name == "sparse" and backend == "aten":
            # a masked layer still runs its dense product, which is what ATen counts
            assert small <= dense, (backend, small, dense)
        else:
            assert small < dense, (backend, small, dense)


def test_vit_crash_of_the_issue_is_gone():
    """The reproduction of issue 13 item 2: Constrain(nn.Linear, LowRank) on a torchvision ViT."""
    model = tiny_vit()
    solver = ac.Solver(ac.Constrain(nn.Linear, ac.LowRank(rank=4)))
    solver.prepare(model)
    solver.finalize(model)
    out = ac.export(model, solver)
    kinds = {type(m) for m in out.modules()}
    assert attention.MultiheadAttention in kinds and nn.MultiheadAttention not in kinds
    assert isinstance(out.encoder.layers[0].self_attention.out_proj, nn.Sequential)
    _assert_same_outputs(model, out, torch.randn(2, 3, 32, 32))


def test_untouched_attention_keeps_the_stock_module():
    model = Encoder(True)
    out = ac.export(model, ac.Constrain("head", ac.LowRank(rank=2)))
    assert type(out.enc.layers[0]) is nn.TransformerEncoderLayer
    assert type(out.enc.layers[0].self_attn) is nn.MultiheadAttention


def test_structured_sparsity_on_attention_projections():
    model = Encoder(True)
    spec = [ac.Constrain("*.out_proj", ac.Cardinality(density=0.5, group_dim=0)),
            ac.Constrain("*.linear2", ac.Cardinality(density=0.5, group_dim=1))]
    solver = ac.Solver(spec)
    solver.prepare(model)
    solver.finalize(model)
    out = ac.export(model, solver)
    _assert_fused_modules_replaced(out)
    _assert_same_outputs(model, out, torch.randn(3, L, E))
    for backend in ("pytorch", "aten"):
        assert ac.complexity(out, (L, E), backend=backend).macs < ac.complexity(model, (L, E), backend=backend).macs


# ----------------------------------------------------------------------- module equivalence
@pytest.mark.parametrize("batch_first, bias, add_bias_kv, add_zero_attn, kdim",
                         list(itertools.product([True, False], [True, False], [False, True], [False, True],
                                                [None, 12]))[::3])
def test_converted_attention_equals_stock(batch_first, bias, add_bias_kv, add_zero_attn, kdim):
    stock = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                  kdim=kdim, vdim=kdim, batch_first=batch_first)
    ours = attention.MultiheadAttention.from_torch(copy.deepcopy(stock))
    n, s, kd = 3, 7, kdim or E
    q = torch.randn(n, L, E) if batch_first else torch.randn(L, n, E)
    k = torch.randn(n, s, kd) if batch_first else torch.randn(s, n, kd)
    v = torch.randn_like(k)
    kpm = torch.rand(n, s) < 0.3
    kpm[:, 0] = False  # no fully masked row (NaN in PyTorch's unfused path)
    bool_mask = torch.rand(L, s) < 0.3
    bool_mask[:, 0] = False
    calls = [{}, {"key_padding_mask": kpm}, {"attn_mask": bool_mask},
             {"attn_mask": torch.randn(n * H, L, s), "key_padding_mask": kpm.float() * -1e9},
             {"attn_mask": bool_mask, "need_weights": False}, {"average_attn_weights": False}]
    for mode, kw in itertools.product(("train", "eval"), calls):
        stock.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad():
            o1, w1 = stock(q, k, v, **kw)
            o2, w2 = ours(q, k, v, **kw)
        assert torch.allclose(o1, o2, rtol=0, atol=_tol(o1, depth=4)), (mode, kw.keys())
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            assert w1.shape == w2.shape and torch.allclose(w1, w2, rtol=0, atol=_tol(w1, depth=4))


def test_converted_attention_unbatched_and_causal():
    stock = nn.MultiheadAttention(E, H, batch_first=True)
    ours = attention.MultiheadAttention.from_torch(copy.deepcopy(stock))
    x = torch.randn(L, E)
    for a, b in zip(stock(x, x, x), ours(x, x, x)):
        assert torch.allclose(a, b, rtol=0, atol=_tol(a, depth=4))
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    xb = torch.randn(2, L, E)
    a = stock(xb, xb, xb, attn_mask=causal, is_causal=True, need_weights=False)[0]
    b = ours(xb, xb, xb, attn_mask=causal, is_causal=True, need_weights=False)[0]
    assert torch.allclose(a, b, rtol=0, atol=_tol(a, depth=4))
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(xb, xb, xb, is_causal=True)


def test_convert_encoder_with_padding_mask_eval_and_train():
    """Converted encoder = stock encoder at every non-padded position (the fused nested-tensor
    path zeroes padded positions; they are padding either way)."""
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), 2)
    ours = attention.convert(copy.deepcopy(stock))
    assert isinstance(ours.layers[0], attention.TransformerEncoderLayer)
    assert isinstance(ours.layers[0], nn.TransformerEncoderLayer)  # still a subclass
    assert ours.use_nested_tensor is False
    x = torch.randn(3, L, E)
    pad = torch.zeros(3, L, dtype=torch.bool)
    pad[0, -2:] = True
    for mode in ("eval", "train"):
        stock.train(mode == "train")
        ours.train(mode == "train")
        with torch.no_grad():
            a, b = stock(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
        keep = ~pad
        assert torch.allclose(a[keep], b[keep], rtol=0, atol=_tol(a)), mode


def test_convert_shared_module_replaced_at_every_name():
    mha = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": mha, "b": mha})
    attention.convert(model)
    assert model["a"] is model["b"] and isinstance(model["a"], attention.MultiheadAttention)


# ------------------------------------------------------------------- the fused in_proj_weight
def test_in_proj_weight_is_refused_with_the_fix():
    model = BareAttention()
    spec = ac.Constrain(nn.MultiheadAttention, ac.LowRank(rank=4), param="in_proj_weight", view="matrix")
    with pytest.raises(ac.SpecError, match=r"layer 'attn'.*in_proj_weight.*attention\.convert\(model\)"):
        ac.Solver(spec).prepare(model)  # refused at prepare, before any training
    b = resolve(spec, model, check_export=False)[0]
    msg = attention.check_binding(b.module, b.param_name, b.constraint, b.view, name=b.name)
    assert msg is not None
    for part in ("'attn'", "LowRank", "'matrix'", "in_proj_weight", "attention.convert(model)", "q_proj"):
        assert part in msg, part
    kv = nn.MultiheadAttention(E, H, add_bias_kv=True)
    msg = attention.check_binding(kv, "bias_k", ac.LowRank(rank=1), "identity", name="blk.attn")
    assert "'blk.attn'" in msg and "bias_k" in msg and "'identity'" in msg and "*_proj" in msg
    # projections that are real layers export fine: no refusal
    lin = resolve(ac.Constrain(nn.Linear, ac.LowRank(rank=4)), model)[0]
    assert attention.check_binding(lin.module, lin.param_name, lin.constraint, lin.view, name=lin.name) is None


def test_convert_before_training_compresses_q_k_v():
    """The fix the refusal names: convert first, then q/k/v are nn.Linear layers like any other."""
    model = attention.convert(Encoder(True))
    solver = ac.Solver(ac.Constrain("*_proj", ac.LowRank(ratio=0.25)), rho=1e-3)
    assert len(resolve(solver.spec, model)) == 8  # q, k, v, out in each of 2 layers
    loader = _loader("seq")
    solver.fit(model, loader, epochs=1, progress=False)
    out = ac.export(model, solver)
    assert isinstance(out.enc.layers[0].self_attn.q_proj, nn.Sequential)
    _assert_same_outputs(model, out, loader[0][0])
    for backend in ("pytorch", "aten"):
        assert ac.complexity(out, (L, E), backend=backend).macs < ac.complexity(model, (L, E), backend=backend).macs


def test_convert_validates_arguments():
    with pytest.raises(TypeError, match="model must be"):
        attention.convert("not a model")
    with pytest.raises(TypeError, match="only_changed"):
        attention.convert(nn.Linear(2, 2), only_changed=1)
    with pytest.raises(ValueError, match="divisible"):
        attention.MultiheadAttention(10, 3, nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10),
                                     nn.Linear(10, 10))


def test_convert_logs_what_it_replaced(caplog):
    with caplog.at_level(logging.INFO, logger="admm_compress.attention"):
        attention.convert(Encoder(True))
    assert "2 nn.MultiheadAttention and 2 nn.TransformerEncoderLayer" in caplog.text


def test_exported_vit_traces_with_fx_and_channels_are_removed_inside_the_mlp():
    """Converted attention traces (layout/mask logic in fx-wrapped helpers), so torch.fx tools
    and export's cross-layer channel removal still see the ViT's MLP blocks."""
    model = tiny_vit()
    spec = [ac.Constrain("*.mlp.3", ac.Cardinality(density=0.5, group_dim=1)),  # MLP fc2 inputs
            ac.Constrain("*.out_proj", ac.LowRank(rank=4))]
    solver = ac.Solver(spec)
    solver.prepare(model)
    solver.finalize(model)
    out = ac.export(model, solver)
    gm = torch.fx.symbolic_trace(out)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        assert ref.std() > 1e-3
        assert torch.allclose(gm(x), ref, rtol=0, atol=_tol(ref))
        assert torch.allclose(out(x), ref, rtol=0, atol=_tol(ref))
    # fc1 lost the rows fc2 no longer reads: fc2's IndexSelect is gone
    fc1 = out.encoder.layers[0].mlp[0]
    assert fc1.out_features == FF // 2


def test_lrpet_with_linear_targets_on_a_conv_free_model():
    """What the refusal in the matrix above leaves open: lrpet on the Linear layers only."""
    model = Encoder(True)
    solver = methods.lrpet(0.6, targets=nn.Linear)
    loader = _loader("seq")
    solver.fit(model, loader, epochs=1, progress=False)
    out = ac.export(model, solver)
    _assert_fused_modules_replaced(out)
    _assert_same_outputs(model, out, loader[0][0])
    for backend in ("pytorch", "aten"):
        assert ac.complexity(out, (L, E), backend=backend).macs < ac.complexity(model, (L, E), backend=backend).macs
