"""Penalty-parameter (rho) schedules of the ADMM :class:`~admm_compress.Solver`.

A schedule is a small object the solver consults at two moments (in the style of cooper's
penalty updaters): after the first optimizer step (:meth:`calibrate`, to measure scales) and
after every Z/U update (:meth:`after_update`, to choose the next ``rho`` per weight).  It only
*proposes* values; the solver applies them and rescales the scaled dual ``U <- U * rho_old /
rho_new`` so the unscaled dual ``rho * U`` is unchanged by any change (Boyd et al. 2011,
Sec. 3.4.1: "the scaled dual variable must be rescaled after updating rho").

* :class:`GeometricRho` -- a numeric ``rho``: constant, or ``rho <- min(rho * growth, rho_max)``
  after every update (ADMM-NN / Zhang et al. 2018's rho increase; the LC toolkit's
  ``mu_k = mu_0 a^k``).  This is the solver's behaviour for ``rho=<number>``, unchanged.
* :class:`AdaptiveRho` -- ``rho="auto"``: per-weight ``rho`` from measured scales, then
  steered by the primal residual towards a target that closes by the end of training.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping

import torch

from ._validation import check_float

__all__ = ["GeometricRho", "AdaptiveRho"]

log = logging.getLogger(__name__)


class GeometricRho:
    """``rho_k = min(rho_0 * growth^k, rho_max)`` per weight (``growth=1``: constant).

    Parameters
    ----------
    growth : float >= 1
    rho_max : float, optional
    """

    adaptive = False

    def __init__(self, growth: float = 1.0, rho_max: float | None = None):
        self.growth = float(growth)
        self.rho_max = rho_max

    def needs_calibration(self) -> bool:
        return False

    def after_update(self, rhos: Mapping[str, float], primal: Mapping[str, float], steps: int) -> dict[str, float]:
        """New rho per key (only the keys that change)."""
        out = {}
        for k, rho in rhos.items():
            new = rho * self.growth
            if self.rho_max is not None:
                new = min(new, self.rho_max)
            if new != rho:
                out[k] = new
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: Mapping) -> None:
        return None


class AdaptiveRho:
    """``rho="auto"``: a per-weight penalty chosen from measured scales and steered by the residual.

    Three measured quantities set it, so it needs no user value and is invariant to the loss's
    scale (multiplying the loss by ``s`` multiplies every ``rho`` by ``s``; with the learning rate
    divided by ``s``, or with Adam, the trajectory is the same):

    1. **Start (gradient balance).**  At the first optimizer step the penalty is off, so the
       gradient of weight ``l`` is the loss's own ``g_l``.  Then
       ``rho_l = balance * ||g_l|| / ||W_l - Z_l||``: the penalty's pull ``rho (W - Z)`` starts
       as strong as the loss's push, per weight, whatever the weight's and the loss's scale --
       but at least ``reach (1 - beta) / (eta T)`` when the run's length ``T`` is known, the
       rho whose pull can move ``W`` by one time constant in the run (see ``reach``).
    2. **Ceiling (damping).**  The W-step is heavy-ball SGD (learning rate ``eta``, momentum
       ``beta``, read by :meth:`observe_optimizer`; else ``eta`` is measured on the first step
       as ``||W^1 - W^0|| / ||g||`` and ``beta = 0.9`` assumed) on ``rho/2 ||W - Z + U||^2`` too,
       a quadratic of curvature ``rho``: critically damped at ``eta * rho = (1 - sqrt(beta))^2``,
       ringing around ``Z`` above it.  ``rho_l <= kappa (1 - sqrt(beta))^2 / eta`` (``kappa``
       = 2; at most ``eta * rho = 0.5``).  Measured on the digits FCN at lr 0.05, momentum 0.9:
       constant rho 0.1 (2x critical) was the best of 1e-3 ... 1, and rho 1 (20x) lost 25 points.
    3. **Residual target (closing schedule).**  After every Z/U update the relative primal
       residual ``r_l = ||W_l - Z_l|| / ||W_l||`` is compared with a target that falls
       geometrically from its starting value ``r_l^0`` to ``r_end`` by the fraction
       ``close_at`` of the run (``horizon`` optimizer steps, set by :meth:`Solver.fit`) and
       stays there:  ``r*(t) = r^0 (r_end / r^0)^{min(1, t / (close_at T))}``.  Without a
       horizon (a hand-written loop) the target falls by ``decay`` per update.  Then
       ``rho_l <- rho_l * clip(r_l / r*, factor^(-a/2), factor^a)`` (no change within 10 %, and
       no decrease once the target has reached ``r_end``: the duals then close the rest, so on
       a problem with an exact answer the residual keeps falling to zero), where
       ``a = min(1, s / response_steps(beta))`` for ``s`` optimizer steps since the previous
       update: rho changes by at most ``factor`` per heavy-ball response time (20 steps at
       momentum 0.9), whatever the Z/U cadence.  With ``a = 1`` for every cadence, Z/U every 10
       steps doubled rho twice as fast as every 20 and reached the ceiling at step 40 instead of
       80; the weights were pulled faster than the loss could follow, and on the digits FCN-8 at
       lr 0.1 (density 0.1, 10 seeds) two runs collapsed (47.8 and 87.5 %, mean 90.50 against
       96.92 %, lowest 95.8, with the cadence-scaled limit; docs/results/admm_vs_prune.md).

    This is residual balancing (Boyd et al. 2011, Sec. 3.4.1; He, Yang & Wang 2000) with the
    dual residual replaced by a schedule: in network training the W-step is a few noisy SGD
    steps and the Z-step of a cardinality or rank set jumps when the support changes, so the
    dual residual ``rho ||Z_k - Z_{k-1}||`` is mostly noise, while the quantity that decides the
    accuracy lost at the end is the primal residual (the final projection moves ``W`` by
    exactly that much).  The schedule is the LC toolkit's / ADMM-NN's increasing penalty
    (path following, ``mu -> infinity``; Carreira-Perpinan & Idelbayev 2018, Zhang et al. 2018)
    with its rate chosen by feedback instead of by hand: ``rho`` grows only as fast as needed to
    close the gap by ``close_at`` of the run, leaving the rest to train on (nearly) the
    constraint set.

    Parameters
    ----------
    balance : float > 0
        Starting penalty-to-loss force ratio (1).
    kappa : float > 0
        Ceiling of ``eta * rho`` in units of heavy-ball critical damping (2).
    r_end : float > 0
        Final relative primal residual the target reaches (1e-3).
    close_at : float in (0, 1]
        Fraction of the horizon by which the target reaches ``r_end`` (0.7).
    factor : float > 1
        Largest multiplicative change of rho per update at a cadence of :meth:`response_steps`
        or more (2; decreases at most ``sqrt(factor)``); a shorter cadence ``s`` takes the
        power ``s / response_steps`` of it.
    decay : float in (0, 1)
        Target factor per update when no horizon is known (0.7).
    rho_max : float, optional
        An extra absolute ceiling.
    reach : float >= 0
        Floor of the starting rho from the run's length (1; 0 turns it off):
        ``rho_l >= reach (1 - beta) / (eta T)`` for a horizon of ``T`` steps.  Heavy-ball's slow
        mode on the penalty contracts ``W - Z`` by about ``eta rho / (1 - beta)`` per step, so
        below this floor the penalty cannot move the weights by even one time constant in the
        whole run and the feedback (at most ``factor`` per update) reaches a useful rho only at
        the end.  From a pretrained model the gradient balance starts 10-300x lower (the loss
        gradient is small): on the digits FCN-8 at lr 0.01 (7 ADMM epochs) it started at 0.002
        against this floor's 0.12, the weights stayed dense until the final projection (accuracy
        after it 10-27 %) and pruning ended 2.7 points behind ``torch.nn.utils.prune``; with
        the floor 0.9 behind (docs/results/admm_vs_prune.md).
    lift : bool
        In the closing phase (target at ``r_end``) with the gap still open, raise the ceiling
        from critical damping to ``eta * rho <= (1 + beta) / 2`` (a quarter of heavy-ball's
        stability edge).  Off by default: on the digits FCN it closed more of the gap (final
        ``||W - Z|| / ||W||`` 0.02-0.07 instead of 0.05-0.3) and rescued one collapsed run (lr
        0.1, Z/U every 10 steps: 52.5 -> 86.1 %), but the ringing cost 0.3-1.9 points in 4 of 6
        settings.
    """

    adaptive = True

    def __init__(self, balance: float = 1.0, kappa: float = 2.0, r_end: float = 1e-3, close_at: float = 0.7,
                 factor: float = 2.0, decay: float = 0.7, rho_max: float | None = None, lift: bool = False,
                 reach: float = 1.0):
        where = "AdaptiveRho"
        self.balance = check_float("balance", balance, low=0.0, low_open=True, where=where)
        self.kappa = check_float("kappa", kappa, low=0.0, low_open=True, where=where)
        self.r_end = check_float("r_end", r_end, low=0.0, low_open=True, where=where)
        self.close_at = check_float("close_at", close_at, low=0.0, high=1.0, low_open=True, where=where)
        self.factor = check_float("factor", factor, low=1.0, low_open=True, where=where)
        self.decay = check_float("decay", decay, low=0.0, high=1.0, low_open=True, high_open=True, where=where)
        self.rho_max = rho_max
        self.lift = bool(lift)
        self.reach = check_float("reach", reach, low=0.0, where=where)
        self.horizon: int | None = None
        self.lr: float | None = None
        self.momentum: float | None = None
        self.reset()

    def observe_optimizer(self, optimizer) -> None:
        """Read the learning rate and heavy-ball momentum of an SGD-type optimizer (``fit`` does
        this; call it in a hand-written loop before the first step).  Other optimizers (Adam) keep
        the measured step and no momentum."""
        g = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
        if self.heavy_ball_momentum(optimizer) is not None and isinstance(g.get("lr"), (int, float)):
            self.lr, self.momentum = float(g["lr"]), float(g["momentum"])
        else:
            self.lr, self.momentum = None, 0.0

    @staticmethod
    def heavy_ball_momentum(optimizer) -> float | None:
        """The momentum of an SGD-type optimizer (first parameter group), ``None`` for others (Adam)."""
        g = optimizer.param_groups[0] if getattr(optimizer, "param_groups", None) else {}
        return float(g["momentum"]) if "momentum" in g and "betas" not in g else None

    @staticmethod
    def response_steps(momentum: float) -> int:
        """``ceil(1 / (1 - sqrt(beta)))``: heavy-ball's time constant on the penalty quadratic at
        (and above) critical damping (the iteration contracts by ``sqrt(beta)`` per step; 20 steps
        for momentum 0.9, 1 without)."""
        beta = min(max(float(momentum), 0.0), 0.999)
        return max(1, math.ceil(1.0 / (1.0 - math.sqrt(beta)) - 1e-9))

    @property
    def beta(self) -> float:
        """The heavy-ball momentum in use: the optimizer's (:meth:`observe_optimizer`), else 0.9."""
        return 0.9 if self.momentum is None else self.momentum

    def stability_step(self) -> float:
        """``eta * rho`` at a quarter of heavy-ball's stability edge ``2 (1 + beta)``, at most 0.5."""
        return 0.5 * (1.0 + self.beta)

    def ceiling_step(self) -> float:
        """Largest ``eta * rho``: ``kappa`` times heavy-ball critical damping ``(1 - sqrt(beta))^2``, at most 0.5."""
        return min(self.kappa * (1.0 - math.sqrt(self.beta)) ** 2, 0.5)

    def reset(self) -> None:
        """Forget everything measured (``Solver.prepare`` calls this)."""
        self.calibrated = False
        self.rho0: dict[str, float] = {}
        self.cap: dict[str, float] = {}
        self.r0: dict[str, float] = {}
        self.updates = 0
        self.last_step = 0  # optimizer steps at the previous update (the cadence of the next)
        self._w0: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ calibration
    def snapshot(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Remember ``W^0`` (before the first step) to measure the optimizer's step."""
        self._w0 = {k: w.detach().clone() for k, w in weights.items()}

    def needs_calibration(self) -> bool:
        return not self.calibrated

    def calibrate(self, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None],
                  Z: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        """Starting rho per key from the first step; ``None`` if nothing could be measured yet.

        ``grads[k]`` is the loss gradient of the step just taken (the penalty was off),
        ``weights[k]`` the weight after it, ``Z[k]`` the current auxiliary variable.
        """
        g, gap, wn, eta = {}, {}, {}, {}
        for k, w in weights.items():
            w = w.detach()
            gr = grads.get(k)
            gn = float(torch.linalg.vector_norm(gr)) if gr is not None else float("nan")
            w0 = self._w0.get(k)
            step = float(torch.linalg.vector_norm(w - w0)) if w0 is not None else float("nan")
            g[k] = gn
            gap[k] = float(torch.linalg.vector_norm(w - Z[k]))
            wn[k] = float(torch.linalg.vector_norm(w))
            eta[k] = step / gn if math.isfinite(gn) and gn > 0 and math.isfinite(step) and step > 0 else float("nan")
        ok = [k for k in g if math.isfinite(g[k]) and g[k] > 0 and math.isfinite(eta[k])]
        if not ok:
            return None  # no gradient or no step yet (e.g. a GradScaler-skipped step): try next step
        rho0, cap = {}, {}
        for k in g:
            if k in ok and wn[k] > 0:
                rho0[k] = self.balance * g[k] / max(gap[k], 1e-2 * wn[k])
                cap[k] = self.ceiling_step() / (self.lr if self.lr else eta[k])
        good = list(rho0)
        if not good:
            return None

        def gmean(d):
            return math.exp(sum(math.log(d[k]) for k in good) / len(good))

        for k in g:  # weights that cannot be measured (zero, no gradient) take the geometric mean
            if k not in rho0:
                rho0[k], cap[k] = gmean(rho0), gmean(cap)
        for k in g:
            if self.rho_max is not None:
                cap[k] = min(cap[k], self.rho_max)
            if self.reach > 0 and self.horizon:  # the pull must be able to act within the run
                step = self.lr if self.lr else (eta[k] if math.isfinite(eta[k]) and eta[k] > 0 else None)
                if step:
                    rho0[k] = max(rho0[k], self.reach * max(1.0 - self.beta, 1e-3) / (step * self.horizon))
            rho0[k] = min(rho0[k], cap[k])
            self.r0[k] = max(gap[k] / wn[k] if wn[k] > 0 else 0.0, self.r_end)
        self.rho0, self.cap = rho0, cap
        self.calibrated = True
        self._w0 = {}
        log.info("rho='auto' calibrated: rho in [%.3g, %.3g], ceiling kappa/eta in [%.3g, %.3g]",
                 min(rho0.values()), max(rho0.values()), min(cap.values()), max(cap.values()))
        return dict(rho0)

    # ------------------------------------------------------------------ schedule
    def target(self, key: str, steps: int) -> float:
        """The relative primal residual aimed at after ``steps`` optimizer steps."""
        r0 = self.r0[key]
        if self.horizon:
            p = min(1.0, steps / (self.close_at * self.horizon))
        else:
            p = min(1.0, self.updates * math.log(1 / self.decay) / max(math.log(r0 / self.r_end), 1e-12))
        return r0 * (self.r_end / r0) ** p

    def after_update(self, rhos: Mapping[str, float], primal: Mapping[str, float], steps: int) -> dict[str, float]:
        """New rho per key (only the keys that change), from each weight's relative primal residual."""
        self.updates += 1
        interval, self.last_step = steps - self.last_step, steps
        if not self.calibrated:
            return {}
        out = {}
        a = min(1.0, max(interval, 0) / self.response_steps(self.beta))
        hi = self.factor ** a  # x ** 1.0 == x exactly
        lo = 1.0 / math.sqrt(hi)
        for k, rho in rhos.items():
            r = primal.get(k)
            if r is None or not math.isfinite(r) or rho <= 0:
                continue
            target = self.target(k, steps)
            ratio = r / target
            if 1 / 1.1 <= ratio <= 1.1 or (ratio < 1 and target <= self.r_end):
                continue  # within 10 %, or below the final target: let the duals close the rest
            new = rho * min(max(ratio, lo), hi)
            cap = self.cap[k]
            if self.lift and target <= self.r_end and ratio > 1:  # closing phase, gap still open
                cap = cap / self.ceiling_step() * self.stability_step()
                if self.rho_max is not None:
                    cap = min(cap, self.rho_max)
            new = min(max(new, 1e-3 * self.rho0[k]), cap)
            if new != rho:
                out[k] = new
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"calibrated": self.calibrated, "rho0": dict(self.rho0), "cap": dict(self.cap), "r0": dict(self.r0),
                "updates": self.updates, "horizon": self.horizon, "lr": self.lr, "momentum": self.momentum,
                "last_step": self.last_step}

    def load_state_dict(self, sd: Mapping) -> None:
        missing = [k for k in ("calibrated", "rho0", "cap", "r0", "updates", "horizon") if k not in sd]
        if missing:
            raise ValueError(f"adaptive rho state lacks {missing}")
        self.calibrated = bool(sd["calibrated"])
        self.rho0 = {k: float(v) for k, v in sd["rho0"].items()}
        self.cap = {k: float(v) for k, v in sd["cap"].items()}
        self.r0 = {k: float(v) for k, v in sd["r0"].items()}
        self.updates = int(sd["updates"])
        self.last_step = int(sd.get("last_step", 0))  # absent in checkpoints before 2026-12-03 (fifth session)
        self.horizon = None if sd["horizon"] is None else int(sd["horizon"])
        self.lr = None if sd.get("lr") is None else float(sd["lr"])
        self.momentum = None if sd.get("momentum") is None else float(sd["momentum"])
        self._w0 = {}
