"""Turn a constrained model into a model of real, smaller layers.

``export(model, spec)`` resolves the spec, asks each constraint for the compact factors of its
(already feasible, or projected here) weight through ``set.factorize`` and swaps the module for
the compact one:

==================  =====================  ==============================================
constraint          view                   exported module
==================  =====================  ==============================================
LowRank/SchattenP   Linear ``(out, in)``   ``Linear(in, r, bias=False)`` -> ``Linear(r, out)``
LowRank/SchattenP   conv ``"channel"``     ``kh x kw`` conv in->r (stride, padding, dilation of
                                           the original, no bias) -> ``1 x 1`` conv r->out (bias)
                                           (LRPET Sec. III-E; LoRITa; Decomposable-Net "channel")
LowRank/SchattenP   conv2d ``"spatial"``   ``1 x kw`` conv in->r (horizontal stride/padding) ->
                                           ``kh x 1`` conv r->out (vertical stride/padding, bias)
                                           (Jaderberg et al. 2014; Decomposable-Net "spatial")
LowRank/SchattenP   ``"input_channel"``    ``1 x 1`` conv in->r -> the ``k``-sized conv r->out
Cardinality         any                    ``SparseLinear`` / ``SparseConv*d`` (mask buffer, MACs
                                           = non-zeros); ``group_dim=0`` on conv/linear: fewer
                                           output filters + ``IndexScatter``; ``group_dim=1``:
                                           ``IndexSelect`` + fewer input channels
Sum(a, b)           any                    ``SumBranches(export_a, export_b)`` (bias in one branch)
TTRank              ``TTView.oki()``       3 stock convs / 2 Linears (:func:`admm_compress.layers.tt.tt_oki_modules`)
TTRank              ``TTView`` (eq9)       :class:`admm_compress.layers.tt.TTConv2d` / ``TTLinear``
==================  =====================  ==============================================

After the swap, :func:`admm_compress.channels.remove_channels` deletes what structured sparsity
left dead in the neighbours (the filters and BatchNorm entries behind pruned input channels, the
inputs behind pruned filters) wherever that is exact; ``remove_channels=False`` keeps the
per-layer ``IndexSelect`` / ``IndexScatter`` form.
A layer whose compact form would store more numbers than the dense one stays dense (logged).

The package: :mod:`~admm_compress.export.model` (``export`` itself: resolve, collapse the
parametrizations, swap), :mod:`~admm_compress.export.registry` (the exporter table,
:func:`register_exporter`, :func:`build_compact`), :mod:`~admm_compress.export.lowrank` and
:mod:`~admm_compress.export.sparse` (the built-in builders; the TT builder is
:mod:`admm_compress.layers.tt`'s).  The built-ins are registered here, explicitly and in this
order; new exporters are added with :func:`register_exporter` (``first=True``: before them).
"""
from __future__ import annotations

from ..layers import tt as _tt
from . import lowrank as _lowrank
from . import sparse as _sparse
from .model import export
from .registry import _EXPORTERS, ExportError, Exporter, build_compact, register_exporter  # noqa: F401

__all__ = ["export", "register_exporter", "build_compact", "ExportError"]

# The generic builders (any matrix view; any view for cardinality and sums).  The prepare-time
# check (:mod:`admm_compress.exportable`) asks whether a *view-specific* exporter -- any other one:
# TT, the input-channel split, TRP's VH view, a user's -- handles a view it does not know.
_BUILTIN = (_lowrank.export_lowrank, _sparse.export_sparse, _sparse.export_sum)

register_exporter(_lowrank.is_lowrank, _lowrank.export_lowrank, first=False)
register_exporter(_sparse.is_sparse, _sparse.export_sparse, first=False)
register_exporter(_sparse.is_sum, _sparse.export_sum, first=False)
register_exporter(_tt.is_tt, _tt.export_tt, first=False)
register_exporter(_lowrank.is_input_channel_lowrank, _lowrank.export_input_channel, first=False)
