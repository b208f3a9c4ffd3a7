"""Deployment: sparse layers' CSR kernel equals the dense one, ``select_kernels`` picks by its own
measurements, and every kind of exported model goes through ``torch.export`` and TorchScript."""
import copy
import math
import sys

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress.deploy import InputChannelView
from admm_compress.layers import SparseConv1d, SparseConv2d, SparseLinear
from admm_compress.views import TTView


def _sparse(layer, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        layer.mask.copy_((torch.rand(layer.weight.shape, generator=g) < density).to(layer.mask.dtype))
        layer.weight.mul_(layer.mask)
    return layer


def _both_kernels(layer, x):
    with torch.no_grad():
        layer.kernel = "dense"
        dense = layer(x)
        layer.kernel = "csr"
        csr = layer(x)
    layer.kernel = "dense"
    return dense, csr


# float64: both kernels sum the same products in different orders; the difference is a few
# ulps of the sum of |products| (~1e-15 relative), so 1e-12 absolute on O(1) outputs is ample
CASES_CSR = [
    (lambda: SparseLinear(20, 7).double(), (3, 20)),
    (lambda: SparseLinear(20, 7, bias=False).double(), (20,)),
    (lambda: SparseLinear(20, 7).double(), (2, 5, 20)),
    (lambda: SparseConv2d(4, 6, 3, padding=1).double(), (2, 4, 9, 9)),
    (lambda: SparseConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double(), (2, 4, 11, 9)),
    (lambda: SparseConv2d(4, 6, 1, bias=False).double(), (1, 4, 5, 5)),
    (lambda: SparseConv2d(4, 6, 3).double(), (4, 7, 7)),
    (lambda: SparseConv1d(4, 6, 3, padding=2, dilation=2, stride=2).double(), (3, 4, 13)),
]


@pytest.mark.parametrize("make, shape", CASES_CSR)
def test_csr_kernel_equals_dense_kernel(make, shape):
    layer = _sparse(make())
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense, csr = _both_kernels(layer, x)
    ref = layer._conv_forward(x, layer.weight * layer.mask, layer.bias) if hasattr(layer, "_conv_forward") \
        else nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
    assert csr.shape == dense.shape == ref.shape
    torch.testing.assert_close(dense, ref, rtol=0, atol=0)
    torch.testing.assert_close(csr, ref, rtol=0, atol=1e-12)


def test_csr_cache_follows_weight_changes_and_training_uses_masked_dense():
    layer = _sparse(SparseLinear(10, 4).double())
    layer.kernel = "csr"
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        y0 = layer(x)
        layer.weight.mul_(2.0)  # in-place: new version, the cached CSR copy must be rebuilt
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (y0 - layer.bias), rtol=0, atol=1e-12)
    # autograd on: the dense masked path, no gradient off the support
    layer(x).sum().backward()
    assert bool((layer.weight.grad[layer.mask == 0] == 0).all())
    assert bool((layer.weight.grad[layer.mask != 0] != 0).any())


def test_nonzero_weight_off_the_support_is_still_masked_in_inference():
    layer = _sparse(SparseLinear(10, 4).double())
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[layer.mask == 0] = 5.0  # breaks the "zero off the support" invariant
        ref = nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
        for k in ("dense", "csr"):
            layer.kernel = k
            torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_select_kernels_follows_its_measurements_and_keeps_outputs():
    torch.manual_seed(0)
    model = Small().train()
    spec = [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=0.2), view="identity")]
    compact = ac.export(model, spec)  # in train mode: select_kernels must restore it
    x = torch.randn(2, 3, 8, 8)
    compact.eval()
    with torch.no_grad():
        ref = compact(x)
    compact.train()
    ac.deploy.clear_kernel_cache()
    rep = ac.select_kernels(compact, x, repeats=3, warmup=0, margin=0.1)
    assert compact.training and all(m.training for m in compact.modules())
    assert [r["name"] for r in rep] == ["conv1", "conv2", "fc"]
    for r in rep:
        layer = compact.get_submodule(r["name"])
        assert layer.kernel == r["kernel"]
        if r["name"] == "conv2":  # grouped: no CSR path
            assert r["kernel"] == "dense" and r["csr_ms"] is None and "grouped" in r["reason"]
        else:
            assert r["kernel"] == ("csr" if r["csr_ms"] < 0.9 * r["dense_ms"] else "dense")
            assert f"kernel={r['kernel']}" in repr(layer)
    assert rep[0]["input_shape"] == (2, 3, 8, 8) and rep[2]["input_shape"] == (2, 32)
    compact.eval()
    for m in compact.modules():  # force CSR wherever it applies: outputs unchanged
        if isinstance(m, SparseLinear) or (isinstance(m, SparseConv2d) and m.groups == 1):
            m.kernel = "csr"
    with torch.no_grad():
        # float32, summation order only: |error| <~ fan-in * eps * |terms|, far below 1e-5 here
        torch.testing.assert_close(compact(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
                                       ({"margin": 1.0}, "margin"), ({"repeats": 2.5}, "repeats"),
                                       ({"timer": "gpu"}, "timer")])
def test_select_kernels_bad_input(kw, match):
    model = ac.export(Small(), [ac.Constrain(nn.Linear, ac.Cardinality(density=0.5))])
    with pytest.raises(ValueError, match=match):
        ac.select_kernels(model, torch.randn(1, 3, 8, 8), **kw)
    with pytest.raises(ValueError, match="example input"):
        ac.select_kernels(model)
    with pytest.raises(TypeError, match="nn.Module"):
        ac.select_kernels({}, torch.randn(1))


# ------------------------------------------------------------ torch.export / TorchScript
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


EXPORTS = {
    "lowrank": [ac.Constrain("conv2", ac.LowRank(rank=4), view="channel"),
                ac.Constrain(nn.Linear, ac.LowRank(rank=3))],
    "spatial": [ac.Constrain("conv2", ac.LowRank(rank=4), view="spatial")],
    "sparse": [ac.Constrain((nn.Conv2d, nn.Linear), ac.Cardinality(density=0.2), view="identity")],
    "channels": [ac.Constrain("conv1", ac.Cardinality(density=0.5, group_dim=0), view="identity")],
    "in-channels": [ac.Constrain("conv2", ac.Cardinality(density=0.5, group_dim=1), view="identity")],
    "sum": [ac.Constrain("conv2", ac.Sum(ac.LowRank(rank=2), ac.Cardinality(density=0.05)))],
    "tt": [ac.Constrain("conv2", ac.TTRank((2, 2)), view=TTView((4, 4), (4, 4)))],
    "input_channel": [ac.Constrain("conv2", ac.LowRank(rank=4), view=InputChannelView())],
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_exported_model_torch_export_and_script(name):
    torch.manual_seed(0)
    compact = ac.export(ConvNet().eval(), EXPORTS[name]).eval()
    for m in compact.modules():  # eager CSR must not leak into the traced graphs
        if hasattr(m, "kernel"):
            m.kernel = "csr"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = compact(x)
    prog = torch.export.export(compact, (x,))
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref2 = compact(x2)
        # same ops, possibly other kernels (eager CSR vs the graph's dense op): float32 rounding only
        torch.testing.assert_close(prog.module()(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prog.module()(x2), ref2, rtol=1e-5, atol=1e-5)
    graph = str(prog.graph)
    assert "sparse" not in graph and "to_sparse" not in graph
    buf = copy.deepcopy(compact)  # the derived CSR cache does not break deepcopy
    with torch.no_grad():
        torch.testing.assert_close(buf(x), ref, rtol=0, atol=0)
    scripted = torch.jit.script(compact)  # every kind, TTConv2d included (scriptable since issue 15)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ latency-aware export
def _projected(model, spec):
    from _helpers import projected

    return projected(model, spec)


LA_SPEC = [ac.Constrain("conv2", ac.LowRank(rank=4), view="channel"),
           ac.Constrain(nn.Linear, ac.Cardinality(density=0.3), view="identity")]


def test_keep_faster_swaps_exactly_the_layers_measured_slower(monkeypatch):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    # decision logic under controlled timings: the low-rank pair "measures" slower than dense; the
    # sparse fc is settled by select_kernels (never timed against nn.Linear: same op on its dense kernel)
    fake = {nn.Sequential: (2.0, 1.0)}
    monkeypatch.setattr(ac.deploy, "_time_pair", lambda cm, dm, x, *a: fake[type(cm)])
    compact = ac.export(model, LA_SPEC).eval()
    rep = ac.deploy.keep_faster(compact, model, LA_SPEC, x, repeats=3, warmup=0)
    by = {r["name"]: r for r in rep}
    assert by["conv2"]["kept"] == "dense" and type(compact.conv2) is nn.Conv2d
    assert by["fc"]["kept"] == "compact" and isinstance(compact.fc, SparseLinear) and "kernel" in by["fc"]["reason"]
    ref = _projected(model, LA_SPEC).eval()
    # the dense conv2 holds the rank-4 weight itself: still feasible, same outputs
    assert torch.linalg.matrix_rank(compact.conv2.weight.detach().reshape(16, -1)) <= 4
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref(x), rtol=1e-4, atol=1e-5)
    dense_macs = ac.complexity(ref, (3, 8, 8)).macs
    assert ac.complexity(compact, (3, 8, 8)).macs < dense_macs  # the sparse fc still counts its nnz


def test_export_latency_aware_keeps_outputs_and_leaves_removed_channels_alone():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = LA_SPEC + [ac.Constrain("conv1", ac.Cardinality(density=0.5, group_dim=0), view="identity")]
    compact = ac.export(model, spec, latency_aware=True, example_inputs=x).eval()
    ref = _projected(model, spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref(x), rtol=1e-4, atol=1e-5)
    rep = ac.deploy.keep_faster(compact, model, spec, x, repeats=3, warmup=0)
    by = {r["name"]: r for r in rep}
    assert set(by) == {"conv1", "conv2", "fc"}
    for name in ("conv1", "conv2"):  # conv1 lost filters, conv2 the inputs behind them
        assert by[name]["kept"] == "compact" and "differs" in by[name]["reason"]


@pytest.mark.parametrize("kw, err, match", [
    ({"latency_aware": True}, ValueError, "example_inputs"),
    ({"latency_aware": True, "example_inputs": torch.randn(1, 3, 8, 8), "inplace": True}, ValueError, "inplace"),
    ({"latency_aware": "yes", "example_inputs": torch.randn(1, 3, 8, 8)}, TypeError, "latency_aware must be a bool"),
])
def test_export_latency_aware_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        ac.export(ConvNet().eval(), LA_SPEC, **kw)


def test_onnx_runtime_runs_sparse_and_lowrank_exports_with_eager_outputs(tmp_path):
    """Even with the eager CSR kernel selected, the ONNX graph holds the dense ops and ORT
    reproduces eager outputs (float32, other kernels: rtol/atol 1e-4 on O(1) outputs)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for name in ("sparse", "lowrank", "sum"):
        compact = ac.export(ConvNet().eval(), EXPORTS[name]).eval()
        for m in compact.modules():
            if hasattr(m, "kernel"):
                m.kernel = "csr"
        path = str(tmp_path / f"{name}.onnx")
        with torch.no_grad():
            ref = compact(x)
            torch.onnx.export(compact, (x,), path, dynamo=False, input_names=["x"])
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("name", list(EXPORTS))
def test_onnx_session_and_ort_latency_on_every_export_kind(name, monkeypatch):
    """deploy.onnx_session runs each kind of exported model in ORT with eager's outputs (dynamic
    batch); ort_latency times it after the same check and raises when the outputs differ."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from admm_compress import deploy

    torch.manual_seed(0)
    compact = ac.export(ConvNet().eval(), EXPORTS[name]).eval()
    run = deploy.onnx_session(compact, torch.randn(1, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = compact(x)
    torch.testing.assert_close(torch.from_numpy(run(x.numpy())), ref, rtol=1e-4, atol=1e-4)
    r = deploy.ort_latency(compact, (3, 8, 8), batch=2, repeats=2, warmup=0, rtol=1e-4, atol=1e-4)
    assert r["median_ms"] > 0 and r["max_rel_diff"] < 1e-4 and r["batch"] == 2
    if name == "lowrank":
        real = deploy.onnx_session
        home = sys.modules[deploy.ort_latency.__module__]  # where ort_latency looks onnx_session up
        monkeypatch.setattr(home, "onnx_session", lambda *a, **k: (lambda arr, f=real(*a, **k): f(arr) + 1e-2))
        with pytest.raises(AssertionError):
            deploy.ort_latency(compact, (3, 8, 8), batch=2, repeats=2, warmup=0, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="repeats"):
            deploy.ort_latency(compact, (3, 8, 8), repeats=0)

def test_onnx_session_writes_the_asked_opset(tmp_path):
    """``opset`` reaches the file (engines with an older ONNX, e.g. DeepSparse 1.8, need <= 19) and the
    session still reproduces eager (float32, other kernels: rtol/atol 1e-4 on O(1) outputs); a bad
    opset is refused before any export."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from admm_compress import deploy

    torch.manual_seed(0)
    compact = ac.export(ConvNet().eval(), EXPORTS["sum"]).eval()
    path = str(tmp_path / "m.onnx")
    run = deploy.onnx_session(compact, torch.randn(1, 3, 8, 8), path, opset=17)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = compact(x)
    torch.testing.assert_close(torch.from_numpy(run(x.numpy())), ref, rtol=1e-4, atol=1e-4)
    for bad in (6, 17.0, True, "17"):
        with pytest.raises(ValueError, match="opset"):
            deploy.onnx_session(compact, torch.randn(1, 3, 8, 8), str(tmp_path / "bad.onnx"), opset=bad)
    assert not (tmp_path / "bad.onnx").exists()


def test_csr_unavailable_for_a_dtype_falls_back_to_dense():
    layer = _sparse(SparseLinear(16, 8)).to(torch.float16)
    rep = ac.select_kernels(nn.Sequential(layer), torch.randn(2, 16, dtype=torch.float16), repeats=3, warmup=0)
    assert rep[0]["kernel"] in ("dense", "csr")
    if rep[0]["csr_ms"] is None:  # this build has no half CSR matmul on CPU
        assert "CSR kernel unavailable" in rep[0]["reason"] and layer.kernel == "dense"



# ------------------------------------------------------------------ input-channel low-rank split
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3), (6, 4, 3, 2), (5, 4, 3, 2, 2)])
def test_input_channel_view_round_trip(shape):
    v = InputChannelView()
    w = torch.randn(*shape)
    t = v.to(w)
    assert tuple(t.shape) == v.viewed_shape(shape) == (shape[0] * math.prod(shape[2:]), shape[1])
    assert torch.equal(v.back(t, shape), w)
    # row (o, *k), column i: the entry W[o, i, *k]
    idx = (shape[0] - 1, shape[1] - 2, *[d - 1 for d in shape[2:]])
    assert t[-1, shape[1] - 2] == w[idx]
    with pytest.raises(ValueError, match="input_channel"):
        v.check((7,))


class _Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True), (8, 9, 9)),
    (nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="circular", bias=False), (8, 7, 7)),
    (nn.Conv2d(8, 8, (3, 5), padding="same", padding_mode="reflect"), (8, 7, 9)),
    (nn.Conv1d(6, 10, 5, padding=2, padding_mode="replicate"), (6, 11)),
    (nn.Linear(12, 10), (12,)),
])
def test_input_channel_export_is_1x1_then_k_conv_with_the_projected_outputs(conv, size):
    torch.manual_seed(0)
    model = _Net(conv).eval()
    r = 3
    spec = [ac.Constrain("conv", ac.LowRank(rank=r), view=InputChannelView())]
    ac.Solver(spec).prepare(model).finalize(model)
    compact = ac.export(model, spec).eval()
    first, second = compact.conv
    W = conv.weight
    if isinstance(conv, nn.Linear):
        assert (first.in_features, first.out_features, second.out_features) == (12, r, 10)
    else:
        assert first.kernel_size == (1,) * (W.dim() - 2) and first.out_channels == r and first.bias is None
        assert second.kernel_size == conv.kernel_size and second.in_channels == r
        assert (second.stride, second.padding, second.dilation, second.padding_mode) == (
            conv.stride, conv.padding, conv.dilation, conv.padding_mode)
        assert (second.bias is None) == (conv.bias is None)
    # r (I + O prod(k)) weights: the same count as the channel split for a square layer
    assert sum(p.numel() for p in first.parameters()) + second.weight.numel() == r * (W.shape[1] + W.numel() // W.shape[1])
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)  # model = the projected weight
    assert torch.linalg.matrix_rank(InputChannelView().to(model.conv.weight.detach())) == r


class _MyConv(nn.Conv2d):
    """A user's conv subclass (same forward): prepare accepts it, so export must too."""


@pytest.mark.parametrize("view", [InputChannelView(), "channel"])
def test_lowrank_export_of_a_conv_subclass_equals_the_projected_model(view):
    torch.manual_seed(0)
    model = _Net(_MyConv(6, 8, 3, padding=1)).eval().double()
    spec = [ac.Constrain("conv", ac.LowRank(rank=2), view=view)]
    ac.Solver(spec).prepare(model).finalize(model)
    compact = ac.export(model, spec).eval()
    assert isinstance(compact.conv, nn.Sequential) and type(compact.conv[1]) is nn.Conv2d
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():  # float64: the two-conv form and the rank-2 weight agree to rounding
        torch.testing.assert_close(compact(x), model(x), rtol=1e-10, atol=1e-10)
