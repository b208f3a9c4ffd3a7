"""Low-rank exporters: a factored weight ``U @ V`` as two stock layers.

=====================  ==========================================================================
view                   exported module
=====================  ==========================================================================
Linear ``(out, in)``   ``Linear(in, r, bias=False)`` -> ``Linear(r, out)``
conv ``"channel"``     ``kh x kw`` conv in->r (stride, padding, dilation of the original, no
                       bias) -> ``1 x 1`` conv r->out (bias)  (LRPET Sec. III-E; LoRITa;
                       Decomposable-Net "channel")
conv2d ``"spatial"``   ``1 x kw`` conv in->r (horizontal stride/padding) -> ``kh x 1`` conv
                       r->out (vertical stride/padding, bias)  (Jaderberg et al. 2014;
                       Decomposable-Net "spatial")
``"input_channel"``    ``1 x 1`` conv in->r -> the ``k``-sized conv r->out (stride, padding,
                       dilation, bias)
=====================  ==========================================================================

A pair that is not smaller than the dense matrix is not built (the layer stays dense); a rank-0
weight is exported as a rank-1 pair of zero factors.
"""
from __future__ import annotations

import torch
from torch import nn

from ..sets import LowRank, SchattenP
from ..sets.base import Constraint
from ..views import MATRIX_VIEWS, InputChannelView, MatrixView, SpatialView, View
from ._common import CONV, bias_of, conv_cls, explicit_padding, factory
from .registry import ExportError

__all__ = ["is_lowrank", "export_lowrank", "is_input_channel_lowrank", "export_input_channel"]


def factor_pair(factors):
    """``(U, V)`` of a low-rank split, a rank-0 pair as rank 1 with zero factors; ``None`` when the
    pair is not smaller than the dense matrix (the layer stays dense)."""
    U, V = factors
    rows, cols = U.shape[-2], V.shape[-1]
    if U.shape[-1] == 0:
        U, V = U.new_zeros(rows, 1), V.new_zeros(1, cols)
    r = U.shape[-1]
    return None if r * (rows + cols) >= rows * cols else (U, V)


def linear_pair(m: nn.Linear, U: torch.Tensor, V: torch.Tensor, bias) -> nn.Sequential:
    """``Linear(in, r, no bias)`` with weight ``V`` then ``Linear(r, out)`` with weight ``U`` (and
    the bias): the factored Linear of every low-rank split."""
    r, fk = U.shape[-1], factory(m)
    first = nn.Linear(m.in_features, r, bias=False, **fk)
    second = nn.Linear(r, m.out_features, bias=bias is not None, **fk)
    with torch.no_grad():
        first.weight.copy_(V)
        second.weight.copy_(U)
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


def _conv_factors(m: nn.Module, factors, with_bias: bool, what: str):
    """What every low-rank exporter decides before building convs.

    None: stay dense (the pair is not smaller than the dense matrix); a module: ``m`` is a Linear
    and this is its factored form; ``(U, V, bias)``: ``m`` is an ungrouped conv to build from them.
    """
    pair = factor_pair(factors)
    if pair is None:
        return None
    U, V = pair
    bias = bias_of(m, with_bias)
    if isinstance(m, nn.Linear):
        return linear_pair(m, U, V, bias)
    if not isinstance(m, CONV):
        raise ExportError(f"{what} export supports nn.Linear and nn.Conv1d/2d/3d, got {type(m).__name__}")
    if m.groups != 1:
        raise ExportError(f"{what} export of a grouped convolution (groups={m.groups}) is not supported")
    return U, V, bias


def is_lowrank(c: Constraint, v: View) -> bool:
    # "identity" reaches here only for 2-D (Linear) weights: exportable.refusal rejects it on convs
    return isinstance(c, (LowRank, SchattenP)) and isinstance(v, MATRIX_VIEWS)


def export_lowrank(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool):
    """Two stock layers for a ``"matrix"`` / ``"channel"`` / ``"spatial"`` low-rank weight."""
    got = _conv_factors(m, factors, with_bias, "low-rank")  # (m, r), (r, n): U @ V = the viewed weight
    if not isinstance(got, tuple):
        return got
    U, V, bias = got
    r, fk = U.shape[-1], factory(m)
    if m.padding_mode != "zeros" and isinstance(v, SpatialView):
        return None
    Conv = conv_cls(m)
    out_c, in_c = m.out_channels, m.in_channels
    k = tuple(m.kernel_size)
    if isinstance(v, MatrixView):  # "matrix" / "channel": (out, in*k...)
        first = Conv(in_c, r, k, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False,
                     padding_mode=m.padding_mode, **fk)
        second = Conv(r, out_c, 1, bias=bias is not None, **fk)
        with torch.no_grad():
            first.weight.copy_(V.reshape(r, in_c, *k))
            second.weight.copy_(U.reshape(out_c, r, *([1] * len(k))))
            if bias is not None:
                second.bias.copy_(bias)
        return nn.Sequential(first, second)
    # spatial: rows (o, y), cols (i, x); W[o, i, y, x] = sum_r U[(o, y), r] V[r, (i, x)]
    pad = explicit_padding(m)
    if pad is None:
        return None
    kh, kw = k
    (sh, sw), (dh, dw), (ph, pw) = m.stride, m.dilation, pad
    first = nn.Conv2d(in_c, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=False, **fk)
    second = nn.Conv2d(r, out_c, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                       bias=bias is not None, **fk)
    with torch.no_grad():
        first.weight.copy_(V.reshape(r, in_c, kw).unsqueeze(2))
        second.weight.copy_(U.reshape(out_c, kh, r).permute(0, 2, 1).unsqueeze(-1))
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)


def is_input_channel_lowrank(c, v) -> bool:
    return isinstance(c, (LowRank, SchattenP)) and isinstance(v, InputChannelView)


def export_input_channel(m: nn.Module, c, v, factors, with_bias: bool):
    """1x1 conv ``I -> r`` then the ``k``-sized conv ``r -> O`` (Linear: two Linears)."""
    got = _conv_factors(m, factors, with_bias, "input_channel low-rank")  # (O prod(k), r), (r, I)
    if not isinstance(got, tuple):
        return got
    U, V, bias = got
    r, fk = U.shape[-1], factory(m)
    Conv = conv_cls(m)
    O, I, *k = m.weight.shape
    first = Conv(I, r, 1, bias=False, **fk)
    second = Conv(r, O, tuple(k), stride=m.stride, padding=m.padding, dilation=m.dilation,
                  bias=bias is not None, padding_mode=m.padding_mode, **fk)
    nd = m.weight.dim()
    with torch.no_grad():
        first.weight.copy_(V.reshape(r, I, *([1] * len(k))))
        second.weight.copy_(U.reshape(O, *k, r).permute(0, nd - 1, *range(1, nd - 1)))
        if bias is not None:
            second.bias.copy_(bias)
    return nn.Sequential(first, second)
