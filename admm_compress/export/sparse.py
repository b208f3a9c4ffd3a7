"""Cardinality and sum exporters.

- ``Cardinality`` (unstructured): ``SparseLinear`` / ``SparseConv1d`` / ``SparseConv2d`` (mask
  buffer, MACs = non-zeros; :mod:`admm_compress.layers.compact`).
- ``Cardinality(group_dim=0)`` on a conv/Linear weight: fewer output filters, then
  ``IndexScatter`` back to the channel count (the bias of every channel added after it).
- ``Cardinality(group_dim=1)``: ``IndexSelect`` of the kept input channels, then fewer inputs.
- ``Sum(a, b)``: ``SumBranches(export_a, export_b)`` (the bias in one branch); a branch with no
  compact form is a dense copy holding its reconstruction.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import IndexScatter, IndexSelect, SparseConv1d, SparseConv2d, SparseLinear, SumBranches
from ..sets import Cardinality, Sum
from ..sets.base import Constraint
from ..views import IdentityView, MatrixView, View
from ._common import CONV, bias_of, factory
from .registry import ExportError, build_compact

__all__ = ["is_sparse", "export_sparse", "is_sum", "export_sum", "dense_from"]


def is_sparse(c: Constraint, v: View) -> bool:
    return isinstance(c, Cardinality)


def export_sparse(m: nn.Module, c: Cardinality, v: View, factors, with_bias: bool):
    shape = tuple(m.weight.shape)
    dense = c.reconstruct(factors, tuple(v.viewed_shape(shape)))
    w = v.back(dense, shape)
    bias = bias_of(m, with_bias)
    fk = factory(m)
    if c.group_dim is None:
        mask = (w != 0)
        if isinstance(m, nn.Linear):
            new = SparseLinear(m.in_features, m.out_features, bias=bias is not None, mask=mask, **fk)
        elif isinstance(m, nn.Conv2d):
            new = SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, bias=bias is not None,
                               padding_mode=m.padding_mode, mask=mask, **fk)
        elif isinstance(m, nn.Conv1d):
            new = SparseConv1d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                               dilation=m.dilation, groups=m.groups, bias=bias is not None,
                               padding_mode=m.padding_mode, mask=mask, **fk)
        else:
            raise ExportError(f"sparse export supports Linear, Conv1d, Conv2d; got {type(m).__name__}")
        with torch.no_grad():
            new.weight.copy_(w * mask)
            if bias is not None:
                new.bias.copy_(bias)
        return new
    # structured: whole output filters (dim 0) or input channels (dim 1) of the *weight*
    if not isinstance(v, (IdentityView, MatrixView)) or c.group_dim not in (0, 1):
        raise ExportError(f"structured sparse export needs group_dim 0 or 1 on the weight itself, got "
                          f"group_dim={c.group_dim} with view {v.name!r}")
    if isinstance(m, CONV) and m.groups != 1:
        raise ExportError(f"structured sparse export of a grouped convolution (groups={m.groups}) is not supported")
    flat = w.reshape(shape[0], -1) if c.group_dim == 0 else w.transpose(0, 1).reshape(shape[1], -1)
    keep = torch.nonzero(flat.abs().sum(1) > 0).flatten()
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=w.device)
    sub = torch.index_select(w, c.group_dim, keep)
    new = copy.deepcopy(m)
    if parametrize.is_parametrized(new):
        raise ExportError("structured export of a parametrized module")
    with torch.no_grad():
        new.weight = nn.Parameter(sub.clone())
        if c.group_dim == 0:
            # kept filters only; the bias of *all* output channels (a pruned filter still outputs
            # its bias) is added once, after the scatter back to the original channel count.
            if isinstance(m, nn.Linear):
                new.out_features = keep.numel()
            else:
                new.out_channels = keep.numel()
            new.bias = None
            fill = None
            if bias is not None:
                fill = bias.detach().reshape(-1, *([1] * (w.dim() - 2))) if isinstance(m, CONV) else bias.detach()
            return nn.Sequential(new, IndexScatter(keep, shape[0], dim=-1 if isinstance(m, nn.Linear) else 1,
                                                   bias=fill))
        if isinstance(m, nn.Linear):
            new.in_features = keep.numel()
        else:
            new.in_channels = keep.numel()
        if bias is None:
            new.bias = None
        return nn.Sequential(IndexSelect(keep, dim=1 if not isinstance(m, nn.Linear) else -1), new)


def is_sum(c: Constraint, v: View) -> bool:
    return isinstance(c, Sum)


def export_sum(m: nn.Module, c: Sum, v: View, factors, with_bias: bool):
    fa, fb = factors
    a = build_compact(m, c.sets[0], v, fa, with_bias=False) or dense_from(m, c.sets[0], v, fa, False)
    b = build_compact(m, c.sets[1], v, fb, with_bias=with_bias) or dense_from(m, c.sets[1], v, fb, with_bias)
    return SumBranches(a, b)


def dense_from(m: nn.Module, c: Constraint, v: View, factors, with_bias: bool) -> nn.Module:
    """A copy of ``m`` whose weight is the reconstruction of ``factors`` (dense fallback)."""
    new = copy.deepcopy(m)
    shape = tuple(m.weight.shape)
    with torch.no_grad():
        new.weight.copy_(v.back(c.reconstruct(factors, tuple(v.viewed_shape(shape))), shape))
        if not with_bias and getattr(new, "bias", None) is not None:
            new.bias = None
    return new
