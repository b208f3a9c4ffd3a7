"""The published methods as configurations of the one :class:`~admm_compress.Solver` loop.

======================  ==========================================================  ===============
function                what it configures                                           paper
======================  ==========================================================  ===============
:func:`lrpet`           projected SGD, ``LowRank`` with energy transfer + BN metric  Guo et al.
:func:`trp`             projected SGD, energy rank rule + nuclear subgradient        Xu et al. 2019
:func:`raspa`           ADMM on ``W = L + S``: TT-rank ``L``, cardinality ``S``      RASPA
======================  ==========================================================  ===============

Each function returns a configured solver: ``methods.lrpet(0.6).fit(model, loader, epochs)``.
"""
from .lrpet import lrpet, lrpet_rank
from .trp import TRPSolver, trp
from .raspa import AutoTTView, RaspaSolver, raspa

__all__ = ["lrpet", "lrpet_rank", "trp", "TRPSolver", "raspa", "RaspaSolver", "AutoTTView"]
