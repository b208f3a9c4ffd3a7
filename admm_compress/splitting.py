"""How :class:`~admm_compress.Solver` makes the constrained weights meet their sets between SGD
steps: two splitting strategies, chosen by ``Solver(mode=...)``.

* :class:`ADMM` (``mode="admm"``): every ``K`` optimizer steps ``Z = prox_{g/rho}(W + U)``
  (batched over equal shapes), ``U = U + W - Z``, the residuals, then the rho schedule adapts
  ``rho`` (:mod:`admm_compress.penalty`) with ``U`` rescaled exactly; the loss gets
  ``rho/2 ||W - Z + U||^2``.
* :class:`Projection` (``mode="projection"``, LRPET and TRP): projected SGD, ``W = Pi_C(W)``
  every ``K`` steps; no ``Z``, no ``U``, no penalty.

A strategy holds no state of its own: ``Z``, ``U``, ``rhos`` and the schedules are the solver's
(checkpointed by :meth:`Solver.state_dict`), and it works through the solver's public hooks
(:meth:`~admm_compress.Solver.zstep`, :meth:`~admm_compress.Solver.project_slot`,
:meth:`~admm_compress.Solver.slot_metric`, :meth:`~admm_compress.Solver.set_rho`), so a
configuration that overrides a hook (TRP's energy truncation) changes both strategies alike.
"""
from __future__ import annotations

import abc
import math

import torch

from .distributed import broadcast_ as _broadcast_

__all__ = ["Splitting", "ADMM", "Projection", "SPLITTINGS"]


class Splitting(abc.ABC):
    """One splitting strategy (stateless; see the module docstring)."""

    name: str = ""
    #: whether the strategy keeps auxiliary variables Z / U and adds a penalty to the loss
    uses_penalty: bool = False

    def start(self, solver) -> None:
        """After :meth:`Solver.prepare` resolved the slots: set up the auxiliary variables."""

    def penalty(self, solver) -> torch.Tensor:
        """The term added to the task loss (differentiable in the weights)."""
        return solver.bindings[0].param.new_zeros(())

    @abc.abstractmethod
    def update(self, solver) -> dict:
        """One update now (under ``torch.no_grad``); returns the residual record (``step``,
        ``epoch``, ``primal``, ``dual``, ``rho``, ``layers``)."""


class ADMM(Splitting):
    """Scaled-form ADMM (Boyd et al. 2011, Sec. 3.1.1; Zhang et al. 2018 for DNN weights)."""

    name = "admm"
    uses_penalty = True

    @torch.no_grad()
    def start(self, solver) -> None:
        """``Z = Pi(W)`` (or ``W`` itself without warm start), ``U = 0``; rank 0's ``Z`` wins."""
        Z0 = solver.zstep({sl.key: sl.tensor().detach() for sl in solver.slots}, warm=solver.warm_start)
        for sl in solver.slots:
            solver.Z[sl.key] = Z0[sl.key].contiguous()
            solver.U[sl.key] = torch.zeros_like(Z0[sl.key], memory_format=torch.contiguous_format)
        _broadcast_(solver.Z.values())

    def penalty(self, solver) -> torch.Tensor:
        """``sum_b rho_b / 2 * ||W_b - Z_b + U_b||_F^2``."""
        total = None
        for sl in solver.slots:
            d = sl.tensor() - solver.Z[sl.key] + solver.U[sl.key]
            term = 0.5 * solver.rhos[sl.key] * d.pow(2).sum()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def update(self, solver) -> dict:
        """Z-step, U-step ``U += gamma (W - Z)`` (``gamma = solver.dual_step``, 1 unless a ``fit``
        with ``rho="auto"`` updates faster than W responds), residuals, then the rho schedules
        (``U`` rescaled on every change)."""
        per: dict[str, dict] = {}
        W = {sl.key: sl.tensor().detach() for sl in solver.slots}
        V = {k: W[k] + solver.U[k] for k in W}
        Znew = {k: z.contiguous() for k, z in solver.zstep(V).items()}
        _broadcast_(Znew.values())  # computed on every rank, rank 0's copy wins (DDP)
        num_p = den_p = num_d = 0.0
        for sl in solver.slots:
            k = sl.key
            rho = solver.rhos[k]
            r_p = float(torch.linalg.vector_norm(W[k] - Znew[k]))
            r_d = rho * float(torch.linalg.vector_norm(Znew[k] - solver.Z[k]))
            w_n = float(torch.linalg.vector_norm(W[k]))
            solver.U[k].add_(W[k] - Znew[k], alpha=solver.dual_step)
            solver.Z[k] = Znew[k]
            per[k] = {"primal": r_p / max(w_n, 1e-12), "dual": r_d, "rho": rho}
            num_p += r_p ** 2
            den_p += w_n ** 2
            num_d += r_d ** 2
        auto = solver.auto_keys
        for sched, keys in ((solver.rho_schedule, [k for k in per if k in auto or solver.rho != "auto"]),
                            (solver.fixed_schedule, [k for k in per if k not in auto and solver.rho == "auto"])):
            if keys:
                changes = sched.after_update({k: solver.rhos[k] for k in keys},
                                             {k: per[k]["primal"] for k in keys}, solver.steps)
                for k, v in changes.items():
                    solver.set_rho(k, v)
        rec = {"step": solver.steps, "epoch": solver.epochs_done, "primal": math.sqrt(num_p / max(den_p, 1e-24)),
               "dual": math.sqrt(num_d), "rho": max(solver.rhos.values()), "layers": per}
        return rec


class Projection(Splitting):
    """Projected SGD: the hard assignment ``W = Pi_C(W)`` (LRPET, TRP)."""

    name = "projection"

    @torch.no_grad()
    def update(self, solver) -> dict:
        """``W = Pi_C(W)`` for every slot (skipping weights whose spectral norm is below
        ``skip_below``); the primal record is how far each weight moved."""
        per: dict[str, dict] = {}
        num = den = 0.0
        joint = solver.joint_project()  # Cardinality(scope="global"): one budget over its layers
        for sl in solver.slots:
            w = sl.tensor()
            v = sl.to_view(w.detach())
            if sl.key in joint:
                p = sl.from_view(joint[sl.key]).contiguous()
            else:
                if solver.skip_below is not None and v.dim() >= 2:
                    top = torch.linalg.matrix_norm(v.reshape(-1, *v.shape[-2:]).float(), ord=2).max()
                    if float(top) < solver.skip_below:
                        per[sl.key] = {"primal": 0.0, "skipped": True}
                        continue
                p = sl.from_view(solver.project_slot(sl, v, 0.0, solver.slot_metric(sl))).contiguous()
            _broadcast_([p])
            r = float(torch.linalg.vector_norm(w.detach() - p))
            n = float(torch.linalg.vector_norm(w.detach()))
            w.copy_(p)
            per[sl.key] = {"primal": r / max(n, 1e-12)}
            num += r ** 2
            den += n ** 2
        rec = {"step": solver.steps, "epoch": solver.epochs_done, "primal": math.sqrt(num / max(den, 1e-24)),
               "dual": 0.0, "rho": 0.0, "layers": per}
        return rec


SPLITTINGS = {"admm": ADMM, "projection": Projection}
