"""Constraint specs: selection by glob, type and predicate; errors before any work."""
import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress.graph import consumer_batchnorms
from admm_compress.specs import SpecError, resolve


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h)) + self.short(x)
        return self.fc(h.mean((2, 3)))


def test_glob_type_predicate_exclude():
    net = Net()
    names = lambda spec: [b.key for b in resolve(spec, net)]
    assert names(ac.Constrain("conv*", ac.LowRank(rank=2))) == ["conv1.weight", "conv2.weight"]
    assert names(ac.Constrain("*", ac.Cardinality(density=0.5))) == [
        "conv1.weight", "conv2.weight", "short.weight", "fc.weight"]  # BN scales (1-D) never selected
    assert names(ac.Constrain(nn.Conv2d, ac.LowRank(rank=2), exclude="short")) == ["conv1.weight", "conv2.weight"]
    assert names(ac.Constrain(lambda n, m: isinstance(m, nn.Linear), ac.LowRank(rank=2))) == ["fc.weight"]


def test_ddp_like_wrapper_is_looked_through():
    net = nn.DataParallel(Net())
    assert [b.name for b in resolve(ac.Constrain("fc", ac.LowRank(rank=2)), net)] == ["fc"]


def test_errors_name_the_spec_and_layer_and_leave_model_untouched():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SpecError, match="selects no layer"):
        ac.Solver(ac.Constrain("layer9.*", ac.LowRank(rank=2))).prepare(net)
    with pytest.raises(SpecError, match="already constrained"):
        ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(rank=2)), ac.Constrain("conv1", ac.LowRank(rank=1))]).prepare(net)
    with pytest.raises(SpecError, match="conv1"):
        ac.Solver(ac.Constrain("conv1", ac.TTRank(ranks=(2, 2)), view="channel")).prepare(net)
    with pytest.raises(SpecError, match="k=10000"):
        ac.Solver(ac.Constrain("fc", ac.Cardinality(k=10000))).prepare(net)
    with pytest.raises(TypeError, match="constraint"):
        ac.Constrain("fc", "lowrank")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_grouped_conv_refused_for_matrix_views():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(SpecError, match="group"):
        resolve(ac.Constrain(nn.Conv2d, ac.LowRank(rank=2)), net)
    assert len(resolve(ac.Constrain(nn.Conv2d, ac.Cardinality(density=0.5), view="identity"), net)) == 1


def test_bn_pairing_follows_the_graph_not_the_order():
    pairs = consumer_batchnorms(Net())
    assert pairs == {"conv1": "bn1", "conv2": "bn2"}  # 'short' feeds an add, not a BN


def test_describe_lists_layers():
    s = ac.Solver([ac.Constrain(nn.Conv2d, ac.LowRank(ratio=0.5), metric="bn")], mode="projection")
    s.prepare(Net())
    text = s.describe()
    assert "conv1.weight" in text and "8x27" in text
    assert "short.weight" in text.split("without BN metric")[1]


# ----------------------------------------------------------------- tied weights, shared modules
class Tied(nn.Module):
    """Two Linear layers holding one Parameter (tied weights, as an embedding and an LM head)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weight_under_two_conflicting_specs_is_refused():
    spec = [ac.Constrain("a", ac.LowRank(rank=2)), ac.Constrain("b", ac.Cardinality(density=0.5))]
    net = Tied()
    w0 = net.a.weight.detach().clone()
    for call in (lambda: resolve(spec, net), lambda: ac.Solver(spec, rho=1.0).prepare(net)):
        with pytest.raises(SpecError) as e:
            call()
        msg = str(e.value)
        assert "tied weight" in msg and "'a.weight'" in msg and "'b.weight'" in msg
        assert "LowRank" in msg and "Cardinality" in msg and "spec[0]" in msg and "spec[1]" in msg
    assert torch.equal(net.a.weight, w0)


def test_tied_weight_under_one_spec_is_feasible_after_fit():
    torch.manual_seed(0)
    net = Tied()
    x = torch.randn(32, 6)
    loader = [(x, torch.randn(32, 6))]
    solver = ac.Solver(ac.Constrain(nn.Linear, ac.LowRank(rank=2)), rho=1.0)
    hist = solver.fit(net, loader, epochs=2, loss_fn=nn.functional.mse_loss, lr=0.01)
    assert net.a.weight is net.b.weight and hist.final["feasible"]
    s = torch.linalg.svdvals(net.a.weight.detach())
    assert float(s[2]) <= 1e-5 * float(s[0])  # rank 2 up to float32 SVD round-off


class Shared(nn.Module):
    """One nn.Linear registered under two attribute names, called twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = self.first
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.second(torch.relu(self.first(x)))))


@pytest.mark.parametrize("target", [nn.Linear, "first", "second"])
def test_module_under_two_names_is_exported_at_both(target):
    from _helpers import projected

    torch.manual_seed(0)
    net = Shared()
    spec = ac.Constrain(target, ac.LowRank(rank=2), exclude="out")
    bindings = resolve(spec, net)
    assert len(bindings) == 1  # one module, one binding, whichever of its names the target names
    ref = projected(net, spec)
    compact = ac.export(net, spec)
    assert compact.first is compact.second and not isinstance(compact.first, nn.Linear)
    names = {n for n, m in compact.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)}
    assert not any(n in ("first", "second") for n in names)
    x = torch.randn(16, 8)
    with torch.no_grad():
        # float32: the factorized product differs from the dense projected weight by round-off
        torch.testing.assert_close(compact(x), ref(x), rtol=1e-5, atol=1e-5)
