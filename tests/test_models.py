"""Model zoo: shapes, names, shortcut options, registry, and MACs / params vs REFERENCE.md."""
import pytest
import torch
from torch import nn

from admm_compress import models
from admm_compress.complexity import complexity

CIFAR = (3, 32, 32)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- REFERENCE.md
# (name, kwargs, backend, target MACs, target params) — REFERENCE.md "Baseline architectures"
REFERENCE = [
    ("resnet20", {"shortcut": "A"}, "aten", 40.55e6, 0.270e6),
    ("resnet20", {"shortcut": "B"}, "aten", 40.81e6, 0.272e6),
    ("resnet56", {"shortcut": "A"}, "aten", 125.49e6, 0.853e6),
    ("resnet110", {"shortcut": "A"}, "aten", 252.89e6, 1.728e6),
    ("vgg16", {}, "pytorch", 314.6e6, 14.73e6),
]


@pytest.mark.parametrize("name,kwargs,backend,macs,params", REFERENCE,
                         ids=[f"{r[0]}-{r[1].get('shortcut', '')}-{r[2]}" for r in REFERENCE])
def test_zoo_matches_reference(name, kwargs, backend, macs, params):
    c = complexity(models.get_model(name, **kwargs), CIFAR, backend=backend)
    assert abs(c.macs - macs) / macs < 0.005, (name, backend, c.macs)
    assert abs(c.params - params) / params < 0.005, (name, backend, c.params)


# --------------------------------------------------------------------------- forward shapes
@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet20", {}, CIFAR),
    ("resnet20", {"shortcut": "B", "num_classes": 7}, CIFAR),
    ("resnet32", {"in_channels": 1}, (1, 32, 32)),
    ("vgg16", {"num_classes": 100}, CIFAR),
    ("vgg15", {}, CIFAR),
    ("densenet40", {"num_classes": 5}, CIFAR),
    ("densenet", {"depth": 10, "growth_rate": 4, "reduction": 0.5}, CIFAR),
    ("fcn", {"depth": 3, "width": 16, "in_features": 64}, (64,)),
    ("fcn", {"depth": 3, "width": 16, "in_features": 64}, (1, 8, 8)),
    ("vit", {"num_layers": 2, "num_heads": 4, "hidden": 32, "mlp_dim": 64}, CIFAR),
    ("vit", {"num_layers": 1, "num_heads": 2, "hidden": 16, "mlp_dim": 16, "image_size": 8,
             "patch_size": 2, "in_channels": 1, "num_classes": 3}, (1, 8, 8)),
])
def test_forward_shape_and_backward(name, kwargs, shape):
    torch.manual_seed(0)
    m = models.DenseNet(**kwargs) if name == "densenet" else models.get_model(name, **kwargs)
    x = torch.randn(2, *shape)
    big = name in ("densenet40", "vgg16", "vgg15")      # slow backward on CPU: forward only
    with torch.set_grad_enabled(not big):
        y = m(x)
    k = kwargs.get("num_classes", 10)
    assert y.shape == (2, k)
    assert torch.isfinite(y).all()
    if not big:
        y.sum().backward()
        assert all(p.grad is not None for p in m.parameters())


def test_registry_and_unknown_name_lists_valid_ones():
    assert set(models.MODELS) >= {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                  "vgg16", "densenet40", "fcn", "vit"}
    with pytest.raises(ValueError) as e:
        models.get_model("resnet21")
    for name in models.MODELS:
        assert name in str(e.value)
    assert isinstance(models.get_model("resnet20"), models.CifarResNet)


# --------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_resnet_depth_counts_weight_layers(depth):
    m = getattr(models, f"resnet{depth}")()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert len(convs) + len(linears) == depth       # option A: no shortcut convolutions
    assert m.depth == depth


def test_resnet_module_names_for_specs():
    names = dict(models.resnet20().named_modules())
    for n in ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer2.0.bn2",
              "layer3.2.conv2", "layer2.0.shortcut", "fc"]:
        assert n in names, n
    assert isinstance(names["fc"], nn.Linear)


def test_option_a_shortcut_has_no_parameters_and_option_b_has_conv_bn():
    a, b = models.resnet20(shortcut="A"), models.resnet20(shortcut="B")
    sc_a = [m for n, m in a.named_modules() if n.endswith("shortcut")]
    sc_b = [m for n, m in b.named_modules() if n.endswith("shortcut")]
    assert all(n_params(m) == 0 for m in sc_a)
    down_b = [m for m in sc_b if n_params(m) > 0]
    assert len(down_b) == 2                          # layer2.0 and layer3.0
    # by definition: 1x1 conv (in * out weights) + BN (2 * out)
    expected = sum(cin * cout + 2 * cout for cin, cout in [(16, 32), (32, 64)])
    assert sum(n_params(m) for m in down_b) == expected
    assert n_params(b) - n_params(a) == expected


def test_shortcut_a_is_subsample_and_zero_pad():
    sc = models.ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="shortcut"):
        models.resnet20(shortcut="C")
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet20(num_classes=0)
    with pytest.raises(ValueError, match="num_heads"):
        models.vit(hidden=32, num_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        models.vit(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="depth"):
        models.fcn(depth=0)
    with pytest.raises(TypeError, match="width"):
        models.fcn(width=9.5)


# --------------------------------------------------------------------------- others
def test_vgg16_layers():
    m = models.vgg16()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 13
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 512
    m15 = models.vgg15()
    assert sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m15.modules()) == 15


def test_densenet40_weight_shapes_match_raspa_table10():
    m = models.densenet40()
    names = dict(m.named_modules())
    assert names["dense1.0.conv1"].weight.shape == (12, 24, 3, 3)
    assert names["dense1.11.conv1"].weight.shape == (12, 156, 3, 3)
    assert names["dense2.0.conv1"].weight.shape == (12, 168, 3, 3)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) + 1 == 40                     # 36 dense + 2 transition + stem + fc
    assert m.fc.in_features == 24 + 36 * 12


def test_fcn_structure():
    m = models.fcn(depth=8, width=96, in_features=64, num_classes=10)
    assert len(m.layers) == 8 and all(isinstance(layer, nn.Linear) for layer in m.layers)
    assert m.layers[0].weight.shape == (96, 64)
    assert all(layer.weight.shape == (96, 96) for layer in m.layers[1:-1])
    assert m.layers[-1].weight.shape == (10, 96)
    # definition: alternating linear / ReLU
    x = torch.randn(3, 64)
    h = x
    for layer in m.layers[:-1]:
        h = torch.relu(layer(h))
    torch.testing.assert_close(m(x), m.layers[-1](h))


def test_vit_attention_projections_are_named_linears():
    m = models.vit(num_layers=2, num_heads=4, hidden=32, mlp_dim=64)
    names = dict(m.named_modules())
    for i in range(2):
        for p in ("q", "k", "v", "out"):
            assert isinstance(names[f"blocks.{i}.attn.{p}"], nn.Linear)
    assert not any(isinstance(mod, nn.MultiheadAttention) for mod in m.modules())


def test_vit_attention_matches_torch_reference():
    """Our q/k/v/out attention equals F.scaled_dot_product_attention on the same projections."""
    torch.manual_seed(0)
    att = models.vit(num_layers=1, num_heads=4, hidden=32, mlp_dim=8).blocks[0].attn
    x = torch.randn(2, 5, 32)
    heads = lambda t: t.reshape(2, 5, 4, 8).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(heads(att.q(x)), heads(att.k(x)),
                                                           heads(att.v(x)))
    ref = att.out(ref.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(att(x), ref)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet20", {}, CIFAR), ("fcn", {"depth": 3}, (64,)),
    ("vit", {"num_layers": 1, "num_heads": 2, "hidden": 16, "mlp_dim": 16}, CIFAR),
    ("densenet", {"depth": 10}, CIFAR)])
def test_fx_traceable(name, kwargs, shape):
    m = (models.DenseNet(**kwargs) if name == "densenet" else models.get_model(name, **kwargs)).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, *shape)
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name,kwargs,shape", [("resnet20", {}, CIFAR), ("fcn", {"depth": 3}, (64,))])
def test_torchscript(name, kwargs, shape):
    m = models.get_model(name, **kwargs).eval()
    x = torch.randn(2, *shape)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))


def test_fcn_init_is_he_normal_by_default_and_validated():
    import math

    import pytest
    torch.manual_seed(0)
    m = models.fcn(depth=4, width=400, in_features=300)
    w = m.layers[1].weight
    assert abs(float(w.std()) - math.sqrt(2 / 400)) < 0.05 * math.sqrt(2 / 400)
    assert float(m.layers[1].bias.abs().max()) == 0.0
    t = models.fcn(depth=4, width=400, in_features=300, init="torch").layers[1].weight
    assert float(t.std()) < 0.7 * float(w.std())  # PyTorch's default: std = 1 / sqrt(3 fan_in)
    with pytest.raises(ValueError, match="init"):
        models.fcn(init="xavier")
