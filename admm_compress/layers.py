"""Compact layers produced by :func:`admm_compress.export`.

Low-rank layers are exported as stock ``nn.Sequential`` pairs of ``nn.Linear`` / ``nn.ConvNd``
(nothing custom to count, trace or script).  The few custom modules here are the ones that have
no stock counterpart: sparse layers whose cost is their number of non-zeros, channel
selection/scatter for structured sparsity, and the sum of two branches (``W = L + S``).  Each
registers a MAC counter with :mod:`admm_compress.complexity`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SparseLinear", "SparseConv1d", "SparseConv2d", "IndexSelect", "IndexScatter", "SumBranches"]


class _SparseMixin:
    """Weight stored densely with a fixed 0/1 ``mask`` buffer; the effective weight is ``weight * mask``.

    MACs are counted from ``mask.sum()`` (unstructured sparsity: what a sparse kernel would do).
    Gradients of masked entries are zero, so fine-tuning keeps the support.
    """

    def _init_mask(self, mask: torch.Tensor):
        self.register_buffer("mask", mask.to(dtype=self.weight.dtype, device=self.weight.device))
        with torch.no_grad():
            self.weight.mul_(self.mask)

    @property
    def nnz(self) -> int:
        return int(self.mask.count_nonzero())


class SparseLinear(nn.Linear, _SparseMixin):
    """``nn.Linear`` with a fixed sparsity mask (cardinality-constrained weight)."""

    def __init__(self, in_features, out_features, bias=True, mask=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class SparseConv1d(nn.Conv1d, _SparseMixin):
    """``nn.Conv1d`` with a fixed sparsity mask."""

    def __init__(self, *args, mask=None, **kw):
        super().__init__(*args, **kw)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class SparseConv2d(nn.Conv2d, _SparseMixin):
    """``nn.Conv2d`` with a fixed sparsity mask."""

    def __init__(self, *args, mask=None, **kw):
        super().__init__(*args, **kw)
        self._init_mask(torch.ones_like(self.weight) if mask is None else mask)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class IndexSelect(nn.Module):
    """Keep the channels ``index`` along ``dim`` (input side of a structurally pruned layer)."""

    def __init__(self, index: torch.Tensor, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x):
        return torch.index_select(x, self.dim, self.index)


class IndexScatter(nn.Module):
    """Put ``x``'s channels at positions ``index`` of a zero tensor with ``size`` channels along ``dim``.

    The output side of a layer whose output filters were pruned: the following layers see the
    original shape, with the pruned channels equal to zero (plus the bias, passed separately).
    """

    def __init__(self, index: torch.Tensor, size: int, dim: int = 1, bias: torch.Tensor | None = None):
        """``bias``: added to the scattered output; shaped to broadcast against it (``(C,)`` for
        ``dim=-1``, ``(C, 1, 1)`` for a Conv2d output with ``dim=1``)."""
        super().__init__()
        self.dim = dim
        self.size = int(size)
        index = index.to(torch.long)
        self.register_buffer("index", index)
        # gather map: output channel j reads input channel gather[j]; pruned channels read the
        # appended zero channel (index len(index)).  A gather, not a scatter into a new tensor,
        # so the module traces with torch.fx and scripts with TorchScript (no shape arithmetic).
        gather = torch.full((self.size,), index.numel(), dtype=torch.long, device=index.device)
        gather[index] = torch.arange(index.numel(), device=index.device)
        self.register_buffer("gather", gather)
        if bias is not None:
            # added to the output as is: shape it to broadcast, e.g. (C, 1, 1) for a Conv2d output
            if bias.shape[0] != self.size:
                raise ValueError(f"IndexScatter: bias has {bias.shape[0]} entries along its first "
                                 f"dimension, expected size={self.size}")
            self.register_buffer("fill", bias.detach().clone())
        else:
            self.fill = None

    def forward(self, x):
        zero = x.narrow(self.dim, 0, 1) * 0
        out = torch.index_select(torch.cat([x, zero], self.dim), self.dim, self.gather)
        if self.fill is not None:
            out = out + self.fill
        return out


class SumBranches(nn.Module):
    """``y = a(x) + b(x)``: the layer of a weight ``W = L + S`` (one branch per component)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x):
        return self.a(x) + self.b(x)


# ------------------------------------------------------------------ cost counters (ptflops "pytorch")
def _sparse_macs(module, inputs, output) -> int:
    """Each output element of output channel/feature ``o`` costs ``nnz(W[o])`` MACs, plus one for
    the bias (ptflops' convention for dense layers), so a dense mask gives the stock count."""
    per_out = output.numel() // output.shape[1 if isinstance(module, nn.modules.conv._ConvNd) else -1]
    nnz_rows = module.mask.reshape(module.mask.shape[0], -1).count_nonzero(dim=1)  # per output channel
    macs = int(nnz_rows.sum()) * per_out
    if module.bias is not None:
        macs += output.numel()
    return macs


def _sparse_params(module) -> int:
    return module.nnz + (module.bias.numel() if module.bias is not None else 0)


def _zero_macs(module, inputs, output) -> int:
    return 0


def _scatter_macs(module, inputs, output) -> int:
    return output.numel() if module.fill is not None else 0


def _register_counters():
    from .complexity import register_counter

    for cls in (SparseLinear, SparseConv1d, SparseConv2d):
        register_counter(cls, _sparse_macs, _sparse_params)
    register_counter(IndexSelect, _zero_macs, lambda m: 0)
    # the scattered bias (``fill``) is the layer's bias: its numbers are parameters and adding it
    # costs one MAC per output element (ptflops' convention for a dense layer's bias)
    register_counter(IndexScatter, _scatter_macs, lambda m: m.fill.numel() if m.fill is not None else 0)


_register_counters()
