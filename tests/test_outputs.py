"""Models whose forward returns a dict or a tuple train through ``fit`` with a user ``loss_fn``.

torchvision segmentation models return ``{"out", "aux"}``, Inception-style models auxiliary
logits in a tuple, HF-style models an output container: ``fit`` passes the outputs as they are to
``loss_fn``, detaches them whatever their structure, and reports an accuracy only when it is
defined (a logits tensor, or a user ``accuracy_fn``), NaN otherwise.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import admm_compress as ac
from admm_compress import methods
from admm_compress.training import batch_size, count_correct, tree_detach


class DictNet(nn.Module):
    """Body + two heads returning ``{"out": logits, "aux": logits}`` (torchvision segmentation style)."""

    def __init__(self, d_in=8, hidden=16, classes=4):
        super().__init__()
        self.body = nn.Linear(d_in, hidden)
        self.head = nn.Linear(hidden, classes)
        self.aux = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"out": self.head(h), "aux": self.aux(h)}


class TupleNet(DictNet):
    """Same, returning ``(logits, aux_logits)`` (auxiliary-logits style)."""

    def forward(self, x):
        o = super().forward(x)
        return o["out"], o["aux"]


def dict_loss(o, y):
    return F.cross_entropy(o["out"], y) + 0.4 * F.cross_entropy(o["aux"], y)


def tuple_loss(o, y):
    return F.cross_entropy(o[0], y) + 0.4 * F.cross_entropy(o[1], y)


def main_out(o):
    return o["out"] if isinstance(o, dict) else o[0]


def _data(n=128, d_in=8, classes=4, bs=32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, classes, generator=g)
    y = (x @ teacher).argmax(1)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)], x, y


def _loss(model, loader, loss_fn):
    return ac.evaluate(model, loader, loss_fn)["loss"]


CASES = [(DictNet, dict_loss), (TupleNet, tuple_loss)]


def _solvers():
    return {
        "Solver-LowRank": lambda: ac.Solver([ac.Constrain("body", ac.LowRank(rank=3))], rho=0.5, every=1),
        "lrpet": lambda: methods.lrpet(0.5, targets=nn.Linear, bn_rectification=False, exclude=["head", "aux"]),
        "lorita": lambda: methods.lorita(2, targets=nn.Linear, exclude=["head", "aux"], rank_ratio=0.5),
        "decomposable_net": lambda: methods.decomposable_net(rank_ratio=(0.3, 0.8), lam=0.5, min_rank=1,
                                                             targets=nn.Linear, exclude=["head", "aux"], seed=0),
    }


@pytest.mark.parametrize("net,loss_fn", CASES, ids=["dict", "tuple"])
@pytest.mark.parametrize("name", list(_solvers()))
def test_fit_trains_structured_outputs_and_exports(net, loss_fn, name):
    torch.manual_seed(0)
    model = net()
    loader, x, y = _data()
    before = _loss(model, loader, loss_fn)
    w0 = model.body.weight.detach().clone()
    solver = _solvers()[name]()
    hist = solver.fit(model, loader, epochs=8, loss_fn=loss_fn, val_loader=loader, lr=0.1)
    # no default accuracy for a dict / tuple of outputs: NaN (documented), never a crash
    assert all(math.isnan(e["train_accuracy"]) and math.isnan(e["val_accuracy"]) for e in hist.epochs)
    assert not torch.equal(model.body.weight, w0)
    after = _loss(model, loader, loss_fn)
    # chance level of 4 classes is ln 4 per head; training must have lowered the loss
    assert after < before, (before, after)
    model.eval()
    if name == "decomposable_net":
        r = 3
        compact = solver.export(model, ranks={"body": r})
        # brute force: the body weight replaced by its best rank-r approximation (Eckart-Young)
        ref = copy.deepcopy(model)
        U, S, Vh = torch.linalg.svd(ref.body.weight.detach(), full_matrices=False)
        with torch.no_grad():
            ref.body.weight.copy_((U[:, :r] * S[:r]) @ Vh[:r])
    else:
        compact = solver.export(model)
        ref = model  # finalized: the weights already lie in the set
        sv = torch.linalg.svdvals(model.body.weight.detach())
        # rank 3 (Solver) / int(8 - 8 * 0.5) = 4 (LRPET) / 0.5 * 8 = 4 (LoRITa), up to float32 SVD round-off
        assert int((sv > 1e-5 * sv[0]).sum()) <= 4
    assert not isinstance(compact.body, nn.Linear)  # replaced by a factorized layer
    with torch.no_grad():
        got, want = compact(x), ref(x)
    assert type(got) is type(want)
    # float32 round-off of two thin matmuls against one (sums of 16 products): ~1e-6 relative
    for a, b in ((main_out(got), main_out(want)), (got["aux"] if isinstance(got, dict) else got[1],
                                                   want["aux"] if isinstance(want, dict) else want[1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_accuracy_fn_on_structured_outputs_matches_brute_force():
    torch.manual_seed(0)
    model = DictNet()
    loader, x, y = _data()
    hist = ac.Solver([ac.Constrain("body", ac.LowRank(rank=3))], rho=0.5).fit(
        model, loader, epochs=2, loss_fn=dict_loss, val_loader=loader, lr=0.1,
        accuracy_fn=lambda o, t: (o["out"].argmax(1) == t).sum())
    with torch.no_grad():
        want = 100.0 * float((model.eval()(x)["out"].argmax(1) == y).float().mean())
    assert hist.final["after_finalize"]["accuracy"] == pytest.approx(want, abs=1e-9)
    assert all(0.0 <= e["val_accuracy"] <= 100.0 for e in hist.epochs)
    # a (correct, total) pair is accepted too
    ev = ac.evaluate(model, loader, dict_loss, accuracy_fn=lambda o, t: ((o["out"].argmax(1) == t).sum(), t.numel()))
    assert ev["accuracy"] == pytest.approx(want, abs=1e-9)


def test_resume_with_structured_outputs_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    init = DictNet()
    loader, x, y = _data()

    def make():
        return ac.Solver([ac.Constrain("body", ac.LowRank(rank=3))], rho=0.5)

    full = copy.deepcopy(init)
    make().fit(full, loader, epochs=3, loss_fn=dict_loss, lr=0.1)
    part = copy.deepcopy(init)
    ck = tmp_path / "run.pt"
    make().fit(part, loader, epochs=3, loss_fn=dict_loss, lr=0.1, checkpoint=ck,
               callbacks=[lambda s, m, rec: rec["epoch"] == 1])  # stop after 2 epochs
    resumed = copy.deepcopy(init)
    make().fit(resumed, loader, epochs=3, loss_fn=dict_loss, lr=0.1, checkpoint=ck)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)  # same ops in the same order


def test_default_accuracy_rules():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2, 2])
    c, t = count_correct(logits, y)
    assert (int(c), int(t)) == (2, 3)
    # segmentation: (N, C, H, W) logits, (N, H, W) targets; 255 (ignore_index) is not counted
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 1] = 1.0  # predicts class 1 everywhere
    tgt = torch.tensor([[[1, 0], [255, 1]]])
    c, t = count_correct(seg, tgt)
    assert (int(c), int(t)) == (2, 3)
    assert count_correct({"out": logits}, y) is None
    assert count_correct((logits,), y) is None
    assert count_correct(logits, y.float()) is None  # regression targets: no accuracy
    assert count_correct(torch.randn(3, 1), torch.randn(3, 1)) is None
    out = {"a": torch.ones(2, requires_grad=True) * 2, "b": [torch.ones(1, requires_grad=True) * 3, "meta"]}
    d = tree_detach(out)
    assert not d["a"].requires_grad and not d["b"][0].requires_grad and d["b"][1] == "meta"
    assert batch_size(torch.zeros(5, 2), torch.zeros(5)) == 5
    assert batch_size(torch.zeros(5, 2), [{"boxes": torch.zeros(1, 4)}] * 5) == 5


def test_train_dense_and_baseline_on_tuple_outputs():
    torch.manual_seed(0)
    model = TupleNet()
    loader, _, _ = _data()
    before = _loss(model, loader, tuple_loss)
    from admm_compress.registry import train_dense

    h = train_dense(model, loader, 5, loss_fn=tuple_loss, val_loader=loader, lr=0.1, progress=False)
    assert _loss(model, loader, tuple_loss) < before
    assert math.isnan(h.epochs[-1]["train_accuracy"])


def test_dict_outputs_without_loss_fn_name_the_fix():
    loader, _, _ = _data()
    with pytest.raises(TypeError, match=r"default loss_fn \(cross entropy\) needs the model to return a logits tensor"):
        ac.Solver([ac.Constrain("body", ac.LowRank(rank=3))], rho=0.5).fit(DictNet(), loader, epochs=1)
