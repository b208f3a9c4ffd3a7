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
``solver.describe()``.  :meth:`LRPETSolver.finalize` only truncates (``W <- Pi_r(W)``, no energy
transfer, no metric): the paper's inference split (Sec. III-E) is the plain truncated SVD of the
trained weight.  Export gives that two-layer split through :func:`admm_compress.export`.

Rank floors: ``min_rank="vgg16"`` is the rule of Sec. IV-B for VGG-16 ("the smallest ranks of the
first two layers [are] 2/3 of the original matrix ranks and the minimum ranks of the other
convolutional layers [are] the minimum rank of the second convolutional layer").
"""
from __future__ import annotations

import logging
from fractions import Fraction
from typing import Mapping

import torch
from torch import nn

from .._validation import check_float, check_int
from ..sets import LowRank
from ..solver import Solver
from ..graph import consumer_batchnorms
from ..specs import Binding, Constrain, resolve, unwrap

__all__ = ["lrpet", "lrpet_rank", "LRPETSolver", "BNMetric", "vgg16_rank_floors"]

log = logging.getLogger(__name__)


class BNMetric:
    """BN rectification (Eq. 7): the row scale ``a = gamma / sqrt(running_var + eps)`` of the
    BatchNorm that consumes each ``metric="bn"`` weight's output.

    The pairing follows the traced graph (:func:`admm_compress.graph.consumer_batchnorms`), not
    module order; a weight whose output no BatchNorm consumes is listed in :attr:`unpaired`
    (warned about once) and projected without the metric.  Any
    :class:`~admm_compress.Solver` whose spec sets ``metric="bn"`` uses this; :func:`lrpet`
    sets it by default (``bn_rectification=True``).
    """

    def __init__(self, model: nn.Module, bindings: list[Binding]):
        pairs = consumer_batchnorms(unwrap(model))
        mods = dict(unwrap(model).named_modules())
        self.bn: dict[str, nn.Module] = {}
        self.unpaired: list[str] = []
        for b in bindings:
            if b.spec.metric != "bn":
                continue
            if b.name in pairs:
                self.bn[b.key] = mods[pairs[b.name]]
            else:
                self.unpaired.append(b.key)
        if self.unpaired:
            log.warning("BN rectification: no BatchNorm consumes the output of %s; these are "
                        "projected without the BN metric", ", ".join(self.unpaired))

    def __call__(self, b: Binding) -> torch.Tensor | None:
        """``a`` for binding ``b`` (one entry per row of its view), or ``None`` if unpaired."""
        bn = self.bn.get(b.key)
        if bn is None:
            return None
        var = bn.running_var if bn.running_var is not None else torch.ones_like(bn.weight)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
        a = gamma.detach() / torch.sqrt(var.detach() + bn.eps)
        rows = b.viewed_shape[-2]
        if a.numel() != rows:
            raise ValueError(f"layer '{b.name}': BN {type(bn).__name__} has {a.numel()} channels but "
                             f"the view has {rows} rows; BN rectification needs the 'channel' view")
        return a


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


def vgg16_rank_floors(shapes: list[tuple[str, int]]) -> dict[str, int]:
    """LRPET Sec. IV-B rank floors for VGG-16: ``{layer: floor}`` from ``[(layer, full rank)]``.

    The first two layers (in the given order) get ``floor(2/3 * q)`` of their full matrix rank
    ``q = min(out, in*kh*kw)``; every other layer gets the second layer's floor (capped at its
    own full rank).  On the CIFAR VGG-16: conv 1 (64 x 27) -> 18, conv 2 (64 x 576) -> 42, all
    others 42.
    """
    if len(shapes) < 2:
        raise ValueError(f"vgg16_rank_floors: the rule needs at least two layers, got {len(shapes)}")
    floors = {}
    for i, (name, q) in enumerate(shapes):
        if i < 2:
            floors[name] = max(1, int(Fraction(2, 3) * q))
        else:
            floors[name] = min(q, floors[shapes[1][0]])
    return floors


class LRPETSolver(Solver):
    """Projected SGD (:class:`~admm_compress.Solver`, ``mode="projection"``) with LRPET's end.

    :meth:`finalize` truncates every weight to its rank (Eckart-Young, ``W <- Pi_r(W)``) without
    energy transfer and without the BN metric: those belong to the training-time projection
    (Eq. 6-10), while the inference split of Sec. III-E is the plain truncated SVD.  With
    ``every="epoch"`` the last projection ran after the last epoch and the weight already has
    rank ``r`` (then ``alpha = 1`` and the two agree); with ``every=T`` steps it may lie many
    steps back, and re-applying ``alpha > 1`` would scale the kept spectrum.

    ``rank_floor="vgg16"`` resolves the floors of :func:`vgg16_rank_floors` on the model at
    :meth:`prepare` (the targeted ``nn.Conv2d`` layers in registration order; other layers keep
    their floors).
    """

    def __init__(self, spec, *, every="epoch", skip_below=None, rank_floor: str | None = None):
        super().__init__(spec, mode="projection", every=every, skip_below=skip_below)
        self._user_spec = list(self.spec)
        self.rank_floor = rank_floor
        self.floors: dict[str, int] = {}
        self._finalizing = False

    def prepare(self, model: nn.Module) -> "LRPETSolver":
        self.spec = list(self._user_spec)
        if self.rank_floor == "vgg16":
            bindings = resolve(self.spec, model)
            shapes = [(b.name, min(b.viewed_shape[-2:])) for b in bindings if isinstance(b.module, nn.Conv2d)]
            self.floors = vgg16_rank_floors(shapes)
            spec = []
            for b in bindings:
                c = b.constraint
                glob = "".join(f"[{ch}]" if ch in "*?[" else ch for ch in b.name)
                floor = max(c.min_rank, self.floors.get(b.name, 1))
                spec.append(Constrain(glob, _LRPETRank(c.pruning_ratio, floor, c.energy_transfer),
                                      view=b.spec.view, metric=b.spec.metric, name=f"lrpet:{b.name}"))
            self.spec = spec
            log.info("lrpet: VGG-16 rank floors (Sec. IV-B): %s", self.floors)
        return super().prepare(model)

    def project_slot(self, sl, v, tau, metric=None, warm=True):
        if self._finalizing and isinstance(sl.constraint, LowRank):
            r = sl.constraint.rank_for(v.shape)
            return LowRank(rank=r).project(v)  # plain truncation, Sec. III-E
        return super().project_slot(sl, v, tau, metric, warm)

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """``W <- Pi_r(W)`` (truncated SVD, no energy transfer, no BN metric) for every weight."""
        self._finalizing = True
        try:
            return super().finalize(model)
        finally:
            self._finalizing = False

    def export_spec(self) -> list[Constrain]:
        """The spec with plain ``LowRank(rank=r)`` per layer (what :meth:`finalize` kept)."""
        self._require_prepared()
        return [Constrain("".join(f"[{ch}]" if ch in "*?[" else ch for ch in b.name),
                          LowRank(rank=b.constraint.rank_for(b.viewed_shape)), view=b.view,
                          name=f"lrpet:{b.name}") for b in self.bindings]

    def repr_fields(self) -> str:
        extra = f", rank_floor={self.rank_floor!r}" if self.rank_floor else ""
        return super().repr_fields() + extra


def lrpet(pruning_ratio: float = 0.6, *, energy_transfer: bool = True, bn_rectification: bool = True,
          every="epoch", targets=nn.Conv2d, include_linear: bool = False,
          per_layer: Mapping[str, float] | None = None, min_rank: int | str | Mapping[str, int] = 1,
          exclude=None, skip_below: float | None = 1e-4) -> LRPETSolver:
    """A :class:`LRPETSolver`: projected SGD with LRPET's rank rule, energy transfer and BN metric.

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
    min_rank : int, mapping glob -> int, or "vgg16"
        Per-layer rank floors.  ``"vgg16"``: the preset of Sec. IV-B (first two targeted layers
        ``>= 2/3`` of their full rank, every other one ``>=`` the second layer's floor; see
        :func:`vgg16_rank_floors`), resolved on the model at ``prepare``.
    exclude : glob or list of globs
        Layers left dense.
    skip_below : float or None
        Skip a layer whose largest singular value is below this (official code: 1e-4).
    """
    P = check_float("pruning_ratio", pruning_ratio, low=0.0, high=1.0, high_open=True, where="lrpet")
    per_layer = dict(per_layer or {})
    for k, v in per_layer.items():
        check_float(f"per_layer[{k!r}]", v, low=0.0, high=1.0, high_open=True, where="lrpet")
    rank_floor = None
    if isinstance(min_rank, str):
        if min_rank != "vgg16":
            raise ValueError(f"lrpet: min_rank={min_rank!r} is not allowed; give an int >= 1, a mapping "
                             f"glob -> int, or the preset 'vgg16'")
        rank_floor, min_rank = "vgg16", 1
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
    return LRPETSolver(spec, every=every, skip_below=skip_below, rank_floor=rank_floor)
