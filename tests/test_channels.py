"""Cross-layer channel removal after structured-sparsity export (admm_compress.channels).

Every removal must leave the function unchanged (eval mode), shrink the neighbour by exactly the
pruned channels, and be refused where it would not be exact (residual use, padded consumer of a
non-zero constant, a reshape in between)."""
import logging

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import admm_compress as ac
from _helpers import projected as _projected
from admm_compress.channels import remove_channels
from admm_compress.layers import IndexScatter, IndexSelect, SparseConv2d


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


def _markers(model):
    return sum(isinstance(m, (IndexSelect, IndexScatter)) for m in model.modules())


def _export_both(model, spec, x):
    model.eval()
    ref = _projected(model, spec).eval()
    keep = ac.export(model, spec, remove_channels=False).eval()
    cut = ac.export(model, spec).eval()
    with torch.no_grad():
        y = ref(x)
        torch.testing.assert_close(keep(x), y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cut(x), y, atol=1e-5, rtol=1e-4)
    return keep, cut


# ------------------------------------------------------------------ property: any chain, any pruning
ACTS = [nn.ReLU, nn.GELU, nn.Tanh, nn.Identity, nn.LeakyReLU]


def _PaddedAvg():
    return nn.AvgPool2d(3, stride=1, padding=1)  # count_include_pad: a constant is not kept at borders


POOLS = [nn.Identity, lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2), lambda: nn.AdaptiveAvgPool2d(3), _PaddedAvg]


@settings(max_examples=40, deadline=None)
@given(conv=st.booleans(), width=st.integers(2, 7), k=st.integers(1, 2), use_bn=st.booleans(),
       act=st.sampled_from(ACTS), which=st.sampled_from(["out", "in"]), bias=st.booleans(),
       pad=st.integers(0, 1), pool=st.sampled_from(POOLS), seed=st.integers(0, 2**16))
def test_removal_is_exact_and_shrinks_the_neighbour(conv, width, k, use_bn, act, which, bias, pad, pool, seed):
    torch.manual_seed(seed)
    if conv:
        first = nn.Conv2d(3, width, 3, padding=1, bias=bias)
        second = nn.Conv2d(width, 5, 3, padding=pad, bias=bias)
        bn = nn.BatchNorm2d(width) if use_bn else nn.Identity()
        x = torch.randn(2, 3, 6, 6)
    else:
        first = nn.Linear(4, width, bias=bias)
        second = nn.Linear(width, 5, bias=bias)
        bn = nn.BatchNorm1d(width) if use_bn else nn.Identity()
        x = torch.randn(3, 4)
        pool = nn.Identity
    model = _randomize_bn(nn.Sequential(first, bn, act(), pool(), second), seed)
    k = min(k, width - 1) if width > 1 else 1
    target = "0" if which == "out" else "4"
    spec = [ac.Constrain(target, ac.Cardinality(k=k, group_dim=0 if which == "out" else 1), view="identity")]
    keep, cut = _export_both(model, spec, x)
    params = lambda m: ac.complexity(m, tuple(x.shape[1:])).params  # noqa: E731
    layers = [m for m in cut.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if _markers(cut) == 0:
        # removed: both layers now carry exactly k channels between them
        assert layers[0].weight.shape[0] == k and layers[-1].weight.shape[1] == k
        if use_bn:
            assert cut[1].num_features == k
        assert params(cut) < params(keep)
    else:
        # only kept where exactness forbids it: non-zero constants into a padded convolution or
        # through an average pooling that counts its zero padding
        assert which == "out" and conv and (pad > 0 or pool is _PaddedAvg)


def test_input_channel_pruning_removes_producer_filters_and_bn_entries_in_train_mode_too():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 6, 3, padding=1)))
    spec = [ac.Constrain("3", ac.Cardinality(k=3, group_dim=1), view="identity")]
    ref = _projected(model, spec).train()
    cut = ac.export(model, spec).train()
    assert cut[0].out_channels == 3 and cut[1].num_features == 3 and cut[3][1].in_channels == 3
    x = torch.randn(4, 3, 5, 5)
    # per-channel batch statistics: deleting whole channels is exact with batch statistics as well
    torch.testing.assert_close(cut(x), ref(x), atol=1e-5, rtol=1e-4)
    kept = ref[3].weight.abs().sum((0, 2, 3)).ne(0)
    torch.testing.assert_close(cut[1].running_mean, ref[1].running_mean[kept])  # updated by the same batch
    torch.testing.assert_close(cut[0].weight, ref[0].weight[kept])


def test_counted_macs_and_params_of_an_mlp_are_exactly_the_kept_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    spec = [ac.Constrain("2", ac.Cardinality(k=8, group_dim=0), view="identity"),
            ac.Constrain("4", ac.Cardinality(k=20, group_dim=1), view="identity")]
    keep, cut = _export_both(model, spec, torch.randn(5, 64))
    assert _markers(cut) == 0
    ref = _projected(model, spec)
    kept = ref[2].weight.abs().sum(1).ne(0) & ref[4].weight.abs().sum(0).ne(0)   # filters made and read
    k = int(kept.sum())
    assert 0 < k <= 8 and cut[2][0].out_features == k and cut[4][1].in_features == k
    plain = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, k), nn.ReLU(), nn.Linear(k, 10))
    c, expected = ac.complexity(cut, (64,)), ac.complexity(plain, (64,))
    assert (c.macs, c.params) == (expected.macs, expected.params)
    assert c.macs < ac.complexity(keep, (64,)).macs


def test_filter_pruning_with_zero_constants_is_removed_even_before_a_padded_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    spec = [ac.Constrain("0", ac.Cardinality(k=2, group_dim=0), view="identity")]
    keep, cut = _export_both(model, spec, torch.randn(2, 3, 7, 7))
    assert _markers(keep) == 1 and _markers(cut) == 0
    assert cut[0][0].out_channels == 2 and cut[2].in_channels == 2


def test_non_zero_constants_into_a_padded_conv_are_kept_and_the_reason_logged(caplog):
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                                        nn.Conv2d(8, 4, 3, padding=1)))
    with torch.no_grad():
        model[1].bias.fill_(1.0)  # every pruned channel is a positive constant after BN + ReLU6
    spec = [ac.Constrain("0", ac.Cardinality(k=2, group_dim=0), view="identity")]
    with caplog.at_level(logging.INFO, logger="admm_compress.channels"):
        _, cut = _export_both(model, spec, torch.randn(2, 3, 7, 7))
    assert _markers(cut) == 1
    assert "consumer convolution pads" in caplog.text


def test_non_zero_constants_fold_into_an_unpadded_conv_and_a_linear():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Sigmoid(),
                                        nn.Conv2d(8, 4, 3, stride=2, bias=False)))
    spec = [ac.Constrain("0", ac.Cardinality(k=3, group_dim=0), view="identity")]
    _, cut = _export_both(model, spec, torch.randn(2, 3, 9, 9))
    assert _markers(cut) == 0 and cut[3].in_channels == 3 and cut[3].bias is not None
    mlp = nn.Sequential(nn.Linear(6, 9), nn.Sigmoid(), nn.Linear(9, 2))
    _, cut = _export_both(mlp, [ac.Constrain("0", ac.Cardinality(k=4, group_dim=0), view="identity")],
                          torch.randn(3, 6))
    assert _markers(cut) == 0 and cut[2].in_features == 4


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.conv2(y) + y  # conv1's output is read twice


class _Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = h * 1.0
        return self.b(h)


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 2)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.c(self.bn(self.b(torch.relu(self.bn(self.a(x))))))  # one BN normalizes two layers


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight  # tied

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("make,spec,x", [
    (lambda: _randomize_bn(_SharedBN()), [ac.Constrain("b", ac.Cardinality(k=3, group_dim=1), view="identity")],
     torch.randn(5, 4)),
    (_Tied, [ac.Constrain("b", ac.Cardinality(k=2, group_dim=1), view="identity")], torch.randn(3, 4)),
    (_Residual, [ac.Constrain("conv2", ac.Cardinality(k=2, group_dim=1), view="identity")], torch.randn(2, 4, 5, 5)),
    (_Flatten, [ac.Constrain("conv", ac.Cardinality(k=2, group_dim=0), view="identity")], torch.randn(2, 3, 4, 4)),
    (_Untraceable, [ac.Constrain("b", ac.Cardinality(k=2, group_dim=1), view="identity")], torch.randn(3, 4)),
], ids=["shared-bn", "tied", "residual", "flatten", "untraceable"])
def test_not_a_chain_stays_as_exported(make, spec, x):
    torch.manual_seed(0)
    keep, cut = _export_both(make(), spec, x)
    assert _markers(cut) == _markers(keep) == 1


def test_low_rank_and_sparse_neighbours_take_part():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    spec = [ac.Constrain("0", ac.LowRank(rank=2), view="channel"),      # producer: conv(3->2) -> 1x1 conv(2->16)
            ac.Constrain("2", ac.Cardinality(k=5, group_dim=1), view="identity"),
            ac.Constrain("4", ac.Cardinality(density=0.5), view="identity")]
    _, cut = _export_both(model, spec, torch.randn(2, 3, 6, 6))
    assert cut[0][1].out_channels == 5 and cut[2][1].in_channels == 5
    sparse = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    spec = [ac.Constrain("0", ac.Cardinality(density=0.5), view="identity"),
            ac.Constrain("2", ac.Cardinality(k=3, group_dim=1), view="identity")]
    _, cut = _export_both(sparse, spec, torch.randn(2, 3, 5, 5))
    assert isinstance(cut[0], SparseConv2d) and cut[0].mask.shape[0] == 3 and cut[0].out_channels == 3


def test_pruned_model_still_saves_traces_and_scripts():
    torch.manual_seed(0)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                        nn.Conv2d(8, 6, 3, padding=1))).eval()
    spec = [ac.Constrain("3", ac.Cardinality(k=3, group_dim=1), view="identity")]
    cut = ac.export(model, spec).eval()
    x = torch.randn(2, 3, 5, 5)
    twin = ac.export(model, spec).eval()
    twin.load_state_dict(cut.state_dict())
    torch.testing.assert_close(torch.fx.symbolic_trace(cut)(x), cut(x))
    torch.testing.assert_close(torch.jit.script(cut)(x), cut(x))
    torch.testing.assert_close(twin(x), cut(x))


def test_bad_input():
    with pytest.raises(TypeError, match=r"export: remove_channels must be a bool, got 'yes'"):
        ac.export(nn.Linear(2, 2), [], remove_channels="yes")
    with pytest.raises(TypeError, match=r"remove_channels: model must be a torch.nn.Module, got dict"):
        remove_channels({})
    assert remove_channels(nn.Linear(2, 2)) == 0


def test_admm_channels_solver_trains_feasible_and_exports_smaller_neighbours():
    """The benchmark entry: ADMM on input channels, then export removes the producers' filters."""
    from admm_compress.registry import load_solvers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    solver = load_solvers()["admm_channels"].build(None, density=0.5)
    solver.fit(model, loader, epochs=2, progress=False)
    w = model[3].weight.detach()
    assert int(w.abs().sum((0, 2, 3)).ne(0).sum()) == 4  # feasible: 4 of 8 input channels
    model.eval()
    cut = ac.export(model, solver.spec).eval()
    keep = ac.export(model, solver.spec, remove_channels=False).eval()
    torch.testing.assert_close(cut(x), model(x), atol=1e-5, rtol=1e-4)
    assert cut[0].out_channels == 4 and cut[1].num_features == 4  # the stem lost the unread filters
    assert ac.complexity(cut, (3, 6, 6)).macs < ac.complexity(keep, (3, 6, 6)).macs


# ------------------------------------------------------------------ property: whole random networks
LAYER_SPECS = ["dense", "filters", "inputs", "lowrank", "sparse"]


@settings(max_examples=30, deadline=None)
@given(conv=st.booleans(), depth=st.integers(2, 4), data=st.data(), seed=st.integers(0, 2**16))
def test_random_networks_with_mixed_constraints_keep_their_function(conv, depth, data, seed):
    """Every layer is both a consumer and a producer; chains are shrunk one after another with a
    re-trace in between.  The exported model must equal the projected dense one and never cost
    more than the export without channel removal."""
    torch.manual_seed(seed)
    widths = [3] + [data.draw(st.integers(3, 6)) for _ in range(depth - 1)] + [4]
    layers, spec = [], []
    for i in range(depth):
        a, b = widths[i], widths[i + 1]
        layers.append(nn.Conv2d(a, b, 3, padding=data.draw(st.integers(0, 1)), bias=data.draw(st.booleans()))
                      if conv else nn.Linear(a, b, bias=data.draw(st.booleans())))
        name = str(len(layers) - 1)
        kind = data.draw(st.sampled_from(LAYER_SPECS))
        if kind == "filters":
            spec.append(ac.Constrain(name, ac.Cardinality(k=max(1, b // 2), group_dim=0), view="identity"))
        elif kind == "inputs" and i > 0:
            spec.append(ac.Constrain(name, ac.Cardinality(k=max(1, a // 2), group_dim=1), view="identity"))
        elif kind == "lowrank":
            spec.append(ac.Constrain(name, ac.LowRank(rank=1), view="channel" if conv else "matrix"))
        elif kind == "sparse":
            spec.append(ac.Constrain(name, ac.Cardinality(density=0.5), view="identity"))
        if i < depth - 1:
            if data.draw(st.booleans()):
                layers.append(nn.BatchNorm2d(b) if conv else nn.BatchNorm1d(b))
            layers.append(data.draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity]))())
    assume(spec)
    model = _randomize_bn(nn.Sequential(*layers), seed)
    x = torch.randn(3, 3, 9, 9) if conv else torch.randn(5, 3)
    keep, cut = _export_both(model, spec, x)
    shape = tuple(x.shape[1:])
    assert ac.complexity(cut, shape).macs <= ac.complexity(keep, shape).macs
