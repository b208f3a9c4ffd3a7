"""Every exported TT layer kind runs under torch.jit.script and torch.export.export with the
outputs of the eager module: TTConv2d / TTLinear ("eq9"), the stock chains of "oki", and RASPA's
L + S sum (chain + sparse conv)."""
import warnings

import pytest
import torch
from torch import nn

import admm_compress as ac
from admm_compress.methods.raspa import raspa
from admm_compress.sets import TTRank
from admm_compress.tt_layers import TTConv2d, TTLinear
from admm_compress.views import TTView

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 reordering of the same contractions


def _script_and_export_agree(m: nn.Module, x: torch.Tensor) -> None:
    m.eval()
    with torch.no_grad():
        ref = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
            scripted = torch.jit.script(m)
        torch.testing.assert_close(scripted(x), ref, **TOL)
        exported = torch.export.export(m, (x,)).module()
        torch.testing.assert_close(exported(x), ref, **TOL)


def _cores(shape, of, inf, rank):
    view = TTView(of, inf)
    return TTRank(rank).factorize(view.to(torch.randn(shape)))


@pytest.mark.parametrize("k, kw", [(3, dict(padding=1)), (3, dict(stride=2, padding="valid", dilation=2)),
                                   ((3, 1), dict(padding="same")), (1, dict(stride=2, padding=1)), (1, {})])
def test_ttconv2d_scripts_and_exports(k, kw):
    torch.manual_seed(0)
    ks = (k, k) if isinstance(k, int) else k
    m = TTConv2d(_cores((8, 6, *ks), (2, 4), (2, 3), 3), (2, 4), (2, 3), k, bias=torch.randn(8), **kw)
    _script_and_export_agree(m, torch.randn(2, 6, 9, 9))


def test_ttlinear_scripts_and_exports_with_leading_dims():
    torch.manual_seed(1)
    m = TTLinear(_cores((8, 6), (2, 4), (2, 3), 3), (2, 4), (2, 3), bias=torch.randn(8))
    _script_and_export_agree(m, torch.randn(3, 4, 6))


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 16, 12))


@pytest.mark.parametrize("layout", ["oki", "eq9"])
def test_exported_plain_ttrank_model_scripts_and_exports(layout):
    torch.manual_seed(2)
    net = _net()
    view = TTView.oki() if layout == "oki" else TTView((4, 4), (4, 4))
    lin_view = TTView.oki() if layout == "oki" else TTView((3, 4), (16, 16))
    spec = [ac.Constrain("2", ac.TTRank((4, 3)), view=view), ac.Constrain("4", ac.TTRank(3), view=view),
            ac.Constrain("6", ac.TTRank(4), view=lin_view)]
    ac.Solver(spec, mode="projection").prepare(net).finalize(net)
    ex = ac.export(net, spec)
    kinds = {type(m) for m in ex.modules()}
    if layout == "eq9":
        assert {TTConv2d, TTLinear} <= kinds
    else:
        assert not kinds & {TTConv2d, TTLinear} and isinstance(ex[2], nn.Sequential)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ex(x), net(x), **TOL)
    _script_and_export_agree(ex, x)


@pytest.mark.parametrize("layout", ["oki", "eq9"])
def test_exported_raspa_l_plus_s_model_scripts_and_exports(layout):
    torch.manual_seed(3)
    net = _net()
    solver = raspa(tt_ranks=(4, 3), density=0.1, exclude=["0", "4"], layout=layout, decompose_iters=1)
    solver.prepare(net)
    solver.finalize(net)
    ex = ac.export(net, solver)
    from admm_compress.layers import SumBranches
    assert isinstance(ex[2], SumBranches)
    assert isinstance(ex[2].a, TTConv2d if layout == "eq9" else nn.Sequential)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ex(x), net(x), **TOL)
    _script_and_export_agree(ex, x)
