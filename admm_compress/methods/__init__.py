"""The published methods, each a :class:`~admm_compress.Compressor` driven by the one trainer.

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

Each function returns a configured compressor: ``methods.lrpet(0.6).fit(model, loader, epochs)``.
LRPET, TRP and RASPA configure :class:`~admm_compress.Solver` (projected SGD / ADMM) through its
public hooks (``project_slot``, ``slot_feasible``, ``make_slots``); LoRITa and Decomposable-Net
never project, so they implement :class:`~admm_compress.Compressor` directly
(``isinstance(methods.lorita(...), ac.Solver)`` is ``False``; both are ``ac.Compressor``).

Where the code lives: one module per method (``lrpet``, ``trp``, ``raspa`` + ``raspa_tables`` +
``tt_latency_ranks``, TT ranks for a latency budget measured on the deployment backend),
and one package for each method that brings modules of its own: :mod:`._lorita` (solver,
factor-product parametrization and truncation rules) and :mod:`._decomposable_net` (solver, rank
selection and matricization, differentiable truncated SVD).  The packages are underscored because
``methods.lorita`` / ``methods.decomposable_net`` are the functions; the old module paths
(``admm_compress.methods.lorita``, ``admm_compress.factorization``, ``admm_compress.rank_selection``,
``admm_compress.lowrank_autograd``, ``admm_compress.methods.decomposable_net``) still import and are
the moved modules.
"""
from .lrpet import LRPETSolver, lrpet, lrpet_rank, vgg16_rank_floors
from .trp import TRPSolver, VHView, trp
from .raspa import AutoTTView, RaspaSolver, raspa
# The old module paths ``methods.lorita`` / ``methods.decomposable_net`` (shims, now the modules
# ``_lorita.solver`` / ``_decomposable_net.solver``) are imported *before* the functions of the same
# names are bound below: a later ``import admm_compress.methods.lorita`` then finds the module in
# sys.modules and does not rebind ``methods.lorita`` to it.
from . import decomposable_net as _decomposable_net_module, lorita as _lorita_module  # noqa: F401
from ._lorita import LoRITaSolver, lorita, lorita_paper
from ._decomposable_net import DecomposableNetSolver, decomposable_net, recalibrate_bn

__all__ = ["lrpet", "lrpet_rank", "LRPETSolver", "vgg16_rank_floors", "trp", "TRPSolver", "VHView",
           "raspa", "RaspaSolver", "AutoTTView", "lorita", "lorita_paper", "LoRITaSolver",
           "decomposable_net", "DecomposableNetSolver", "recalibrate_bn"]
