"""Fold inference-mode BatchNorms into the layer before them, including the two-branch layers of ``L + S``.

In eval mode a BatchNorm is the per-channel affine map ``y = a * x + c`` with
``a = gamma / sqrt(running_var + eps)`` and ``c = beta - running_mean * a``.  When its input is
the output of a convolution ``x = W * z + b``, the pair is the single convolution with weight
``a[o] * W[o]`` and bias ``a * b + c`` -- exactly (up to float rounding) and with one layer less.
ONNX Runtime, TorchScript's ``freeze`` and ``torch.fx.experimental.optimization.fuse`` do this for
a stock ``Conv -> BatchNorm``; none of them sees through the layers ``export`` produces for a
weight ``W = L + S`` (:class:`~admm_compress.layers.SumBranches`: a low-rank or TT chain plus a
sparse conv, summed), so behind every such layer the BatchNorm stays a separate pass over the
activations -- in a sparsity-aware engine, one that costs about as much as the sparse branch.

Since the BatchNorm is linear, it folds into a sum of branches as ``a * (A z + B z) + c =
(a * A) z + (a * B) z + c``: each branch's *last* layer has its output channels scaled by ``a``
and one branch takes the shift ``c``.  A sparse layer keeps its support (scaling a row keeps its
zeros), a chain (``nn.Sequential``) is scaled at its last layer.

The pairing comes from a :mod:`torch.fx` trace of the forward pass (as in
:mod:`admm_compress.graph`), not from module order: a BatchNorm is folded only when its single
input is the output of one call of a foldable layer that nothing else reads, neither module is
called twice nor registered under two names, and the BatchNorm normalizes with running
statistics.  Anything else is left in place and reported.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .graph import GraphError
from .layers import SumBranches

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the library's sparse convs are subclasses


class _Tracer(fx.Tracer):
    """Stock leaves plus every ``nn.Conv*`` subclass and :class:`SumBranches` (folded as wholes)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*_CONV, SumBranches)):
            return True
        return super().is_leaf_module(m, qualname)


def _last_convs(m: nn.Module, out: list, shift: bool) -> bool:
    """Collect ``(conv, takes_shift)`` for the layers whose output channels make up ``m``'s output;
    False when some branch does not end in a convolution."""
    if isinstance(m, _CONV):
        out.append((m, shift))
        return True
    if isinstance(m, nn.Sequential) and len(m) > 0:
        return _last_convs(m[-1], out, shift)
    if isinstance(m, SumBranches):
        return _last_convs(m.a, out, shift) and _last_convs(m.b, out, False)
    return False


def _why_not(bn: nn.Module, producer: nn.Module | None, convs: list) -> str | None:
    if producer is None:
        return "its input is not the output of a module"
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False normalizes with batch statistics)"
    if not convs:
        return f"{type(producer).__name__} does not end in a (non-transposed) convolution in every branch"
    for conv, _ in convs:
        if conv.out_channels != bn.num_features:
            return f"the conv has {conv.out_channels} output channels, the BatchNorm {bn.num_features}"
        if parametrize.is_parametrized(conv):
            return "a conv it would change is parametrized (fold the exported model)"
    return None


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold each eval-mode BatchNorm into the convolution, chain or ``L + S`` sum that feeds it.

    Parameters
    ----------
    model:
        An exported (or any) model in eval mode (``model.eval()``): a BatchNorm in training mode
        normalizes with batch statistics, which no weight can reproduce.
    inplace:
        Modify ``model`` itself; by default a deep copy is folded and returned.

    Returns
    -------
    nn.Module
        The model, of its own class, with each folded BatchNorm replaced by ``nn.Identity`` and
        its scale and shift in the producing layer(s): stock / sparse convs (any groups), the last
        conv of an ``nn.Sequential`` chain, both branches of a
        :class:`~admm_compress.layers.SumBranches` (the shift in the first).  The outputs equal
        the input model's up to float rounding.  BatchNorms that cannot be folded (input read by
        another layer, a producer that is not a convolution, e.g. ``nn.Linear`` before a
        ``BatchNorm1d``, a module called twice, no running statistics) stay and are logged.

    Raises
    ------
    ValueError
        If ``model`` or one of its BatchNorms is in training mode.
    GraphError
        If the forward pass cannot be traced with :mod:`torch.fx`.

    Example
    -------
    >>> deployed = fold_batchnorm(export(model, spec).eval())   # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm: model must be an nn.Module, got {type(model).__name__}")
    training = [n for n, m in model.named_modules() if isinstance(m, _BN) and m.training]
    if model.training or training:
        what = f"its BatchNorm {training[0]!r}" if training else "the model"
        raise ValueError(f"fold_batchnorm: {what} is in training mode (training=True), where BatchNorm uses "
                         f"batch statistics that cannot be folded into weights; call model.eval() first")
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise GraphError(f"fold_batchnorm: cannot trace {type(model).__name__} with torch.fx "
                         f"({type(e).__name__}: {e})") from e
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    names_per_module: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names_per_module[id(m)] = names_per_module.get(id(m), 0) + 1
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def single(name: str) -> bool:
        return calls.get(name) == 1 and names_per_module.get(id(modules[name])) == 1

    folded, left = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        producer = None
        if isinstance(src, fx.Node) and src.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            producer = modules[src.target]
        convs: list = []
        if producer is not None:
            _last_convs(producer, convs, True)
        reason = _why_not(bn, producer, convs)
        if reason is None and not (single(node.target) and single(src.target)):
            reason = "the BatchNorm or its producer is called or registered more than once"
        if reason is None and len(src.users) != 1:
            reason = f"the output of {src.target!r} is also read elsewhere"
        if reason is None and len({id(c) for c, _ in convs}) != len(convs):
            reason = "a conv appears in more than one branch"
        if reason is None and any(names_per_module.get(id(c)) != 1 for c, _ in convs):
            reason = "a conv it would change is registered under more than one name"
        if reason is not None:
            left.append((node.target, reason))
            continue
        zeros = torch.zeros_like(bn.running_mean)
        with torch.no_grad():
            for conv, takes_shift in convs:
                # the branch without the shift: the BN's scale only (mean 0, beta 0)
                w, b = fuse_conv_bn_weights(conv.weight, conv.bias,
                                            bn.running_mean if takes_shift else zeros, bn.running_var,
                                            bn.eps, bn.weight, bn.bias if takes_shift else zeros)
                if conv.bias is None and not takes_shift and not bool(b.any()):
                    b = None  # a branch without bias stays without one
                conv.weight.copy_(w)  # in place: a sparse conv's caches see the new version
                if b is None:
                    pass
                elif conv.bias is None:
                    conv.bias = nn.Parameter(b.detach(), requires_grad=conv.weight.requires_grad)
                else:
                    conv.bias.copy_(b)
        parent, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        folded.append(node.target)
    log.info("fold_batchnorm: folded %d BatchNorm(s)%s", len(folded),
             "" if not left else "; left " + "; ".join(f"{n}: {r}" for n, r in left))
    return model
