"""The compact layers :func:`admm_compress.export` builds, and their cost counters.

==================  ===========================================================================
module              what it holds
==================  ===========================================================================
:mod:`.compact`     :class:`SparseLinear` / ``SparseConv1d`` / ``SparseConv2d`` (unstructured
                    sparsity, compact storage and CSR kernels: :mod:`admm_compress.storage`,
                    :mod:`admm_compress.deploy`), :class:`IndexSelect` / :class:`IndexScatter`
                    (channel removal), :class:`SumBranches` (``L + S``)
:mod:`.tt`          tensor-train layers: the ``"oki"`` layout's stock conv chain
                    (:func:`~.tt.tt_oki_modules`), :class:`~.tt.TTConv2d` / :class:`~.tt.TTLinear`
                    for the Eq. 9 layout, :class:`~.tt.TTPairedConv` for the ``"paired"`` one,
                    their MAC formulas and the TT exporter
:mod:`.tt_realize`  the other exact realizations of an oki chain (first / last 1x1 folded into
                    the kxk conv, one dense conv), chosen per layer by MACs or measured latency
                    (``export(..., tt_realization=...)``)
==================  ===========================================================================

Registration is explicit and happens here, once: each module's ``register_counters()`` teaches
:func:`admm_compress.complexity` its layers' MACs and parameters; the exporters are registered
by :mod:`admm_compress.export` (its table of built-in exporters).  The old path
``admm_compress.tt_layers`` still imports and *is* :mod:`.tt`.
"""
from . import compact, tt
from .compact import (IndexScatter, IndexSelect, SparseConv1d, SparseConv2d, SparseLinear,  # noqa: F401
                      SumBranches, _SparseConvMixin, _SparseMixin)
from .tt import TTConv2d, TTLinear, TTPairedConv  # noqa: F401

compact.register_counters()
tt.register_counters()

__all__ = ["SparseLinear", "SparseConv1d", "SparseConv2d", "IndexSelect", "IndexScatter", "SumBranches",
           "TTConv2d", "TTLinear", "TTPairedConv", "compact", "tt"]
