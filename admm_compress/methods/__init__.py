"""The published methods as configurations of the one :class:`~admm_compress.Solver` loop.

==========================  ==========================================================  ===============
function                  what it configures                                           paper
==========================  ==========================================================  ===============
:func:`lrpet`             projected SGD, ``LowRank`` with energy transfer + BN metric  Guo et al.
:func:`trp`               projected SGD, energy rank rule + nuclear subgradient        Xu et al. 2019
:func:`raspa`             ADMM on ``W = L + S``: TT-rank ``L``, cardinality ``S``      RASPA
:func:`lorita`            N-factor parametrization + weight decay, then SV truncation  LoRITa
:func:`lorita_paper`      LoRITa's published pipeline (Adam, GSVT + ISVT, fine-tune)   LoRITa
:func:`decomposable_net`  joint full/low-rank loss, export at any size afterwards      Yaguchi et al.
==========================  ==========================================================  ===============

Each function returns a configured solver: ``methods.lrpet(0.6).fit(model, loader, epochs)``.
"""
from .lrpet import LRPETSolver, lrpet, lrpet_rank, vgg16_rank_floors
from .trp import TRPSolver, VHView, trp
from .raspa import AutoTTView, RaspaSolver, raspa
from .lorita import LoRITaSolver, lorita, lorita_paper
from .decomposable_net import DecomposableNetSolver, decomposable_net, recalibrate_bn

__all__ = ["lrpet", "lrpet_rank", "LRPETSolver", "vgg16_rank_floors", "trp", "TRPSolver", "VHView",
           "raspa", "RaspaSolver", "AutoTTView", "lorita", "lorita_paper", "LoRITaSolver",
           "decomposable_net", "DecomposableNetSolver", "recalibrate_bn"]
