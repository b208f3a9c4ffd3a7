"""Decomposable-Net: one network exportable at any size (Yaguchi et al., IJCAI 2021; papers/002).

Everything that is Decomposable-Net's lives in this package:

========================  ========================================================================
module                    what it holds
========================  ========================================================================
:mod:`.solver`            :class:`DecomposableNetSolver`, :func:`decomposable_net`,
                          :func:`recalibrate_bn` (joint full/low-rank training, Eq. 1 and
                          Algorithm 1; export at any size)
:mod:`.rank_selection`    the global / uniform / energy rank criteria (Sec. 2.3), MACs budgets and
                          the channel- / spatial-wise conv matricization (Sec. 2.1)
:mod:`.lowrank_autograd`  the differentiable truncated SVD with the clipped backward of App. A,
                          Eq. (5)-(11)
========================  ========================================================================

Why ``_decomposable_net``: ``admm_compress.methods.decomposable_net`` is the *function*
:func:`decomposable_net`, which would shadow a package of that name (see
:mod:`admm_compress.methods._lorita`).  The old module paths stay importable and *are* these
modules: ``admm_compress.methods.decomposable_net`` is :mod:`.solver`,
``admm_compress.rank_selection`` is :mod:`.rank_selection` and ``admm_compress.lowrank_autograd``
is :mod:`.lowrank_autograd`.
"""
from . import lowrank_autograd, rank_selection
from .solver import DecomposableNetSolver, DNLayer, decomposable_net, recalibrate_bn

__all__ = ["decomposable_net", "DecomposableNetSolver", "DNLayer", "recalibrate_bn", "rank_selection",
           "lowrank_autograd"]
