"""ADMM inside ordinary PyTorch training.

Every method of this library solves an instance of

.. math::

    \\min_W \\; f(W) + \\sum_l g_l(W_l)

with ``f`` the training loss and ``g_l`` the indicator of a set ``C_l`` (hard constraint) or a
penalty (soft constraint), by ADMM with an auxiliary ``Z`` and a scaled dual ``U`` per
constrained weight (Boyd et al. 2011, Sec. 3.1.1; Zhang et al. 2018 for DNN weights; the LC
toolkit's L-step / C-step split):

* W-step: SGD on ``f(W) + rho/2 ||W - Z + U||^2`` (the user's optimizer, ``K`` steps);
* Z-step: ``Z = prox_{g/rho}(W + U)`` (the projection onto ``C`` for a hard constraint);
* U-step: ``U = U + W - Z``;
* end: ``W = Pi_C(W)``, then optionally fine-tune with the structure kept.

``mode="projection"`` is projected SGD instead (LRPET, TRP): no penalty, no duals, and the hard
assignment ``W = Pi_C(W)`` every ``every`` steps.

The life cycle follows :mod:`torch.ao.pruning`: :meth:`Solver.prepare` -> (training with
:meth:`Solver.penalty` in the loss and :meth:`Solver.step` after each optimizer step) ->
:meth:`Solver.finalize` -> :func:`admm_compress.export`.  :meth:`Solver.fit` runs the whole loop
(:func:`admm_compress.trainer.fit`, the one trainer every method shares; the life cycle is the
:class:`~admm_compress.compressor.Compressor` protocol).

Example (your own loop)::

    solver = ac.Solver([ac.Constrain(nn.Linear, ac.LowRank(ratio=0.25))], rho=1e-2)
    solver.prepare(model)                       # Z = Pi(W), U = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + solver.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
            solver.step()                       # Z/U update when `every` steps have passed
        solver.epoch_end()                      # Z/U update when every="epoch"
    solver.finalize(model)                      # W = Pi(W): exactly feasible
    compact = ac.export(model, solver)          # builds from solver.export_spec()

Several processes (``torchrun``): :mod:`admm_compress.trainer` (the Z-step, U-step and hard
projections are computed on every rank and rank 0's result is broadcast, so all ranks hold
bit-identical ``W``, ``Z``, ``U``).

Size (~700 lines; the class ~590, 185 of them docstrings -- the parameters and how rho="auto",
the default cadence, settle and the BatchNorm pass fit together): the life-cycle hooks,
the Z/U/rho state and its checkpoint must agree, so they stay in one class; the splitting
strategies are in :mod:`.splitting`, the rho schedules in :mod:`.penalty`, the training loop in
:mod:`.trainer`, LRPET's BN metric in :mod:`.methods.lrpet`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import functional
from ._validation import check_choice, check_float, check_int
from .compressor import Compressor, FitContext
from .distributed import broadcast_ as _broadcast_
from .penalty import AdaptiveRho, GeometricRho
from .splitting import SPLITTINGS
from .sets.base import Constraint
from .specs import Binding, Constrain, describe, exact_glob, unwrap
from .trainer import History

__all__ = ["Solver", "History", "Slot"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Slot:
    """One tensor the ADMM splitting acts on: a constrained weight, or one component of a Sum.

    ``tensor()`` returns the live parameter (for a component of ``W = L + S``, the raw ``L`` or
    ``S`` parameter of the :class:`~admm_compress.structure.Additive` parametrization).
    """

    key: str
    binding: Binding
    constraint: Constraint
    tensor: Callable[[], torch.Tensor]

    @property
    def shape(self):
        return self.binding.shape

    @property
    def viewed_shape(self):
        return self.binding.viewed_shape

    def to_view(self, t):
        return self.binding.to_view(t)

    def from_view(self, t):
        return self.binding.from_view(t)


def _batchable(c: Constraint) -> bool:
    return bool(getattr(c, "broadcasts", False))


class Solver(Compressor):
    """ADMM (or projected SGD) for constrained training.

    Parameters
    ----------
    spec : Constrain or list of Constrain
        Which weights carry which constraint (see :class:`~admm_compress.Constrain`).
    rho : "auto", float or AdaptiveRho, default "auto"
        ADMM penalty parameter (per-spec ``Constrain(rho=...)`` overrides it).  ``"auto"``: a
        per-weight rho chosen and adapted from what the run measures
        (:class:`~admm_compress.penalty.AdaptiveRho`, see Notes); an ``AdaptiveRho(...)``
        instance sets its knobs.  A number: that rho (> 0 in ``mode="admm"``), constant or with
        ``rho_growth``, exactly as before.  Ignored in ``mode="projection"``.
    mode : {"admm", "projection"}
        ``"admm"``: penalty + Z/U steps.  ``"projection"``: projected SGD, the hard assignment
        ``W = alpha * Pi(W)`` at every update (LRPET Eq. 2/6, TRP), no penalty, no duals.
    every : "auto", "epoch" or int, default "auto"
        Z/U update (or projection) cadence: once per epoch (after the epoch's steps) or every
        ``every`` optimizer steps.  ``"auto"``: once per epoch, except that :meth:`fit` with
        ``rho="auto"`` in ADMM mode and fewer than :attr:`min_updates` epochs updates every
        ``epochs * len(loader) // min_updates`` steps instead (a short run needs several dual
        updates for the residual to close; see Notes), but never more often than every
        :meth:`response_steps` (20 at momentum 0.9) nor less often than once per epoch.  A
        cadence shorter than :meth:`response_steps` (an explicit ``every``) with ``rho="auto"``
        in :meth:`fit` takes the dual step ``U += gamma (W - Z)`` with ``gamma = every /
        response_steps`` (:attr:`dual_step`; 0.5 for ``every=10`` at momentum 0.9) instead of 1:
        the dual then integrates the residual no faster than heavy-ball W can follow it (a
        relaxed dual step, Glowinski's ADMM with ``gamma`` in ``(0, (1 + sqrt 5) / 2)``); and
        rho (``"auto"``) changes per update by at most ``factor ** (every / response_steps)``
        (:class:`~admm_compress.penalty.AdaptiveRho`), so it grows no faster per step than at
        the response-time cadence.
    rho_growth : float, default 1.0
        Numeric rho only: geometric schedule ``rho <- min(rho * rho_growth, rho_max)`` after
        every update (1 = constant).  On every rho change (geometric or adaptive) the scaled
        duals are rescaled by ``rho_old / rho_new`` so the unscaled dual ``rho * U`` is unchanged.
    rho_max : float, optional
        Cap of the geometric schedule, or an extra ceiling of ``rho="auto"``.
    tol : float, optional
        Stop :meth:`fit` early once the overall primal residual ``||W - Z|| / ||W||`` is below
        ``tol`` (ADMM mode).
    skip_below : float, optional
        Projection mode: leave a weight alone when its largest singular value is below this
        (LRPET's official code uses 1e-4).
    warm_start : bool, default True
        ``prepare`` sets ``Z = Pi(W)`` (direct compression, LC toolkit); otherwise ``Z = W``.
    settle : "auto" or float in [0, 1), default "auto"
        Fraction of :meth:`fit`'s ``epochs`` spent training *on* the constraint set: ADMM runs
        for the first ``epochs - ceil(settle * epochs)`` epochs (at least one), then the final
        projection, then the remaining epochs train the structured weights (the kept entries)
        at the training learning rate (a ``scheduler`` continues where the ADMM epochs left it),
        before ``finetune_epochs`` at ``lr / 10``.  ``"auto"`` (with ``rho="auto"`` in ADMM
        mode, hard sets only; a numeric rho, a soft penalty or projection mode keep the plain
        schedule): 0.5 when every constrained weight's structure trains like the dense weight
        (:attr:`~admm_compress.sets.Constraint.isometric_structure`: cardinality, pruning);
        0.8 when some are factor forms (low rank, TT, ``L + S``), whose factors settle at
        ``lr / 10`` (:meth:`slow_settle_parameters`) because they diverged at the dense learning
        rate -- low-rank factors and TT cores at ``0.3 lr`` with ScaledGD-preconditioned
        gradients (:attr:`precondition_factors`, :meth:`settle_lr_groups`) -- except that TT and
        ``L + S`` keep ADMM to the end in a run of :attr:`min_updates` (10) or more epochs
        (:attr:`~admm_compress.sets.Constraint.settles_long_runs`); and with ``every="auto"``
        an ADMM part with room for fewer than :attr:`min_admm_updates` (3) dual updates
        :meth:`response_steps` apart (60 optimizer steps at momentum 0.9) is dropped: every
        epoch settles, from the projection of the weights ``fit`` started with
        (:meth:`settle_epochs`).  See Notes.

    Notes
    -----
    Why ``rho="auto"`` is the default.  The W-step is a few SGD steps on
    ``f(W) + rho/2 ||W - Z + U||^2``, so what a numeric rho does depends on the loss's gradient
    scale, the weight's scale and the learning rate: on the digits FCN-8 at density 0.1 a
    constant rho of 1e-3 left ``||W - Z|| / ||W||`` at 2.0 and the final projection took the
    accuracy to 20 % (86 % after fine-tuning, 3-seed mean), rho 1 lost 25 points at density
    0.05, and the rho that works moves ~10x with the learning rate
    (docs/results/admm_vs_prune.md; "auto" matched the best of the constant grid there).  The
    adaptive rule (:class:`~admm_compress.penalty.AdaptiveRho`) measures instead of asking:

    * the first optimizer step runs with the penalty off and gives each weight's loss gradient
      ``g_l``; rho starts at ``||g_l|| / ||W_l - Z_l||`` (penalty pull = loss push, per weight:
      invariant to the loss's and the weight's scale), but at least ``(1 - beta) / (eta T)`` in
      a run of ``T`` steps, the pull that moves ``W`` by one heavy-ball time constant in the run
      (``AdaptiveRho(reach=1)``; from a pretrained model the balance started 10-300x lower);
    * a ceiling from the optimizer: the penalty is a quadratic of curvature rho, and heavy-ball
      SGD (lr ``eta``, momentum ``beta``) is critically damped on it at
      ``eta * rho = (1 - sqrt(beta))^2``; above that W rings around Z (measured: rho 1 at lr
      0.05, momentum 0.9 is 20x critical and lost 25 points), so ``rho <= 2 (1 - sqrt(beta))^2 /
      eta`` (0.105 at lr 0.05, 0.53 at lr 0.01; ``eta * rho <= 0.5`` without momentum);
    * after every Z/U update, rho per weight follows the relative primal residual towards a
      target that falls geometrically to 1e-3 by 70 % of the run (:meth:`fit` knows the
      length), multiplying rho by at most 2 per update -- per :meth:`response_steps` optimizer
      steps when Z/U are updated more often (residual balancing, Boyd et al. 2011,
      Sec. 3.4.1, with the noisy dual residual replaced by this closing schedule -- the LC
      toolkit's / ADMM-NN's increasing penalty with the rate set by feedback).

    Every change rescales ``U`` exactly; the adaptive state is in :meth:`state_dict`, so a
    resumed run equals an uninterrupted one.  Two defaults of :meth:`fit` go with it.  A short run
    (fewer than :attr:`min_updates` = 10 epochs, ``every="auto"``) updates Z/U every
    ``epochs * len(loader) // 10`` steps instead of once per epoch: the feedback changes rho at
    most 2x per update and the dual needs several updates, so three per-epoch updates (the
    digits32 ResNet-20 at 3 epochs) left ``||W - Z|| / ||W||`` at 0.5-0.7.  But not more often
    than heavy-ball's response time on the penalty, ``ceil(1 / (1 - sqrt(beta)))`` steps (20 at
    momentum 0.9; :meth:`response_steps`): with a dual update every 2 steps (the ResNet-20's one
    ADMM epoch) U integrated residuals the W-steps had no time to reduce, ``||W - Z|| / ||W||``
    grew from 0.75 to 1.6-2.0, and the low-rank run ended at 60.7 % against 78.5 % with the
    floor (docs/results/admm_vs_prune.md).  And in ADMM mode
    :meth:`fit` recomputes the BatchNorm running statistics (:attr:`bn_recalibration`) before the
    accuracy just before the final projection is measured, after the projection and after
    fine-tuning: on a conv -> BN layer the loss is scale-invariant, the penalty shrinks the weight
    faster than the running averages follow, and the eval-mode accuracy read 10-13 % where the
    network with recomputed statistics had 98-99 %.  With the ceiling reached the residual may stay
    above the target in a short run; :meth:`finalize` then logs a WARNING with the distance the
    final projection moved the weights, and :meth:`fit` records the accuracy just before
    (``history.final["before_finalize"]``) and after it.  A hand-written loop should call
    ``solver.rho_schedule.observe_optimizer(opt)`` and set ``solver.rho_schedule.horizon`` (steps)
    after :meth:`prepare`; without them momentum 0.9 and a per-update target are assumed.

    Why ``settle="auto"`` trains half of a pruning run on the set.  Even with the adaptive rule
    the residual of a short run stays open where a stiffer penalty would make SGD ring (the
    ceiling), and the weights the final projection produces then had far less training on their
    structure than "prune, then fine-tune" gives its mask: on the digits32 ResNet-20 (3 + 1
    epochs) pruning + masked fine-tuning reached 99.2 % at density 0.1 and ADMM to the end
    97.1 %; on the FCN-8 at lr 0.1 one seed ended at 85.8 %.  So for sets whose structure trains
    like the dense weight (cardinality: the kept entries are entries of W) :meth:`fit` ends the
    ADMM part at half of ``epochs`` (the adaptive target closes by 70 % of *that* part), projects,
    and trains the kept entries for the other half at the training learning rate (a scheduler
    continues), then fine-tunes at ``lr / 10`` -- ADMM-NN's "ADMM, hard prune, masked retraining"
    (Zhang et al. 2018) inside one budget: the ADMM part chooses the support and its values,
    where the peer takes them by magnitude from the dense weights.  Measured (3 seeds,
    docs/results/admm_vs_prune.md): see the README's table.  But the ADMM part needs room to
    be ADMM: in a run whose ADMM part would hold fewer than :attr:`min_admm_updates` (3) dual
    updates at the response-time cadence (the digits32 ResNet-20 bench: 1 epoch of 23 steps, one
    update) the penalty only pulled the weights for a few steps, and the epoch was lost to the
    mask: one epoch fewer on the mask than the peer, -0.28 to +0.09 points against it, 4 of 8
    rows below (densities 0.2 / 0.1, both budget scopes, 6 seeds).  ``settle="auto"`` with
    ``every="auto"`` then settles every epoch ("prune, then train the mask", the final projection
    of the starting weights): -0.05 to +0.37 against the peer, +0.17 on average over the ADMM
    part it replaced (8 rows; same machine and seeds).  Factor forms settle too, for 0.8
    of ``epochs``, the factors at ``lr / 10`` (everything else at ``lr``): a step on the
    factors of
    ``W = A B`` moves ``W`` by up to ``2 sigma_1`` times the dense step, so they diverged at the
    dense learning rate (FCN-8, lr 0.05 and 0.1; the SVD + fine-tuning peer diverged there too),
    and on the FCN-8 at rank 24 the projection of the ADMM weights was no better a start than the
    SVD of the pretrained ones (41.5 vs 43.7 %), while the factors needed many epochs at the
    smaller step: ADMM to the end gave 79.5 % (one seed 52.8) against 96.8 % for SVD + factor
    fine-tuning; on the digits32 ResNet-20 bench (4 + 1 epochs) settling lifted admm_lowrank
    from 90.3 to 99.4 %, admm_tt from 50.6 to 96.9 % and RASPA from 63.6 to 98.6 %.  TT and
    ``L + S`` do not settle in runs of :attr:`min_updates` or more epochs
    (:attr:`~admm_compress.sets.Constraint.settles_long_runs`): on the digits FCN bench (30
    epochs at lr 0.02) settling their factors lost 6.3 / 2.5 points against ADMM to the end,
    where low rank was unchanged (96.1 vs 96.0 %).  A callback that stops training skips the
    settle epochs.  Since 2026-12-04 the low-rank factors and TT cores settle at ``0.3 lr`` with
    ScaledGD-preconditioned gradients (:attr:`precondition_factors`): the step on each factor is
    rescaled by the inverse Gram matrices of the others, so that it moves ``W`` by the dense step
    projected on the factors' column / row spaces (Tong, Ma & Chi, JMLR 2021) instead of
    ``2 sigma_1`` times it along the leading directions and ``sigma_r`` times it along the
    weakest; the FCN-8 low rank at lr 0.1 went from 95.25 to 97.25 % (10 seeds), the ResNet-20
    low rank from 80.32 to 82.13 % (6 seeds), ``admm_tt`` / RASPA on the digits32 ResNet-20
    bench from 96.48 / 97.78 to 97.69 / 98.24 % (seeds 0-2).

    With a numeric rho the primal residual closes only when rho is large against the loss's
    curvature (tests use ``rho`` above the Lipschitz constant of the least-squares gradient);
    a geometric ``rho_growth`` (1.1-1.5 per update) closes any gap in finite time, and
    :meth:`finalize` makes the weights exactly feasible in any case.
    """

    def __init__(self, spec, rho: Any = "auto", *, mode: str = "admm", every: Any = "auto",
                 rho_growth: float = 1.0, rho_max: float | None = None, tol: float | None = None,
                 skip_below: float | None = None, warm_start: bool = True, settle: Any = "auto"):
        super().__init__(spec)
        self.mode = check_choice("mode", mode, tuple(SPLITTINGS), where="Solver")
        self.splitting = SPLITTINGS[self.mode]()
        self.rho_growth = check_float("rho_growth", rho_growth, low=1.0, where="Solver")
        self.rho_max = None if rho_max is None else check_float("rho_max", rho_max, low=0.0, low_open=True,
                                                                 where="Solver")
        if isinstance(rho, AdaptiveRho) or (isinstance(rho, str) and rho == "auto"):
            if self.rho_growth != 1.0:
                raise ValueError(f"Solver: rho_growth={self.rho_growth:g} needs a numeric rho; rho='auto' "
                                 f"adapts rho itself (set rho to a number to use a geometric schedule)")
            self.rho = "auto"
            self.rho_schedule = rho if isinstance(rho, AdaptiveRho) else AdaptiveRho(rho_max=self.rho_max)
        else:
            if isinstance(rho, str):
                raise TypeError(f"Solver: rho must be a real number, got {rho!r} (or the string 'auto' for "
                                f"the adaptive penalty)")
            self.rho = check_float("rho", rho, low=0.0, where="Solver")
            self.rho_schedule = GeometricRho(self.rho_growth, self.rho_max)
        self.fixed_schedule = GeometricRho(self.rho_growth, self.rho_max)  # per-spec numeric rho overrides
        if self.mode == "admm":
            for s in self.spec:
                r = self.rho if s.rho is None else s.rho
                if r != "auto" and r <= 0:
                    raise ValueError(f"Solver: rho={r} for {s.label}; ADMM needs rho > 0 "
                                     f"(use mode='projection' for projected SGD without a penalty)")
        if every not in ("epoch", "auto"):
            every = check_int("every", every, low=1, where="Solver")
        self.every = every
        self.every_steps: int | None = every if isinstance(every, int) else None  # the cadence in use
        self.dual_step = 1.0  # gamma of U += gamma (W - Z); set per fit run (on_fit_start)
        self.tol = None if tol is None else check_float("tol", tol, low=0.0, low_open=True, where="Solver")
        self.skip_below = None if skip_below is None else check_float("skip_below", skip_below, low=0.0,
                                                                      where="Solver")
        self.warm_start = bool(warm_start)
        if not (isinstance(settle, str) and settle == "auto"):
            if isinstance(settle, str):
                raise TypeError(f"Solver: settle must be 'auto' or a fraction in [0, 1), got {settle!r}")
            settle = check_float("settle", settle, low=0.0, high=1.0, high_open=True, where="Solver")
        self.settle = settle
        self.auto_keys: set[str] = set()
        self.slots: list[Slot] = []
        self.global_groups: list[list[Slot]] = []  # Cardinality(scope="global") slots, one list per budget
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.rhos: dict[str, float] = {}
        self.bn_metric = None  # methods.lrpet.BNMetric when a spec asks for metric="bn"

    # ================================================================ life cycle
    def prepare(self, model: nn.Module) -> "Solver":
        """Resolve the spec on ``model`` and initialize ``Z = Pi(W)``, ``U = 0``.

        Raises before touching the model if any spec cannot be applied.
        """
        super().prepare(model)
        bindings = self.bindings
        self.bn_metric = None
        if any(b.spec.metric == "bn" for b in bindings):
            from .methods.lrpet import BNMetric  # LRPET's rectification (Eq. 7), spec field metric="bn"
            self.bn_metric = BNMetric(model, bindings)
        self.slots = self.make_slots(bindings)
        self.global_groups = self._group_global(self.slots)
        self.Z, self.U, self.rhos = {}, {}, {}
        self.auto_keys = set()
        for sl in self.slots:
            b = sl.binding
            if b.spec.rho is None and self.rho == "auto":
                self.auto_keys.add(sl.key)
                self.rhos[sl.key] = 0.0  # penalty off until the first step has measured the scales
            else:
                self.rhos[sl.key] = float(self.rho if b.spec.rho is None else b.spec.rho)
        if self.rho == "auto":
            self.rho_schedule.reset()
            if self.mode == "admm" and self.auto_keys:
                self.rho_schedule.snapshot({sl.key: sl.tensor() for sl in self.slots if sl.key in self.auto_keys})
        self.splitting.start(self)
        log.info("prepared %d constrained weight(s):\n%s", len(bindings), describe(bindings))
        return self

    def make_slots(self, bindings: list[Binding]) -> list[Slot]:
        """One slot per weight; a Sum constraint in ADMM mode gets one slot per component.

        For a Sum, the weight is reparameterized as ``W = L + S`` (:class:`Additive`) unless it
        already is, so each component has its own Z/U pair (RASPA Eq. 10-13).
        """
        from torch.nn.utils import parametrize

        from .sets import Sum
        from .structure import Additive, additive_components

        slots = []
        for b in bindings:
            c = b.constraint
            if isinstance(c, Sum) and self.mode == "admm":
                if additive_components(b.module, b.param_name) is None:
                    if parametrize.is_parametrized(b.module, b.param_name):
                        raise ValueError(f"layer '{b.name}': '{b.param_name}' is already parametrized; "
                                         f"a Sum constraint needs to reparameterize it as L + S")
                    parametrize.register_parametrization(b.module, b.param_name,
                                                         Additive(c, b.view, b.shape), unsafe=True)
                for i, part in enumerate(("L", "S")):
                    getter = (lambda m=b.module, n=b.param_name, i=i: additive_components(m, n)[i])
                    slots.append(Slot(f"{b.key}#{part}", b, c.sets[i], getter))
            else:
                slots.append(Slot(b.key, b, c, (lambda b=b: b.param)))
        return slots

    @staticmethod
    def _group_global(slots: list[Slot]) -> list[list[Slot]]:
        """The slots of each ``Cardinality(scope="global")`` instance (one shared budget per list);
        refuses what cannot share a budget, before any work."""
        from .specs import SpecError

        groups: dict[int, list[Slot]] = {}
        for sl in slots:
            if getattr(sl.constraint, "is_global", False):
                if sl.binding.spec.metric is not None:
                    raise SpecError(f"layer '{sl.binding.name}': {sl.constraint!r} with metric="
                                    f"{sl.binding.spec.metric!r}: a shared budget is projected in the plain "
                                    f"Euclidean norm; drop metric= or use scope='layer'")
                groups.setdefault(id(sl.constraint), []).append(sl)
        return list(groups.values())

    def joint_project(self, views: dict[str, torch.Tensor] | None = None,
                      weighted: bool = False) -> dict[str, torch.Tensor]:
        """The joint projection of every ``Cardinality(scope="global")`` group, per slot key, in
        viewed shape (``views``: the slots' viewed tensors, every key of a group present; default:
        the live weights).

        ``weighted``: the ADMM Z-step, ``argmin sum_b rho_b ||Z_b - V_b||^2`` over the shared
        budget (keeps the largest ``rho_b v^2``; unweighted while any rho is still 0); otherwise the
        Euclidean projection (the largest ``|w|``: finalize, projected SGD).
        """
        out = {}
        for group in self.global_groups:
            xs = [sl.to_view(sl.tensor().detach()) if views is None else views[sl.key] for sl in group]
            w = [self.rhos[sl.key] for sl in group] if weighted else None
            if w is not None and not all(r > 0 for r in w):
                w = None
            for sl, x, m in zip(group, xs, group[0].constraint.joint_masks(xs, w)):
                out[sl.key] = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return out

    def describe(self) -> str:
        """Table of the bound weights (layer, shape, view, constraint, dense and compressed size)."""
        text = super().describe()
        if self.unpaired:
            text += "\nprojected without BN metric (no consumer BatchNorm): " + ", ".join(self.unpaired)
        return text

    @property
    def unpaired(self) -> list[str]:
        """Keys of the ``metric="bn"`` weights with no consumer BatchNorm (projected without it)."""
        return list(self.bn_metric.unpaired) if self.bn_metric is not None else []

    # -------------------------------------------------------------- operators
    def slot_metric(self, sl: Slot) -> torch.Tensor | None:
        """The row metric the slot is projected in (``metric="bn"`` specs: LRPET's BN
        rectification, :class:`~admm_compress.methods.lrpet.BNMetric`), or ``None``."""
        if self.bn_metric is None or sl.key != sl.binding.key:
            return None
        return self.bn_metric(sl.binding)

    def project_slot(self, sl: Slot, v: torch.Tensor, tau: float, metric=None, warm: bool = True) -> torch.Tensor:
        """The Z-step / hard-projection operator on one slot's viewed tensor: ``prox_{tau g}(v)``
        (the projection for a set; in ``metric`` when given; ``v`` itself before warm start).

        The hook a configuration overrides to change the operator (TRP's energy truncation with
        its subgradient, LRPET's plain truncation at finalize).  Slots of equal shape are
        projected as one batch only while this base operator is in use.
        """
        c = sl.constraint
        if not warm:
            return v.clone()
        if metric is not None:
            return c.project(v, metric=metric)
        return c.prox(v, tau)

    def zstep(self, V: dict[str, torch.Tensor], warm: bool = True) -> dict[str, torch.Tensor]:
        """``prox(V_b)`` for every binding, in parameter shape; SVDs of equal shapes are batched."""
        out: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[Slot]] = defaultdict(list)
        base_operator = type(self).project_slot is Solver.project_slot  # an override sees every slot
        joint = {sl.key for g in self.global_groups for sl in g}
        if joint:  # Cardinality(scope="global"): one budget over its layers, in the rho-weighted norm
            views = {sl.key: sl.to_view(V[sl.key]) for g in self.global_groups for sl in g}
            res = self.joint_project(views, weighted=True) if warm else {k: v.clone() for k, v in views.items()}
            for g in self.global_groups:
                for sl in g:
                    out[sl.key] = sl.from_view(res[sl.key])
        for sl in self.slots:
            if sl.key in joint:
                continue
            metric = self.slot_metric(sl)
            k = sl.key
            if base_operator and _batchable(sl.constraint) and metric is None and warm:
                # a hard set's projection ignores rho: per-weight rhos (rho="auto") still batch
                rk = self.rhos[k] if sl.constraint.is_penalty else 0.0
                groups[(id(sl.constraint), sl.viewed_shape, V[k].dtype, V[k].device, rk)].append(sl)
            else:
                tau = 1.0 / self.rhos[k] if self.rhos[k] > 0 else 0.0
                out[k] = sl.from_view(self.project_slot(sl, sl.to_view(V[k]), tau, metric, warm))
        for (_, _, _, _, rho), group in groups.items():
            tau = 1.0 / rho if rho > 0 else 0.0
            stacked = torch.stack([sl.to_view(V[sl.key]) for sl in group])
            res = group[0].constraint.prox(stacked, tau)
            for i, sl in enumerate(group):
                out[sl.key] = sl.from_view(res[i])
        return out

    def penalty(self) -> torch.Tensor:
        """``sum_b rho_b / 2 * ||W_b - Z_b + U_b||_F^2`` (0 in projection mode); differentiable in W."""
        self._require_prepared()
        return self.splitting.penalty(self)

    def step(self) -> bool:
        """Call after every optimizer step; runs :meth:`update` every ``every`` steps.

        Returns whether an update ran.
        """
        self._require_prepared()
        self.steps += 1
        if self.auto_keys and self.mode == "admm" and self.rho_schedule.needs_calibration():
            self._calibrate_rho()
        if self.every_steps is not None and self.steps % self.every_steps == 0:
            self.update()
            return True
        return False

    @torch.no_grad()
    def _calibrate_rho(self) -> None:
        """rho='auto': starting rho per weight from the step just taken (penalty off, so the
        gradients are the loss's own; see :class:`~admm_compress.penalty.AdaptiveRho`)."""
        slots = [sl for sl in self.slots if sl.key in self.auto_keys]
        W = {sl.key: sl.tensor() for sl in slots}
        grads = {sl.key: (None if getattr(W[sl.key], "grad", None) is None else W[sl.key].grad) for sl in slots}
        new = self.rho_schedule.calibrate(W, grads, self.Z)
        if new is not None:
            for k, v in new.items():
                self.set_rho(k, v)

    def set_rho(self, key: str, new: float) -> None:
        """``rho_key <- new`` with the scaled dual rescaled, ``U <- U * rho_old / rho_new``, so the
        unscaled dual ``rho * U`` is unchanged (Boyd et al. 2011, Sec. 3.4.1)."""
        old = self.rhos[key]
        if new == old:
            return
        if key in self.U:
            self.U[key].mul_(old / new)
        self.rhos[key] = float(new)

    def epoch_end(self) -> bool:
        """Call at the end of every epoch; runs :meth:`update` when ``every="epoch"``."""
        self._require_prepared()
        self.epochs_done += 1
        if self.every_steps is None:
            self.update()
            return True
        return False

    @torch.no_grad()
    def update(self) -> dict:
        """One Z-step and U-step (ADMM) or one hard projection (projection mode), now.

        Returns the residual record (also appended to ``self.residuals``).
        """
        self._require_prepared()
        rec = self.splitting.update(self)
        self.n_updates += 1
        self.residuals.append(rec)
        self._warn_if_stalled()
        return rec

    def _warn_if_stalled(self):
        """Warn once when rho is too small for the primal residual to ever close."""
        if self.mode != "admm" or getattr(self, "_warned", False) or len(self.residuals) < 6 or self.rho == "auto":
            return
        r = [x["primal"] for x in self.residuals]
        if r[-1] > 1e-3 and r[-1] > 0.9 * r[-6] and self.rho_growth == 1.0:
            self._warned = True
            log.warning("ADMM primal residual ||W - Z||/||W|| = %.3g has not fallen over the last 5 "
                        "updates (was %.3g): rho=%.3g is likely too small to close the gap; raise rho "
                        "or set rho_growth > 1", r[-1], r[-6], max(self.rhos.values()))

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> dict[str, bool]:
        """Hard end: ``W = Pi_C(W)`` for sets, ``W = prox(W + U)`` for penalties.

        Returns ``{key: feasible}`` checked with ``contains``.  Sets :attr:`projection_distance`
        to ``||W - Pi(W)|| / ||W||`` over the hard-constrained weights (how far this projection
        moved them: the accuracy it may cost) and, in ADMM mode after training, logs a WARNING
        when it exceeds :attr:`finalize_warn_above` (the primal residual had not closed).
        """
        self._require_prepared()
        if model is not None and unwrap(model) is not self._model_ref:
            raise ValueError("finalize(model): this is not the model the solver was prepared on")
        feasible = {}
        moved: dict[str, tuple[float, float]] = {}
        joint = self.joint_project()  # Cardinality(scope="global"): one budget over its layers
        for sl in self.slots:
            w = sl.tensor()
            c = sl.constraint
            v = sl.to_view(w.detach())
            if c.is_penalty:
                tau = 1.0 / self.rhos[sl.key] if self.rhos[sl.key] > 0 else 0.0
                base = v + sl.to_view(self.U[sl.key]) if sl.key in self.U else v
                p = sl.from_view(c.prox(base, tau)).contiguous()
                _broadcast_([p])
                w.copy_(p)
                feasible[sl.key] = True
                continue
            if sl.key in joint:
                p = sl.from_view(joint[sl.key]).contiguous()
            else:
                p = sl.from_view(self.project_slot(sl, v, 0.0, self.slot_metric(sl))).contiguous()
            _broadcast_([p])
            moved[sl.key] = (float(torch.linalg.vector_norm(w.detach() - p)),
                             float(torch.linalg.vector_norm(w.detach())))
            w.copy_(p)
            if sl.key not in joint:
                feasible[sl.key] = self.slot_feasible(sl, sl.to_view(w.detach()))
        for g in self.global_groups:  # a shared budget is feasible as a whole
            per = {sl.key: int(torch.count_nonzero(sl.tensor().detach())) for sl in g}
            ok = sum(per.values()) <= g[0].constraint.global_k([sl.tensor().numel() for sl in g])
            feasible.update({sl.key: ok for sl in g})
            empty = [k for k, n in per.items() if n == 0]
            if empty:
                log.warning("finalize: the shared budget of %r left no entries in %d layer(s): %s (their outputs "
                            "are their biases); use scope='layer' for those layers, a larger density, or exclude "
                            "them", g[0].constraint, len(empty), ", ".join(empty))
        bad = [k for k, ok in feasible.items() if not ok]
        if bad:
            log.warning("after finalize, %d weight(s) fail contains(): %s", len(bad), ", ".join(bad))
        self._report_projection(moved)
        return feasible

    #: ADMM mode: :meth:`fit` recomputes the BatchNorm running statistics on the training data
    #: (:func:`~admm_compress.training.recalibrate_bn`, 20 batches, RNG states restored) before
    #: measuring the accuracy just before the final projection, after the projection and after
    #: fine-tuning.  The penalty shrinks the weights of conv -> BN layers (their loss is
    #: scale-invariant) faster than the running averages follow: measured on the digits32
    #: ResNet-20 (seed 0, density 0.1, rho 0.1) one ADMM epoch shrank every conv weight by 27 %,
    #: the running variances were 1.5-2x the true ones and the test accuracy read 13 % in eval
    #: mode against 98 % with recomputed statistics.  Set to False to keep the running averages.
    bn_recalibration: bool = True

    def wants_bn_recalibration(self) -> bool:
        """Whether :func:`~admm_compress.trainer.fit` recomputes BatchNorm statistics around
        :meth:`finalize` (ADMM mode with :attr:`bn_recalibration`)."""
        return self.bn_recalibration and self.mode == "admm"

    #: :meth:`finalize` warns when the final projection moves the weights by more than this
    #: (relative Frobenius distance ``||W - Pi(W)|| / ||W||``).
    finalize_warn_above: float = 0.1

    def _report_projection(self, moved: dict[str, tuple[float, float]]) -> None:
        """Record how far the final projection moved the weights; warn when ADMM left a gap."""
        if not moved:
            self.projection_distance = None
            return
        num = sum(d * d for d, _ in moved.values())
        den = sum(n * n for _, n in moved.values())
        self.projection_distance = math.sqrt(num / max(den, 1e-24))
        if self.mode != "admm" or self.n_updates == 0 or self.projection_distance <= self.finalize_warn_above:
            return
        worst = max(moved, key=lambda k: moved[k][0] / max(moved[k][1], 1e-12))
        rel = moved[worst][0] / max(moved[worst][1], 1e-12)
        if self.settle_next:  # fit's settle stage trains on the set next: the gap is expected here
            log.info("finalize: the final projection moved the constrained weights by ||W - Pi(W)||/||W|| = "
                     "%.3g (largest: %s, %.3g); the %d settle epoch(s) train on the set next",
                     self.projection_distance, worst, rel, self.settle_next)
            return
        if self.rho == "auto":
            what = ("train longer or update Z/U more often (every=N steps) so the adaptive rho can close "
                    "the gap, or fine-tune afterwards (finetune_epochs)")
        else:
            what = (f"use rho='auto' (the default), a larger rho (now up to {max(self.rhos.values()):.3g}) or "
                    f"rho_growth > 1, train longer, or fine-tune afterwards (finetune_epochs)")
        log.warning("finalize: the ADMM primal residual had not closed: the final projection moved the "
                    "constrained weights by ||W - Pi(W)||/||W|| = %.3g (largest: %s, %.3g), which may cost "
                    "accuracy; %s", self.projection_distance, worst, rel, what)

    # ------------------------------------------------------------------ export
    def export_spec(self) -> list[Constrain]:
        """The specs :func:`admm_compress.export` builds compact layers from (default: :attr:`spec`).

        A rank rule that reads the data (``LowRank(energy=...)``) is not idempotent: applied again
        at export to the finalized weight it could cut further.  After ``prepare``, such a layer is
        pinned to the rank its finalized weight has (``LowRank(rank=k)``, one exact spec per
        layer), so the exported model equals the finalized one.  Methods whose final structure is
        chosen during training (TRP's energy ranks, LoRITa's truncation) override this.
        """
        from .sets import LowRank

        if not self.bindings or not any(isinstance(b.constraint, LowRank) and b.constraint.energy is not None
                                        for b in self.bindings):
            return list(self.spec)
        out = []
        for b in self.bindings:
            c = b.constraint
            if isinstance(c, LowRank) and c.energy is not None:
                c = LowRank(rank=functional.numerical_rank(b.to_view(b.param.detach())))
            out.append(Constrain(exact_glob(b.name), c, view=b.view, param=b.param_name, rho=b.spec.rho,
                                 metric=b.spec.metric, name=f"{b.spec.name or 'spec'}:{b.name}"))
        return out

    def repr_fields(self) -> str:
        """The settings :meth:`__repr__` shows (subclasses name their own)."""
        rho = self.rho if self.rho == "auto" else f"{self.rho:g}"
        extra = f", rho={rho}" if self.mode == "admm" else ""
        if self.mode == "admm" and self.rho_growth != 1.0:
            extra += f", rho_growth={self.rho_growth:g}"
        return f"mode={self.mode!r}, specs={len(self.spec)}{extra}, every={self.every!r}"

    def slot_feasible(self, sl, v: torch.Tensor) -> bool:
        """Whether the finalized view ``v`` of slot ``sl`` lies in its set (``contains``).

        Subclasses whose set is a selection rule rather than a projection (TRP's energy rank)
        override this.
        """
        return sl.constraint.contains(v, atol=1e-4, rtol=1e-4)

    # ------------------------------------------------------------------ state
    def state_keys(self) -> list[str]:
        """One key per slot (a Sum constraint's weight has ``key#L`` and ``key#S``)."""
        return [sl.key for sl in self.slots]

    def state_dict(self) -> dict:
        """Z, U, rho per weight, the rho schedule and the counters: everything needed to resume."""
        sd = super().state_dict()
        sd.update({"Z": {k: v.clone() for k, v in self.Z.items()},
                   "U": {k: v.clone() for k, v in self.U.items()},
                   "rhos": dict(self.rhos), "mode": self.mode, "rho_schedule": self.rho_schedule.state_dict()})
        return sd

    def check_state(self, sd: dict) -> str | None:
        if sd.get("mode") != self.mode:
            return f"was written by a solver with mode={sd.get('mode')!r}; this solver has mode={self.mode!r}"
        return None

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (call after :meth:`prepare` on the same architecture).

        Everything is checked before anything is changed: a state that does not fit raises
        ``TypeError``/``ValueError`` and leaves the solver as it was.
        """
        self._require_prepared()
        if not isinstance(sd, dict):
            raise TypeError(f"load_state_dict: sd must be a dict from Solver.state_dict(), got {type(sd).__name__}")
        missing = [k for k in ("Z", "U", "rhos", "steps", "epochs_done", "n_updates", "keys", "mode") if k not in sd]
        if missing:
            raise ValueError(f"load_state_dict: sd lacks {missing}; it is not a Solver.state_dict()")
        keys = self.state_keys()
        if list(sd["keys"]) != keys:
            raise ValueError(f"solver state is for weights {sd['keys']}, but this solver binds {keys}")
        if sd["mode"] != self.mode:
            raise ValueError(f"solver state is for mode={sd['mode']!r}, this solver has mode={self.mode!r}")
        new = {"Z": dict(self.Z), "U": dict(self.U)}
        for sl in self.slots:
            ref = sl.tensor()
            for name in ("Z", "U"):
                if sl.key in sd[name]:
                    t = sd[name][sl.key]
                    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
                        raise ValueError(f"solver state {name}[{sl.key}] has shape "
                                         f"{tuple(getattr(t, 'shape', ()))}, the weight has {tuple(ref.shape)}")
                    new[name][sl.key] = t.to(device=ref.device, dtype=ref.dtype).clone()
        if set(sd["rhos"]) != set(keys):
            raise ValueError(f"solver state has rho for {sorted(sd['rhos'])}, this solver binds {keys}")
        if self.rho == "auto" and self.mode == "admm" and self.auto_keys:
            if not isinstance(sd.get("rho_schedule"), dict) or "calibrated" not in sd["rho_schedule"]:
                raise ValueError("solver state lacks the adaptive rho state ('rho_schedule'); it was written by "
                                 "a solver with a numeric rho")
            self.rho_schedule.load_state_dict(sd["rho_schedule"])
        super().load_state_dict(sd)
        self.Z, self.U = new["Z"], new["U"]
        self.rhos = {k: float(v) for k, v in sd["rhos"].items()}

    # ----------------------------------------------------------- trainer hooks
    #: ``every="auto"``: the fewest Z/U updates a :meth:`fit` run with ``rho="auto"`` gets (shorter
    #: runs update every ``horizon // min_updates`` steps instead of once per epoch).
    min_updates: int = 10

    #: ``settle="auto"``: the fewest dual updates, :meth:`response_steps` apart, an ADMM part of a
    #: :meth:`fit` run must have room for; a shorter one is dropped (see :meth:`settle_epochs`).
    min_admm_updates: int = 3

    #: ``settle="auto"``: the fraction used when it applies (see the ``settle`` parameter):
    #: ``auto_settle`` when every structure trains like the dense weight (pruning),
    #: ``auto_settle_factors`` when some are factor forms (low rank, TT, L + S).
    auto_settle: float = 0.5
    auto_settle_factors: float = 0.8

    def settle_fraction(self) -> float:
        """The ``settle`` fraction in use (``"auto"`` resolved on the prepared bindings)."""
        if self.settle != "auto":
            return float(self.settle)
        if self.mode != "admm" or self.rho != "auto" or not self.bindings:
            return 0.0
        if any(b.constraint.is_penalty for b in self.bindings):
            return 0.0  # a soft penalty has no structure to settle on
        factors = any(not b.constraint.isometric_structure for b in self.bindings)
        return self.auto_settle_factors if factors else self.auto_settle

    def slow_settle_parameters(self, model: nn.Module) -> list:
        """The trainable factors of every weight whose structure is not
        :attr:`~admm_compress.sets.Constraint.isometric_structure` (low rank, TT, L + S): in the
        settle epochs they train at :attr:`slow_settle_lr_scale` (0.1) times the learning rate,
        the kept entries of a pruned weight and all unconstrained parameters at the rate itself."""
        return [p for b in self._factor_bindings() for p in b.module.parametrizations[b.param_name].parameters()]

    def _factor_bindings(self) -> list:
        """The bindings structured as factors right now (hard sets whose structure is not
        :attr:`~admm_compress.sets.Constraint.isometric_structure`, with a live
        :func:`~admm_compress.parametrizations.structure`)."""
        from .parametrizations import factored

        return [b for b in self.bindings if not (b.constraint.isometric_structure or b.constraint.is_penalty)
                and factored(b.module, b.param_name) is not None]

    #: Whether the settle and fine-tuning epochs of a settling run (:meth:`settle_fraction` > 0)
    #: train factors with their set's
    #: :meth:`~admm_compress.sets.Constraint.factor_grams` (low rank: ScaledGD;
    #: TT: ScaledGD per core; ``L + S``: its L part's).  Tuned with SGD (momentum 0.9); an
    #: Adam-type optimizer gets the same preconditioned gradients (Zhang & Pilanci, ICML 2024,
    #: use them with AdamW): FCN-8 low rank with ``Adam`` at lr 1e-3 / 3e-3 (8 seeds) 79.97 /
    #: 95.38 % against 68.99 / 90.00 with plain factors at lr / 10.
    precondition_factors: bool = True

    #: Learning-rate multiplier of the preconditioned factors in the settle epochs: a positive
    #: number, or ``"auto"`` (default): ``min(1, preconditioned_settle_max_lr / lr)``
    #: (:meth:`preconditioned_lr_scale`; ``lr`` the settle optimizer's learning rate), i.e. the
    #: factors settle at the training lr up to an absolute cap.  ScaledGD moves the weight by at
    #: most twice a dense step on the rank-r tangent space whatever the factors' scale, but a
    #: step also moves the factors by up to ``1 / damping`` times more along their weakest
    #: directions, and that second-order part, not the weight-space curvature, is what diverged:
    #: on the digits FCN-8 low rank (``benchmarks/admm_vs_prune.py``, 10 seeds) runs failed once
    #: the factors' rate passed about 0.04-0.05 (0.5 at lr 0.1: two collapses of ten; 1.0 at lr
    #: 0.05: 86.31 %; 4.0 at lr 0.01: 94.69) whatever the training lr, while below it the
    #: faster the better (lr 0.01: 95.58 % at 0.3, 96.19 at 1.0; lr 0.05: 96.44 at 0.3, 97.00 at
    #: 0.6).  So a multiplier proportional to lr loses at one end (the plain factors' lr / 10,
    #: or 0.3, at lr 0.01), and a cap does not: ``"auto"`` reads 96.19 / 97.00 / 97.25 % at lr
    #: 0.01 / 0.05 / 0.1 against 0.3's 95.58 / 96.44 / 97.25, and ResNet-20 low rank (digits32,
    #: lr 0.05, 6 seeds) 86.11 against 82.13 (every seed up).  With Adam (FCN low rank, 8 seeds)
    #: lr 1e-3 / 3e-3 read 94.65 / 97.15 % against 79.10 / 95.31 at 0.3.
    preconditioned_settle_lr_scale: float | str = "auto"

    #: The cap of ``preconditioned_settle_lr_scale="auto"``: the preconditioned factors never
    #: settle at a learning rate above this (the stable range measured above, with the
    #: cross-entropy loss; a loss scaled by ``c`` scales it by ``1 / c``, as it does any SGD lr).
    preconditioned_settle_max_lr: float = 0.03

    def preconditioned_lr_scale(self, lr: float) -> float:
        """The settle epochs' learning-rate multiplier of the preconditioned factors when the
        settle optimizer starts at ``lr``: :attr:`preconditioned_settle_lr_scale`, or with
        ``"auto"`` ``min(1, preconditioned_settle_max_lr / lr)``."""
        scale = self.preconditioned_settle_lr_scale
        if scale != "auto":
            return float(scale)
        return min(1.0, self.preconditioned_settle_max_lr / lr) if lr > 0 else 1.0

    def preconditions(self) -> bool:
        """Whether :meth:`finetune_structure` registers the factor preconditioners."""
        return bool(self.precondition_factors) and self.settle_fraction() > 0

    def settle_lr_groups(self, model: nn.Module) -> list[tuple[list, Any]]:
        """:meth:`slow_settle_parameters` in up to two groups: in a run that :meth:`preconditions`,
        the factors with a gradient preconditioner (low-rank factors, TT cores, the TT cores of
        an ``L + S``; :func:`~admm_compress.parametrizations.factor_grad_maps`) at
        :meth:`preconditioned_lr_scale` of the settle lr (``"auto"``: ``min(1, 0.03 / lr)``), the
        others (the values of ``L + S``'s sparse part) at :attr:`slow_settle_lr_scale` (0.1)."""
        from .parametrizations import factor_grad_maps

        if not self.preconditions():
            return super().settle_lr_groups(model)
        fast: list = []
        slow: list = []
        for b in self._factor_bindings():
            mapped = {id(t) for t, _ in factor_grad_maps(b)}
            for p in b.module.parametrizations[b.param_name].parameters():
                (fast if id(p) in mapped else slow).append(p)
        return [(ps, sc) for ps, sc in ((fast, self.preconditioned_lr_scale),
                                        (slow, self.slow_settle_lr_scale)) if ps]

    @contextlib.contextmanager
    def finetune_structure(self, model: nn.Module) -> Iterator[None]:
        """The structure of :class:`~admm_compress.compressor.Compressor.finetune_structure`, and
        in a settling run (:meth:`preconditions`) the factors trained with their set's gradient
        preconditioner (:func:`~admm_compress.parametrizations.precondition`; low rank: ScaledGD)."""
        from .parametrizations import precondition

        with super().finetune_structure(model):
            handles = precondition(self.bindings) if self.preconditions() else []
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    def settle_epochs(self, epochs: int, steps_per_epoch: int | None = None, optimizer=None) -> int:
        """Of :meth:`fit`'s ``epochs``, how many train on the set after an early final projection:
        ``ceil(settle * epochs)``, leaving at least one ADMM epoch -- except that with
        ``settle="auto"`` an ADMM part too short for :attr:`min_admm_updates` dual updates at the
        :meth:`response_steps` cadence (``steps_per_epoch`` known) is dropped: all ``epochs``
        settle, after projecting the starting weights ("prune, then train the mask")."""
        frac = self.settle_fraction()
        if frac <= 0 or epochs < 1:
            return 0
        if (self.settle == "auto" and epochs >= self.min_updates
                and not all(b.constraint.settles_long_runs for b in self.bindings)):
            return 0  # TT / L + S: ADMM to the end closes in a long run and measured better
        settle = min(epochs - 1, math.ceil(frac * epochs))
        if self.settle == "auto" and self.every == "auto" and steps_per_epoch is not None:
            beta = 0.9 if optimizer is None else (AdaptiveRho.heavy_ball_momentum(optimizer) or 0.0)
            if (epochs - settle) * steps_per_epoch < self.min_admm_updates * self.response_steps(beta):
                return epochs
        return settle

    def on_fit_start(self, run: FitContext) -> None:
        """rho='auto': the run's length in optimizer steps (so the residual target closes in time)
        and the optimizer's learning rate and momentum (the ceiling of rho); ``every="auto"``: the
        cadence for this run; the dual step :attr:`dual_step` for that cadence (see ``every``).
        Checks the settle multipliers first (an attribute set to a bad value fails here, before
        any epoch)."""
        scale = self.preconditioned_settle_lr_scale
        if isinstance(scale, str):
            if scale != "auto":
                raise ValueError(f"Solver.preconditioned_settle_lr_scale={scale!r}: must be 'auto' or a positive "
                                 f"number")
        else:
            check_float("Solver.preconditioned_settle_lr_scale", scale, low=0.0, low_open=True)
        check_float("Solver.preconditioned_settle_max_lr", self.preconditioned_settle_max_lr, low=0.0, low_open=True)
        check_float("Solver.slow_settle_lr_scale", self.slow_settle_lr_scale, low=0.0, low_open=True)
        try:
            horizon = max(1, run.epochs * len(run.loader)) if run.epochs > 0 else None
        except (TypeError, NotImplementedError):  # an iterator: the target falls per update instead
            horizon = None
        if isinstance(self.rho_schedule, AdaptiveRho):
            self.rho_schedule.horizon = horizon
            self.rho_schedule.observe_optimizer(run.optimizer)
        adaptive = self.mode == "admm" and self.rho == "auto"
        response = self.response_steps(self.rho_schedule.beta) if adaptive else 1
        if self.every == "auto":
            self.every_steps = None
            if adaptive and horizon is not None and run.epochs < self.min_updates:  # a short run
                per_epoch = max(1, horizon // run.epochs)
                self.every_steps = max(1, min(max(response, horizon // self.min_updates), per_epoch))
        self.dual_step = min(1.0, self.every_steps / response) if self.every_steps is not None else 1.0

    @staticmethod
    def response_steps(momentum: float) -> int:
        """``ceil(1 / (1 - sqrt(beta)))``: heavy-ball's time constant on the penalty quadratic at
        (and above) critical damping (the iteration contracts by ``sqrt(beta)`` per step; 20 steps
        for momentum 0.9, 1 without).  ``every="auto"`` leaves at least this many W-steps between
        two dual updates, so each U-step follows a W-step that has moved towards its argmin."""
        return AdaptiveRho.response_steps(momentum)

    def epoch_summary(self) -> dict:
        """The last update's overall ``primal`` / ``dual`` residuals and ``rho``."""
        if not self.residuals:
            return {}
        last = self.residuals[-1]
        return {"primal": last["primal"], "dual": last["dual"], "rho": last["rho"]}

    def should_stop(self, record: dict) -> bool:
        """ADMM with ``tol``: stop once the overall primal residual is below it."""
        if self.tol is not None and self.mode == "admm" and record.get("primal", 1.0) < self.tol:
            log.info("primal residual %.3g < tol=%.3g: stopping after epoch %d", record["primal"], self.tol,
                     record.get("epoch", -1))
            return True
        return False
