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
:meth:`Solver.finalize` -> :func:`admm_compress.export`.  :meth:`Solver.fit` runs the whole loop.

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
    compact = ac.export(model, solver.spec)

Several processes (``torchrun --nproc-per-node N script.py``): initialize the process group,
wrap the model in :class:`~torch.nn.parallel.DistributedDataParallel` and give each rank a
:class:`~torch.utils.data.DistributedSampler` loader; ``fit`` calls ``sampler.set_epoch`` every
epoch.  Specs resolve through the wrapper; the Z-step, U-step and hard projections are computed
on every rank and rank 0's result is broadcast, so all ranks hold bit-identical ``W``, ``Z``,
``U`` (tests/test_distributed.py, 2 gloo processes, also against one process over the same
global batches); a solver whose ``prepare`` reparameterizes the model (LoRITa, RASPA) and the
structured fine-tuning get a fresh DDP wrapper around the new parameters; checkpoints are
written by rank 0 only (then a barrier) and read by every rank on resume::

    dist.init_process_group("gloo")           # "nccl" on GPUs
    model = DistributedDataParallel(model)
    loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds))
    methods.lrpet(0.6).fit(model, loader, epochs=30, checkpoint="run.pt")
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import functional
from ._validation import check_choice, check_float, check_int
from .graph import consumer_batchnorms
from .penalty import AdaptiveRho, GeometricRho
from .sets.base import Constraint
from .specs import Binding, Constrain, describe, exact_glob, resolve, unwrap, _as_list
from .training import (CheckpointError, NonFiniteError, accuracy_percent, batch_size, check_finite_loss,
                       check_writable, count_correct, evaluate, load_checkpoint, move_batch, resolve_device, rng_state,
                       save_checkpoint, set_rng_state, tree_detach)

__all__ = ["Solver", "History", "Slot"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------ torch.distributed
def _world_size() -> int:
    """Processes of the default ``torch.distributed`` group (1 when not initialized)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast_(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in place (no-op in one process).

    The Z-/U-steps and hard projections are computed on every rank and then broadcast, so all
    ranks hold bit-identical ``Z``, ``U`` and weights even where SVDs are not deterministic
    across processes.  Non-contiguous tensors go through a contiguous copy.
    """
    if _world_size() == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, src=0)
        else:
            buf = t.contiguous()
            dist.broadcast(buf, src=0)
            t.copy_(buf)


def _barrier() -> None:
    if _world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def _bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: only rank 0 draws; ``None`` lets tqdm decide (on for a terminal)."""
    if _rank() != 0:
        return True
    return None if progress is None else not progress


def _rewrap(model: nn.Module) -> nn.Module:
    """A fresh ``DistributedDataParallel`` around ``model``'s module with the same settings.

    Needed after the parameters of a wrapped model were replaced (the fine-tuning structure
    registers new factor parameters, which the old wrapper does not synchronize).
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    kw = {} if model.broadcast_buffers else {"broadcast_buffers": False}  # the default needs no (deprecated) kwarg
    return nn.parallel.DistributedDataParallel(model.module, device_ids=model.device_ids,
                                               output_device=model.output_device,
                                               find_unused_parameters=model.find_unused_parameters, **kw)


@dataclasses.dataclass
class History:
    """What :meth:`Solver.fit` measured.

    Attributes
    ----------
    epochs : list of dict
        One record per epoch: ``phase`` ("train" or "finetune"), ``epoch``, ``loss`` (mean training
        loss incl. penalty), ``train_accuracy``, ``val_loss``/``val_accuracy`` (when a validation
        loader is given), ``primal``/``dual`` (overall ADMM residuals after the epoch), ``rho``,
        ``wall`` (seconds of the epoch).
    updates : list of dict
        One record per Z/U update: ``step``, ``primal``, ``dual``, ``rho`` and per-weight residuals.
    final : dict
        Evaluation after :meth:`Solver.finalize` (and after fine-tuning), when a val loader is given.
    """

    epochs: list = dataclasses.field(default_factory=list)
    updates: list = dataclasses.field(default_factory=list)
    final: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epochs": list(self.epochs), "updates": list(self.updates), "final": dict(self.final)}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(list(d.get("epochs", [])), list(d.get("updates", [])), dict(d.get("final", {})))

    def column(self, key: str, phase: str | None = None) -> list:
        """The values of ``key`` over epochs (optionally of one phase)."""
        return [e.get(key) for e in self.epochs if phase is None or e.get("phase") == phase]


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


class Solver:
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
    every : "epoch" or int, default "epoch"
        Z/U update (or projection) cadence: once per epoch (after the epoch's steps) or every
        ``every`` optimizer steps.
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
      invariant to the loss's and the weight's scale);
    * a ceiling from the optimizer: the penalty is a quadratic of curvature rho, and heavy-ball
      SGD (lr ``eta``, momentum ``beta``) is critically damped on it at
      ``eta * rho = (1 - sqrt(beta))^2``; above that W rings around Z (measured: rho 1 at lr
      0.05, momentum 0.9 is 20x critical and lost 25 points), so ``rho <= 2 (1 - sqrt(beta))^2 /
      eta`` (0.105 at lr 0.05, 0.53 at lr 0.01; ``eta * rho <= 0.5`` without momentum);
    * after every Z/U update, rho per weight follows the relative primal residual towards a
      target that falls geometrically to 1e-3 by 70 % of the run (:meth:`fit` knows the
      length), multiplying rho by at most 2 per update (residual balancing, Boyd et al. 2011,
      Sec. 3.4.1, with the noisy dual residual replaced by this closing schedule -- the LC
      toolkit's / ADMM-NN's increasing penalty with the rate set by feedback).

    Every change rescales ``U`` exactly; the adaptive state is in :meth:`state_dict`, so a
    resumed run equals an uninterrupted one.  With the ceiling reached the residual may stay
    above the target in a short run; :meth:`finalize` then logs a WARNING with the distance the
    final projection moved the weights, and :meth:`fit` records the accuracy just before
    (``history.final["before_finalize"]``) and after it.  A hand-written loop should call
    ``solver.rho_schedule.observe_optimizer(opt)`` and set ``solver.rho_schedule.horizon`` (steps)
    after :meth:`prepare`; without them momentum 0.9 and a per-update target are assumed.

    With a numeric rho the primal residual closes only when rho is large against the loss's
    curvature (tests use ``rho`` above the Lipschitz constant of the least-squares gradient);
    a geometric ``rho_growth`` (1.1-1.5 per update) closes any gap in finite time, and
    :meth:`finalize` makes the weights exactly feasible in any case.
    """

    #: Fine-tuning trains the factors of each constraint (the structure is kept by construction);
    #: ``False`` trains the weights themselves (Decomposable-Net, whose model stays full-rank).
    finetune_structure: bool = True
    #: Fine-tuning epochs run the solver's own objective and steps (Decomposable-Net's joint
    #: loss) instead of the plain task loss.
    finetune_solver_steps: bool = False

    def __init__(self, spec, rho: Any = "auto", *, mode: str = "admm", every: Any = "epoch",
                 rho_growth: float = 1.0, rho_max: float | None = None, tol: float | None = None,
                 skip_below: float | None = None, warm_start: bool = True):
        self.spec: list[Constrain] = _as_list(spec)
        self.mode = check_choice("mode", mode, ("admm", "projection"), where="Solver")
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
        self._fixed_schedule = GeometricRho(self.rho_growth, self.rho_max)  # per-spec numeric rho overrides
        if self.mode == "admm":
            for s in self.spec:
                r = self.rho if s.rho is None else s.rho
                if r != "auto" and r <= 0:
                    raise ValueError(f"Solver: rho={r} for {s.label}; ADMM needs rho > 0 "
                                     f"(use mode='projection' for projected SGD without a penalty)")
        if every != "epoch":
            every = check_int("every", every, low=1, where="Solver")
        self.every = every
        self.tol = None if tol is None else check_float("tol", tol, low=0.0, low_open=True, where="Solver")
        self.skip_below = None if skip_below is None else check_float("skip_below", skip_below, low=0.0,
                                                                      where="Solver")
        self.warm_start = bool(warm_start)
        self.projection_distance: float | None = None
        self._auto_keys: set[str] = set()
        self.bindings: list[Binding] = []
        self.slots: list[Slot] = []
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.rhos: dict[str, float] = {}
        self.steps = 0
        self.epochs_done = 0
        self.n_updates = 0
        self.residuals: list[dict] = []
        self.unpaired: list[str] = []  # metric="bn" layers without a consumer BN
        self._bn: dict[str, nn.Module] = {}
        self._model_ref: nn.Module | None = None

    # ================================================================ life cycle
    def prepare(self, model: nn.Module) -> "Solver":
        """Resolve the spec on ``model`` and initialize ``Z = Pi(W)``, ``U = 0``.

        Raises before touching the model if any spec cannot be applied.
        """
        bindings = resolve(self.spec, model, warn=True)
        bn_of: dict[str, nn.Module] = {}
        unpaired = []
        if any(b.spec.metric == "bn" for b in bindings):
            pairs = consumer_batchnorms(unwrap(model))
            mods = dict(unwrap(model).named_modules())
            for b in bindings:
                if b.spec.metric != "bn":
                    continue
                if b.name in pairs:
                    bn_of[b.key] = mods[pairs[b.name]]
                else:
                    unpaired.append(b.key)
            if unpaired:
                log.warning("BN rectification: no BatchNorm consumes the output of %s; these are "
                            "projected without the BN metric", ", ".join(unpaired))
        self.bindings, self._bn, self.unpaired = bindings, bn_of, unpaired
        self._model_ref = unwrap(model)
        self.slots = self._make_slots(bindings)
        self.Z, self.U, self.rhos = {}, {}, {}
        self._auto_keys = set()
        for sl in self.slots:
            b = sl.binding
            if b.spec.rho is None and self.rho == "auto":
                self._auto_keys.add(sl.key)
                self.rhos[sl.key] = 0.0  # penalty off until the first step has measured the scales
            else:
                self.rhos[sl.key] = float(self.rho if b.spec.rho is None else b.spec.rho)
        if self.rho == "auto":
            self.rho_schedule.reset()
            if self.mode == "admm" and self._auto_keys:
                self.rho_schedule.snapshot({sl.key: sl.tensor() for sl in self.slots if sl.key in self._auto_keys})
        if self.mode == "admm":
            with torch.no_grad():
                Z0 = self._zstep_all({sl.key: sl.tensor().detach() for sl in self.slots}, warm=self.warm_start)
                for sl in self.slots:
                    self.Z[sl.key] = Z0[sl.key].contiguous()
                    self.U[sl.key] = torch.zeros_like(Z0[sl.key], memory_format=torch.contiguous_format)
                _broadcast_(self.Z.values())
        log.info("prepared %d constrained weight(s):\n%s", len(bindings), describe(bindings))
        return self

    def _make_slots(self, bindings: list[Binding]) -> list[Slot]:
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

    def describe(self) -> str:
        """Table of the bound weights (layer, shape, view, constraint, dense and compressed size)."""
        text = describe(self.bindings) if self.bindings else "(not prepared)"
        skipped = getattr(self.bindings, "skipped", None)
        if skipped:
            text += "\nleft unconstrained (export could not compress them):\n" + "\n".join(
                f"  {n}: {why}" for n, why in skipped)
        if self.unpaired:
            text += "\nprojected without BN metric (no consumer BatchNorm): " + ", ".join(self.unpaired)
        return text

    def _require_prepared(self):
        if not self.bindings:
            raise RuntimeError("Solver is not prepared: call solver.prepare(model) (or solver.fit) first")

    # -------------------------------------------------------------- operators
    def _metric(self, sl: Slot) -> torch.Tensor | None:
        """LRPET BN rectification row scale a = gamma / sqrt(running_var + eps) (Eq. 7)."""
        b = sl.binding
        bn = self._bn.get(b.key) if sl.key == b.key else None
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

    def _apply(self, sl: Slot, v: torch.Tensor, tau: float, metric=None, warm: bool = True) -> torch.Tensor:
        """prox of the slot's constraint on the viewed tensor."""
        c = sl.constraint
        if not warm:
            return v.clone()
        if metric is not None:
            return c.project(v, metric=metric)
        return c.prox(v, tau)

    def _zstep_all(self, V: dict[str, torch.Tensor], warm: bool = True) -> dict[str, torch.Tensor]:
        """``prox(V_b)`` for every binding, in parameter shape; SVDs of equal shapes are batched."""
        out: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[Slot]] = defaultdict(list)
        for sl in self.slots:
            metric = self._metric(sl)
            k = sl.key
            if _batchable(sl.constraint) and metric is None and warm:
                # a hard set's projection ignores rho: per-weight rhos (rho="auto") still batch
                rk = self.rhos[k] if sl.constraint.is_penalty else 0.0
                groups[(id(sl.constraint), sl.viewed_shape, V[k].dtype, V[k].device, rk)].append(sl)
            else:
                tau = 1.0 / self.rhos[k] if self.rhos[k] > 0 else 0.0
                out[k] = sl.from_view(self._apply(sl, sl.to_view(V[k]), tau, metric, warm))
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
        if self.mode != "admm":
            return self.bindings[0].param.new_zeros(())
        total = None
        for sl in self.slots:
            d = sl.tensor() - self.Z[sl.key] + self.U[sl.key]
            term = 0.5 * self.rhos[sl.key] * d.pow(2).sum()
            total = term if total is None else total + term
        return total

    def step(self) -> bool:
        """Call after every optimizer step; runs :meth:`update` every ``every`` steps.

        Returns whether an update ran.
        """
        self._require_prepared()
        self.steps += 1
        if self._auto_keys and self.mode == "admm" and self.rho_schedule.needs_calibration():
            self._calibrate_rho()
        if self.every != "epoch" and self.steps % self.every == 0:
            self.update()
            return True
        return False

    @torch.no_grad()
    def _calibrate_rho(self) -> None:
        """rho='auto': starting rho per weight from the step just taken (penalty off, so the
        gradients are the loss's own; see :class:`~admm_compress.penalty.AdaptiveRho`)."""
        slots = [sl for sl in self.slots if sl.key in self._auto_keys]
        W = {sl.key: sl.tensor() for sl in slots}
        grads = {sl.key: (None if getattr(W[sl.key], "grad", None) is None else W[sl.key].grad) for sl in slots}
        new = self.rho_schedule.calibrate(W, grads, self.Z)
        if new is not None:
            for k, v in new.items():
                self._set_rho(k, v)

    def _set_rho(self, key: str, new: float) -> None:
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
        if self.every == "epoch":
            self.update()
            return True
        return False

    @torch.no_grad()
    def update(self) -> dict:
        """One Z-step and U-step (ADMM) or one hard projection (projection mode), now.

        Returns the residual record (also appended to ``self.residuals``).
        """
        self._require_prepared()
        per: dict[str, dict] = {}
        if self.mode == "admm":
            W = {sl.key: sl.tensor().detach() for sl in self.slots}
            V = {k: W[k] + self.U[k] for k in W}
            Znew = {k: z.contiguous() for k, z in self._zstep_all(V).items()}
            _broadcast_(Znew.values())  # computed on every rank, rank 0's copy wins (DDP)
            num_p = den_p = num_d = 0.0
            for sl in self.slots:
                k = sl.key
                rho = self.rhos[k]
                r_p = float(torch.linalg.vector_norm(W[k] - Znew[k]))
                r_d = rho * float(torch.linalg.vector_norm(Znew[k] - self.Z[k]))
                w_n = float(torch.linalg.vector_norm(W[k]))
                self.U[k].add_(W[k] - Znew[k])
                self.Z[k] = Znew[k]
                per[k] = {"primal": r_p / max(w_n, 1e-12), "dual": r_d, "rho": rho}
                num_p += r_p ** 2
                den_p += w_n ** 2
                num_d += r_d ** 2
            auto = self._auto_keys
            for sched, keys in ((self.rho_schedule, [k for k in per if k in auto or self.rho != "auto"]),
                                (self._fixed_schedule, [k for k in per if k not in auto and self.rho == "auto"])):
                if keys:
                    changes = sched.after_update({k: self.rhos[k] for k in keys},
                                                 {k: per[k]["primal"] for k in keys}, self.steps)
                    for k, v in changes.items():
                        self._set_rho(k, v)
            rec = {"step": self.steps, "epoch": self.epochs_done, "primal": math.sqrt(num_p / max(den_p, 1e-24)),
                   "dual": math.sqrt(num_d), "rho": max(self.rhos.values()), "layers": per}
        else:
            num = den = 0.0
            for sl in self.slots:
                w = sl.tensor()
                v = sl.to_view(w.detach())
                if self.skip_below is not None and v.dim() >= 2:
                    top = torch.linalg.matrix_norm(v.reshape(-1, *v.shape[-2:]).float(), ord=2).max()
                    if float(top) < self.skip_below:
                        per[sl.key] = {"primal": 0.0, "skipped": True}
                        continue
                p = sl.from_view(self._apply(sl, v, 0.0, self._metric(sl))).contiguous()
                _broadcast_([p])
                r = float(torch.linalg.vector_norm(w.detach() - p))
                n = float(torch.linalg.vector_norm(w.detach()))
                w.copy_(p)
                per[sl.key] = {"primal": r / max(n, 1e-12)}
                num += r ** 2
                den += n ** 2
            rec = {"step": self.steps, "epoch": self.epochs_done, "primal": math.sqrt(num / max(den, 1e-24)),
                   "dual": 0.0, "rho": 0.0, "layers": per}
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
            p = sl.from_view(self._apply(sl, v, 0.0, self._metric(sl))).contiguous()
            _broadcast_([p])
            moved[sl.key] = (float(torch.linalg.vector_norm(w.detach() - p)), float(torch.linalg.vector_norm(w.detach())))
            w.copy_(p)
            feasible[sl.key] = self._feasible(sl, sl.to_view(w.detach()))
        bad = [k for k, ok in feasible.items() if not ok]
        if bad:
            log.warning("after finalize, %d weight(s) fail contains(): %s", len(bad), ", ".join(bad))
        self._report_projection(moved)
        return feasible

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

    def export(self, model: nn.Module, inplace: bool = False) -> nn.Module:
        """:func:`admm_compress.export` of the finalized ``model`` with :meth:`export_spec`."""
        from .export import export

        return export(model, self.export_spec(), inplace=inplace)

    def _repr_fields(self) -> str:
        """The settings :meth:`__repr__` shows (subclasses name their own)."""
        rho = self.rho if self.rho == "auto" else f"{self.rho:g}"
        extra = f", rho={rho}" if self.mode == "admm" else ""
        if self.mode == "admm" and self.rho_growth != 1.0:
            extra += f", rho_growth={self.rho_growth:g}"
        return f"mode={self.mode!r}, specs={len(self.spec)}{extra}, every={self.every!r}"

    def __repr__(self) -> str:
        state = f", prepared on {len(self.bindings)} weight(s)" if getattr(self, "bindings", None) else ""
        return f"{type(self).__name__}({self._repr_fields()}{state})"

    def _feasible(self, sl, v: torch.Tensor) -> bool:
        """Whether the finalized view ``v`` of slot ``sl`` lies in its set (``contains``).

        Subclasses whose set is a selection rule rather than a projection (TRP's energy rank)
        override this.
        """
        return sl.constraint.contains(v, atol=1e-4, rtol=1e-4)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Z, U, rho per weight and the counters: everything needed to resume."""
        return {"Z": {k: v.clone() for k, v in self.Z.items()},
                "U": {k: v.clone() for k, v in self.U.items()},
                "rhos": dict(self.rhos), "steps": self.steps, "epochs_done": self.epochs_done,
                "n_updates": self.n_updates, "keys": [sl.key for sl in self.slots],
                "mode": self.mode, "residuals": [{k: v for k, v in r.items() if k != "layers"}
                                                 for r in self.residuals],
                "rho_schedule": self.rho_schedule.state_dict()}

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
        keys = [sl.key for sl in self.slots]
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
        if self.rho == "auto" and self.mode == "admm" and self._auto_keys:
            if not isinstance(sd.get("rho_schedule"), dict) or "calibrated" not in sd["rho_schedule"]:
                raise ValueError("solver state lacks the adaptive rho state ('rho_schedule'); it was written by "
                                 "a solver with a numeric rho")
            self.rho_schedule.load_state_dict(sd["rho_schedule"])
        self.Z, self.U = new["Z"], new["U"]
        self.rhos = {k: float(v) for k, v in sd["rhos"].items()}
        self.steps, self.epochs_done, self.n_updates = int(sd["steps"]), int(sd["epochs_done"]), int(sd["n_updates"])
        self.residuals = list(sd.get("residuals", []))

    # ====================================================== the training loop
    def _forward_ctx(self):
        """``torch.autocast`` for the forward pass when ``fit(..., autocast=dtype)``, else a no-op."""
        import contextlib

        dtype = getattr(self, "_amp", None)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=getattr(self, "_amp_device", "cpu"), dtype=dtype)

    def _amp_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss in float32 under autocast (a half-precision loss would lose the penalty), as is otherwise."""
        return loss.float() if getattr(self, "_amp", None) is not None else loss

    def _backprop(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler under float16 autocast."""
        scaler = getattr(self, "_scaler", None)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _optimizer_step(self, opt) -> None:
        scaler = getattr(self, "_scaler", None)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()

    def backward(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 loss_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one batch; returns ``(loss, outputs)`` (detached).

        Default: ``loss_fn(model(x), y) + penalty()``.  Methods whose objective differs
        (Decomposable-Net's joint loss) override this.
        """
        with self._forward_ctx():
            out = model(inputs)
            loss = loss_fn(out, targets)
        loss = self._amp_loss(loss) + self.penalty()
        self._backprop(loss)
        return loss.detach(), tree_detach(out)

    def fit(self, model: nn.Module, loader: Iterable, epochs: int = 1, optimizer: Any = None,
            loss_fn: Callable | None = None, val_loader: Iterable | None = None, finetune_epochs: int = 0,
            finetune_optimizer: Any = None, device: Any = None, callbacks: Sequence[Callable] = (),
            checkpoint: str | os.PathLike | None = None, scheduler: Callable | None = None,
            progress: bool | None = None, lr: float = 0.05, autocast: torch.dtype | None = None,
            accuracy_fn: Callable | None = None) -> History:
        """Train ``model`` under the constraints, finalize, and optionally fine-tune.

        Parameters
        ----------
        model : nn.Module
            Trained in place; satisfies the hard constraints on return.
        loader : iterable of (inputs, targets)
        epochs : int
            Constrained training epochs (0 = direct compression: finalize only).
        optimizer : torch.optim.Optimizer or callable, optional
            An optimizer over ``model.parameters()`` or a factory ``params -> optimizer`` (needed
            when ``prepare`` reparameterizes the model, e.g. LoRITa).  Default: SGD(lr, momentum
            0.9, weight decay 5e-4).
        loss_fn : callable, default cross entropy
            ``loss_fn(outputs, targets) -> scalar``; ``outputs`` is whatever the model returns
            (a tensor, a tuple with auxiliary logits, a dict such as torchvision segmentation's
            ``{"out", "aux"}``, an HF-style output), so a model with structured outputs trains
            with a ``loss_fn`` that reads them.
        val_loader : iterable, optional
            Evaluated after every epoch, after finalize and after fine-tuning.
        finetune_epochs : int
            Epochs of fine-tuning after finalize with the structure kept (factors of the
            constraint are trained, see :mod:`admm_compress.structure`).
        finetune_optimizer : optimizer factory, optional
            Default: SGD with ``lr / 10``.
        device : str or torch.device, optional
        callbacks : sequence of callables
            ``cb(solver, model, record)`` after every epoch; returning ``True`` stops training.
        checkpoint : path, optional
            Written atomically after every epoch (model, optimizer, solver, RNG states, history);
            if it exists when ``fit`` starts, training resumes from it.  Its folder is created and
            probed for writing before training (an unwritable path raises ``ValueError`` naming it).
        scheduler : callable, optional
            ``optimizer -> LR scheduler`` stepped once per epoch.
        progress : bool, optional
            Progress bar (default: on when stderr is a terminal).
        lr : float
            Learning rate of the default optimizer.
        autocast : torch.bfloat16 or torch.float16, optional
            Mixed precision: forward passes and losses run under :func:`torch.autocast` on the
            training device (``float16`` adds a :class:`torch.amp.GradScaler`).  Weights, Z, U
            and every projection stay in the weights' dtype; SVDs run in float32 or float64.
        accuracy_fn : callable, optional
            ``accuracy_fn(outputs, targets)`` -> number of correct examples of the batch, or
            ``(correct, total)`` (see :func:`admm_compress.training.count_correct`); used for
            ``train_accuracy`` / ``val_accuracy``.  Default: top-1 accuracy when the outputs are
            a logits tensor ``(N, C, *S)`` and the targets class indices ``(N, *S)``; for other
            outputs (dict, tuple, regression) the accuracies are NaN (not measured).
        """
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"fit: autocast={autocast!r}; allowed: None, torch.bfloat16, torch.float16")
        self._amp = autocast
        self._scaler = None
        epochs = check_int("epochs", epochs, low=0, where="fit")
        finetune_epochs = check_int("finetune_epochs", finetune_epochs, low=0, where="fit")
        lr = check_float("lr", lr, low=0.0, low_open=True, where="fit")
        if loader is None:
            raise ValueError("fit: loader is None; pass an iterable of (inputs, targets) batches")
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"fit: callbacks must be callables cb(solver, model, record), got {cb!r}")
        if optimizer is not None and not (isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)):
            raise TypeError(f"fit: optimizer must be a torch.optim.Optimizer or a factory params -> "
                            f"optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            hint = " (a state_dict? build the model and load it first)" if isinstance(model, dict) else ""
            raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
        for name, ld in (("loader", loader), ("val_loader", val_loader)):
            try:
                n_batches = None if ld is None else len(ld)
            except (TypeError, NotImplementedError):  # iterators and iterable datasets have no len
                n_batches = None
            if n_batches == 0:
                raise ValueError(f"fit: {name} is empty (len({name}) == 0); it must yield at least one "
                                 f"(inputs, targets) batch")
        for name, fn in (("loss_fn", loss_fn), ("scheduler", scheduler), ("accuracy_fn", accuracy_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"fit: {name} must be callable, got {fn!r}")
        if finetune_optimizer is not None and not (isinstance(finetune_optimizer, torch.optim.Optimizer)
                                                   or callable(finetune_optimizer)):
            raise TypeError(f"fit: finetune_optimizer must be a torch.optim.Optimizer or a factory params -> "
                            f"optimizer, got {type(finetune_optimizer).__name__}")
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"fit: progress must be a bool or None, got {progress!r}")
        if checkpoint is not None:
            if not isinstance(checkpoint, (str, os.PathLike)):
                raise TypeError(f"fit: checkpoint must be a file path (str or os.PathLike), got "
                                f"{type(checkpoint).__name__}")
            if os.path.isdir(checkpoint):
                raise ValueError(f"fit: checkpoint={os.fspath(checkpoint)!r} is a directory; give a file path")
            check_writable(checkpoint, "fit: checkpoint")  # a bad folder fails now, not after epoch 1
        dev = resolve_device(device, model)
        self._accuracy_fn = accuracy_fn
        self._amp_device = dev.type
        if autocast is torch.float16:
            self._scaler = torch.amp.GradScaler(dev.type)
        # an existing checkpoint is read and checked (weights_only) before any work is done
        self._pending_checkpoint = None
        if checkpoint is not None and os.path.exists(checkpoint):
            self._pending_checkpoint = (os.fspath(checkpoint), self._read_checkpoint(checkpoint, dev))
        loss_fn = loss_fn or F.cross_entropy
        model.to(dev)
        before = [id(p) for p in unwrap(model).parameters()]
        self.prepare(model)
        if [id(p) for p in unwrap(model).parameters()] != before:
            model = _rewrap(model)  # DDP: prepare reparameterized the model (LoRITa, RASPA)
        opt = self._make_optimizer(model, optimizer, lr)
        sched = scheduler(opt) if scheduler is not None else None
        self._set_horizon(loader, epochs)
        if isinstance(self.rho_schedule, AdaptiveRho):
            self.rho_schedule.observe_optimizer(opt)
        history = History()
        start_epoch, phase = 0, "train"
        if checkpoint is not None and os.path.exists(checkpoint):
            start_epoch, phase, history = self._resume(checkpoint, model, opt, sched, loader)
        from tqdm.auto import tqdm

        if phase == "train":
            bar = tqdm(range(start_epoch, epochs), desc="admm", disable=_bar_disabled(progress),
                       initial=start_epoch, total=epochs, unit="epoch")
            for epoch in bar:
                rec = self._run_epoch(model, loader, opt, loss_fn, dev, epoch, "train", val_loader)
                if sched is not None:
                    sched.step()
                history.epochs.append(rec)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "primal", "val_accuracy") if k in rec})
                log.info("epoch %d: %s", epoch, {k: v for k, v in rec.items() if k != "phase"})
                stop = any(bool(cb(self, model, rec)) for cb in callbacks)
                if checkpoint is not None:
                    if _rank() == 0:  # one writer under DDP; every rank resumes from the file
                        self._save(checkpoint, model, opt, sched, loader, epoch + 1, "train", history)
                    _barrier()
                if stop:
                    log.info("a callback stopped training after epoch %d", epoch)
                    break
                if self.tol is not None and self.mode == "admm" and rec.get("primal", 1.0) < self.tol:
                    log.info("primal residual %.3g < tol=%.3g: stopping after epoch %d", rec["primal"], self.tol, epoch)
                    break
            history.updates = list(self.residuals)
            if val_loader is not None:  # the accuracy the final projection starts from
                history.final["before_finalize"] = evaluate(model, val_loader, loss_fn, dev)
            feasible = self.finalize(model)
            history.final["feasible"] = all(feasible.values())
            history.final["projection_distance"] = self.projection_distance
            if val_loader is not None:
                history.final["after_finalize"] = evaluate(model, val_loader, loss_fn, dev, accuracy_fn=accuracy_fn)
            start_epoch = 0
        if finetune_epochs > 0:
            self._finetune(model, loader, loss_fn, dev, finetune_epochs, finetune_optimizer, lr,
                           val_loader, history, checkpoint, start_epoch if phase == "finetune" else 0,
                           progress, callbacks)
        if val_loader is not None and finetune_epochs > 0:
            history.final["after_finetune"] = evaluate(model, val_loader, loss_fn, dev, accuracy_fn=accuracy_fn)
        return history

    def _set_horizon(self, loader, epochs: int) -> None:
        """rho='auto': the run's length in optimizer steps, so the residual target closes in time."""
        if not isinstance(self.rho_schedule, AdaptiveRho):
            return
        try:
            self.rho_schedule.horizon = max(1, epochs * len(loader)) if epochs > 0 else None
        except (TypeError, NotImplementedError):  # an iterator: the target falls per update instead
            self.rho_schedule.horizon = None

    def _make_optimizer(self, model, optimizer, lr):
        if optimizer is None:
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        if isinstance(optimizer, torch.optim.Optimizer):
            have = {id(p) for g in optimizer.param_groups for p in g["params"]}
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in have]
            if missing:
                raise ValueError(f"fit: the optimizer does not hold {len(missing)} trainable parameter(s) of "
                                 f"the model (e.g. {missing[:3]}); it was probably built before the model "
                                 f"was reparameterized — pass a factory `lambda params: SGD(params, ...)`")
            return optimizer
        return optimizer(model.parameters())

    def _run_epoch(self, model, loader, opt, loss_fn, dev, epoch, phase, val_loader, solver_steps=True):
        model.train()
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a different shuffle every epoch
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        counted = torch.zeros((), device=dev, dtype=torch.long)
        accuracy_fn = getattr(self, "_accuracy_fn", None)
        nb = 0
        for i, batch in enumerate(loader):
            x, y = move_batch(batch, dev)
            opt.zero_grad(set_to_none=True)
            try:
                if solver_steps:
                    loss, out = self.backward(model, x, y, loss_fn)
                else:
                    with self._forward_ctx():
                        out = model(x)
                        loss = loss_fn(out, y)
                    loss = self._amp_loss(loss)
                    self._backprop(loss)
                    loss, out = loss.detach(), tree_detach(out)
            except RuntimeError as e:
                if i == 0 and any(w in str(e) for w in ("shape", "size", "dimension", "channels")):
                    shapes = tuple(getattr(x, "shape", ())), tuple(getattr(y, "shape", ()))
                    raise ValueError(f"fit: the model cannot take the loader's first batch of epoch {epoch} "
                                     f"(inputs {shapes[0]}, targets {shapes[1]}): {e}") from e
                raise
            except TypeError as e:
                if i == 0 and loss_fn is F.cross_entropy and "must be Tensor" in str(e):
                    raise TypeError(f"fit: the default loss_fn (cross entropy) needs the model to return a logits "
                                    f"tensor ({e}); for a model returning a dict or tuple pass a loss_fn that "
                                    f"reads it, e.g. loss_fn=lambda out, y: F.cross_entropy(out['out'], y)") from e
                raise
            check_finite_loss(loss, epoch, i)
            self._optimizer_step(opt)
            if solver_steps:
                self.step()
            bs = batch_size(x, y)
            loss_sum += loss * bs
            cc = count_correct(out, y, accuracy_fn)  # None: no accuracy for these outputs
            if cc is not None:
                correct += torch.as_tensor(cc[0], device=dev).long()
                counted += torch.as_tensor(cc[1], device=dev).long()
            n += bs
            nb += 1
        if nb == 0:
            raise ValueError(f"fit: the training loader yielded no batch in epoch {epoch}")
        if solver_steps:
            self.epoch_end()
        self._check_weights_finite(model, epoch)
        rec = {"phase": phase, "epoch": epoch, "loss": float(loss_sum) / n,
               "train_accuracy": accuracy_percent(int(correct), int(counted))}
        if solver_steps and self.residuals:
            last = self.residuals[-1]
            rec.update(primal=last["primal"], dual=last["dual"], rho=last["rho"])
        if val_loader is not None:
            ev = evaluate(model, val_loader, loss_fn, dev, accuracy_fn=accuracy_fn)
            rec.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
        rec["wall"] = time.perf_counter() - t0
        return rec

    @staticmethod
    def _check_weights_finite(model, epoch):
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"parameter '{name}' became non-finite in epoch {epoch}; the last "
                                     f"checkpoint (if any) is intact")

    def _finetune(self, model, loader, loss_fn, dev, epochs, optimizer, lr, val_loader, history,
                  checkpoint, start_epoch, progress, callbacks):
        from tqdm.auto import tqdm

        from .structure import release, structure

        finalized = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if start_epoch > 0:  # resuming: rebuild the same factorization from the saved finalized weights
            ck = load_checkpoint(checkpoint, map_location=dev)
            finalized = ck["finalized"]
            unwrap(model).load_state_dict(finalized)
        if self.finetune_structure:
            structure(self.bindings)
            model = _rewrap(model)  # DDP: the factors are new parameters; a fresh wrapper syncs them
        try:
            if optimizer is None:
                opt = torch.optim.SGD(model.parameters(), lr=lr / 10, momentum=0.9, weight_decay=5e-4)
            else:
                opt = optimizer(model.parameters()) if not isinstance(optimizer, torch.optim.Optimizer) else optimizer
            if start_epoch > 0:
                unwrap(model).load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                set_rng_state(ck["rng"], loader)
            bar = tqdm(range(start_epoch, epochs), desc="finetune", initial=start_epoch, total=epochs,
                       disable=_bar_disabled(progress), unit="epoch")
            for epoch in bar:
                rec = self._run_epoch(model, loader, opt, loss_fn, dev, epoch, "finetune", val_loader,
                                      solver_steps=self.finetune_solver_steps)
                history.epochs.append(rec)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "val_accuracy") if k in rec})
                stop = any(bool(cb(self, model, rec)) for cb in callbacks)
                if checkpoint is not None:
                    if _rank() == 0:
                        self._save(checkpoint, model, opt, None, loader, epoch + 1, "finetune", history,
                                   finalized=finalized)
                    _barrier()
                if stop:
                    break
        finally:
            if self.finetune_structure:
                release(self.bindings)

    # ------------------------------------------------------------ checkpoint
    def _save(self, path, model, opt, sched, loader, next_epoch, phase, history, finalized=None):
        obj = {"format": "admm_compress.fit/1", "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
               "solver": self.state_dict(), "epoch": next_epoch, "phase": phase, "rng": rng_state(loader),
               "history": history.to_dict()}
        if sched is not None:
            obj["scheduler"] = sched.state_dict()
        if finalized is not None:
            obj["finalized"] = finalized
        # the full residual records (with the per-layer entries that state_dict() leaves out), so
        # a resumed run's history equals an uninterrupted one's
        obj["residuals"] = [dict(r) for r in self.residuals]
        save_checkpoint(obj, path)

    @staticmethod
    def _read_checkpoint(path, map_location) -> dict:
        """Read a :meth:`fit` checkpoint (``weights_only=True``) and check its format, phase and epoch.

        Raises :class:`~admm_compress.training.CheckpointError` for a truncated, unsafe or
        foreign file.
        """
        ck = load_checkpoint(path, map_location=map_location,
                             required=("format", "model", "optimizer", "solver", "epoch", "phase", "rng"))
        where = f"checkpoint {os.fspath(path)!r}"
        if ck["format"] != "admm_compress.fit/1":
            raise CheckpointError(f"{where} has format {ck['format']!r}; expected 'admm_compress.fit/1'")
        if ck["phase"] not in ("train", "finetune"):
            raise CheckpointError(f"{where} has phase={ck['phase']!r}; expected 'train' or 'finetune'")
        ep = ck["epoch"]
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 0:
            raise CheckpointError(f"{where} has epoch={ep!r}; expected an int >= 0")
        for name in ("model", "optimizer", "solver", "rng"):
            if not isinstance(ck[name], dict):
                raise CheckpointError(f"{where}: entry {name!r} is a {type(ck[name]).__name__}, expected a dict")
        if ck["phase"] == "finetune" and not isinstance(ck.get("finalized"), dict):
            raise CheckpointError(f"{where} is a fine-tuning checkpoint without the finalized weights")
        return ck

    def _resume(self, path, model, opt, sched, loader):
        """Restore model, optimizer, scheduler, solver state, RNG states and history from ``path``.

        Everything is checked against this model, solver and optimizer before anything is
        loaded, so a checkpoint of another model or spec raises
        :class:`~admm_compress.training.CheckpointError` and leaves the model's weights alone.
        """
        pending, self._pending_checkpoint = getattr(self, "_pending_checkpoint", None), None
        if pending is not None and pending[0] == os.fspath(path):
            ck = pending[1]  # read (and checked) by fit before any work
        else:
            ck = self._read_checkpoint(path, resolve_device(None, model))
        where = f"checkpoint {os.fspath(path)!r}"
        sd = ck["solver"]
        if sd.get("mode") != self.mode:
            raise CheckpointError(f"{where} was written by a solver with mode={sd.get('mode')!r}; this "
                                  f"solver has mode={self.mode!r}")
        if ck["phase"] == "finetune":
            log.info("resuming fine-tuning from %s at epoch %d", path, ck["epoch"])
            return int(ck["epoch"]), "finetune", History.from_dict(ck.get("history", {}))
        keys = [sl.key for sl in self.slots]
        if list(sd.get("keys", [])) != keys:
            raise CheckpointError(f"{where} is from another spec: its solver state constrains "
                                  f"{list(sd.get('keys', []))}, this solver binds {keys}")
        target = unwrap(model)
        own = target.state_dict()
        saved = ck["model"]
        bad = [k for k in own if k not in saved] + [k for k in saved if k not in own]
        bad += [f"{k}: {tuple(getattr(saved[k], 'shape', ()))} vs {tuple(own[k].shape)}" for k in own
                if k in saved and (not isinstance(saved[k], torch.Tensor) or saved[k].shape != own[k].shape)]
        if bad:
            raise CheckpointError(f"{where} is from another model: {len(bad)} mismatching state_dict "
                                  f"entries (e.g. {bad[:3]})")
        saved_groups = [len(g.get("params", ())) for g in ck["optimizer"].get("param_groups", [])]
        own_groups = [len(g["params"]) for g in opt.param_groups]
        if saved_groups != own_groups:
            raise CheckpointError(f"{where}: its optimizer state has parameter groups of sizes {saved_groups}, "
                                  f"this optimizer has {own_groups} (another optimizer or model?)")
        try:  # solver state first: it checks shapes (and subclass fields) and touches no weight
            self.load_state_dict(sd)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: the solver state does not fit this solver: {e}") from e
        target.load_state_dict(saved)
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            if "scheduler" in ck:
                sched.load_state_dict(ck["scheduler"])
            else:
                log.warning("%s holds no LR scheduler state; the scheduler restarts", where)
        if "residuals" in ck:
            self.residuals = [dict(r) for r in ck["residuals"]]
        set_rng_state(ck["rng"], loader)
        log.info("resumed from %s at epoch %d", path, ck["epoch"])
        return int(ck["epoch"]), "train", History.from_dict(ck.get("history", {}))
