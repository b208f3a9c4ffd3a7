"""Constraint sets and penalties: the structures a weight can be asked to have.

Hard constraints (:class:`ConstraintSet`): :class:`LowRank`, :class:`Cardinality`,
:class:`TTRank` and :class:`Sum` of two of them.  Soft constraint (:class:`Penalty`):
:class:`SchattenP`.  Every operator is a pure tensor function in
:mod:`admm_compress.functional`; the classes validate arguments and keep the parameters.
"""
from .base import Constraint, ConstraintSet, GramSpec, Penalty
from .cardinality import Cardinality
from .lowrank import LowRank
from .schatten import SchattenP, SquaredFrobenius
from .sum import Sum, sequential_ls, sequential_sl
from .tt import TTRank

__all__ = [
    "Constraint",
    "ConstraintSet",
    "Penalty",
    "GramSpec",
    "LowRank",
    "Cardinality",
    "TTRank",
    "SchattenP",
    "SquaredFrobenius",
    "Sum",
    "sequential_sl",
    "sequential_ls",
]
