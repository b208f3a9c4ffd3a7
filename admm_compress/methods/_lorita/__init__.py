"""LoRITa: low-rank induced training through linear-layer composition (papers/004).

Everything that is LoRITa's lives in this package:

=====================  ===========================================================================
module                 what it holds
=====================  ===========================================================================
:mod:`.solver`         :class:`LoRITaSolver`, a :class:`~admm_compress.Compressor` run by the
                       one trainer (Sec. 4-5)
:mod:`.presets`        :func:`lorita` and :func:`lorita_paper` (the published pipeline)
:mod:`.factorization`  the ``N``-factor product parametrization ``W = F_N ... F_1`` (Eq. 4-8)
:mod:`.truncation`     the LSVT / GSVT / ISVT truncation rules (Sec. 4, App. A)
=====================  ===========================================================================

Why ``_lorita`` and not ``lorita``: ``admm_compress.methods.lorita`` is the *function*
:func:`lorita` (the public entry, ``methods.lorita(...)``), and a package of the same name would
be shadowed by it (``import admm_compress.methods.lorita.factorization as f`` resolves attribute
by attribute and fails on the function).  The public names are re-exported by
:mod:`admm_compress.methods`; the old module paths stay importable and *are* these modules:
``admm_compress.methods.lorita`` (``from ... import LoRITaSolver``) is :mod:`.solver` and
``admm_compress.factorization`` is :mod:`.factorization`.
"""
from . import factorization, truncation
from .solver import LoRITaSolver, SquaredFrobenius, layer_group, lorita, lorita_paper

__all__ = ["lorita", "lorita_paper", "LoRITaSolver", "SquaredFrobenius", "layer_group", "factorization", "truncation"]
