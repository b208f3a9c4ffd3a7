"""LRPET: low-rank projection with energy transfer (Guo et al., IEEE TNNLS; papers/001).

LRPET is projected SGD — the general :class:`~admm_compress.Solver` with ``mode="projection"``:
no penalty, no duals, and the hard assignment every ``T`` optimizer steps (one epoch by default,
after the epoch's steps; momentum buffers untouched)

.. math::  W \\leftarrow \\alpha \\, \\Pi_{r}(W), \\qquad \\alpha = \\|s\\| / \\|s_{1:r}\\|

(Eq. 2 and Eq. 6) on the ``(out, in*kh*kw)`` view of every ``Conv2d`` (FC layers dense by
default).  With BN rectification (Eq. 7-10, Algorithm 1 lines 5-10) the projection acts on
``diag(a) W`` with ``a = gamma / sqrt(running_var + eps_bn)`` of the BatchNorm that consumes the
conv's output (found through the traced graph, not by module order) and maps back with
``a / (a^2 + 1e-5)``.  A conv with no consumer BN is projected without the metric and listed in
``solver.describe()``.  Export gives the two-layer split of Sec. III-E through
:func:`admm_compress.export`.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from .._validation import check_float, check_int
from ..sets import LowRank
from ..solver import Solver
from ..specs import Constrain

__all__ = ["lrpet", "lrpet_rank"]


def lrpet_rank(n: int, pruning_ratio: float) -> int:
    """``r = int(n - n * P)`` of Sec. III-D, computed in exact rational arithmetic (>= 1).

    The official code's float expression can round 2.9999999 down; here ``P`` is read as the
    decimal it was written as.
    """
    from fractions import Fraction

    P = Fraction(str(pruning_ratio))
    return max(1, int(n - n * P))


class _LRPETRank(LowRank):
    """LowRank whose rank is LRPET's ``int(n - n * P)`` for ``n = min(m, n)``."""

    def __init__(self, pruning_ratio: float, min_rank: int = 1, energy_transfer: bool = True):
        super().__init__(ratio=max(1e-12, 1.0 - pruning_ratio), energy_transfer=energy_transfer, min_rank=min_rank)
        self.pruning_ratio = pruning_ratio

    def rank_for(self, shape):
        self.check_shape(tuple(shape))
        q = min(int(shape[-2]), int(shape[-1]))
        return min(q, max(self.min_rank, lrpet_rank(q, self.pruning_ratio)))

    def __repr__(self):
        return (f"LowRank(P={self.pruning_ratio}, energy_transfer={self.energy_transfer}"
                + (f", min_rank={self.min_rank}" if self.min_rank > 1 else "") + ")")


def lrpet(pruning_ratio: float = 0.6, *, energy_transfer: bool = True, bn_rectification: bool = True,
          every="epoch", targets=nn.Conv2d, include_linear: bool = False,
          per_layer: Mapping[str, float] | None = None, min_rank: int | Mapping[str, int] = 1,
          exclude=None, skip_below: float | None = 1e-4) -> Solver:
    """A :class:`Solver` configured as LRPET.

    Parameters
    ----------
    pruning_ratio : float in [0, 1)
        ``P`` of the paper: rank ``r = int(n - n * P)``, ``n = min(out, in*kh*kw)`` (Sec. III-D).
    energy_transfer : bool
        Eq. 6 on/off (ablation of Table VII).
    bn_rectification : bool
        Eq. 7-10 on/off (ablation of Table VII).
    every : "epoch" or int
        ``T`` of Algorithm 1 (one epoch on CIFAR-10, 500 iterations on ImageNet).
    targets : module type(s), glob or predicate
        Layers projected; every ``Conv2d`` by default, including the stem.
    include_linear : bool
        Also project ``nn.Linear`` layers (without BN metric); the paper leaves FC layers dense.
    per_layer : mapping of glob -> P, optional
        Per-layer pruning ratios overriding ``pruning_ratio`` for the layers they match.
    min_rank : int or mapping glob -> int
        Per-layer rank floors.
    exclude : glob or list of globs
        Layers left dense.
    skip_below : float or None
        Skip a layer whose largest singular value is below this (official code: 1e-4).
    """
    P = check_float("pruning_ratio", pruning_ratio, low=0.0, high=1.0, high_open=True, where="lrpet")
    per_layer = dict(per_layer or {})
    for k, v in per_layer.items():
        check_float(f"per_layer[{k!r}]", v, low=0.0, high=1.0, high_open=True, where="lrpet")
    floors = dict(min_rank) if isinstance(min_rank, Mapping) else {}
    default_floor = 1 if isinstance(min_rank, Mapping) else check_int("min_rank", min_rank, low=1, where="lrpet")
    for k, v in floors.items():
        check_int(f"min_rank[{k!r}]", v, low=1, where="lrpet")
    metric = "bn" if bn_rectification else None
    excl = [exclude] if isinstance(exclude, str) else list(exclude or [])
    special = sorted(set(per_layer) | set(floors))
    spec = []
    for glob in special:
        spec.append(Constrain(glob, _LRPETRank(per_layer.get(glob, P), floors.get(glob, default_floor),
                                               energy_transfer), view="channel", metric=metric,
                              exclude=excl or None, name=f"lrpet:{glob}"))
    spec.append(Constrain(targets, _LRPETRank(P, default_floor, energy_transfer), view="channel",
                          metric=metric, exclude=(excl + special) or None, name="lrpet:conv",
                          skip_unexportable=targets is nn.Conv2d))
    if include_linear:
        spec.append(Constrain(nn.Linear, _LRPETRank(P, default_floor, energy_transfer),
                              exclude=excl or None, name="lrpet:linear", skip_unexportable=True))
    return Solver(spec, mode="projection", every=every, skip_below=skip_below)
