"""Sums of two structured components, ``W = L + S``: :class:`Sum`."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from .._validation import check_choice, check_float, check_int, check_tensor
from .base import ConstraintSet

__all__ = ["Sum", "sequential_sl", "sequential_ls"]

log = logging.getLogger(__name__)


def _pair(x: Any, name: str = "x") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, S)`` if ``x`` is a pair of tensors of one shape, ``None`` if it is a tensor."""
    if isinstance(x, torch.Tensor):
        return None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        L = check_tensor(f"{name}[0]", x[0], where="Sum")
        S = check_tensor(f"{name}[1]", x[1], where="Sum")
        if L.shape != S.shape:
            raise ValueError(f"Sum: the components of {name} must have one shape, got "
                             f"{tuple(L.shape)} and {tuple(S.shape)}")
        return L, S
    raise TypeError(f"Sum: {name} must be a tensor or a pair (L, S) of tensors, got "
                    f"{type(x).__name__}")


def sequential_sl(x: torch.Tensor, a: ConstraintSet, b: ConstraintSet):
    """Greedy ``L`` first: ``L = a.project(x)``, then ``S = b.project(x - L)``; returns ``(L, S)``.

    One pass of the alternation of :meth:`Sum.decompose`; RASPA's "direct method" (Fig. 6).
    """
    L = a.project(x)
    return L, b.project(x - L)


def sequential_ls(x: torch.Tensor, a: ConstraintSet, b: ConstraintSet):
    """Greedy ``S`` first: ``S = b.project(x)``, then ``L = a.project(x - S)``; returns ``(L, S)``."""
    S = b.project(x)
    return a.project(x - S), S


class Sum(ConstraintSet):
    r"""Sums of one member of each of two sets: ``A + B = {L + S : L in A, S in B}``.

    RASPA (Eq. 1-13) uses ``Sum(TTRank(...), Cardinality(...))``: a low-TT-rank part plus a
    sparse part, one ADMM auxiliary/dual pair per component.

    Parameters
    ----------
    a, b : ConstraintSet
        The sets of the first (``L``) and second (``S``) component (also ``sets = (a, b)``).
    iters : int, default 100
        Maximum alternations of :meth:`decompose` used by ``project(x)`` on a single tensor.
    tol : float, default 1e-4
        :meth:`decompose` stops when one alternation lowers the error ``||x - L - S||_F`` by
        less than the fraction ``tol`` of its previous value (stagnation).

    Notes
    -----
    *Pair form* (the exact operator the solver uses with one variable per component):
    ``project((L, S)) = (a.project(L), b.project(S))``, the Euclidean projection onto
    ``A x B``; :meth:`contains` checks both components.

    *Tensor form*: ``project(x)`` returns ``L + S`` from :meth:`decompose`, alternating
    projections ``L = a.project(x - S)``, ``S = b.project(x - L)`` from ``S = 0`` (GoDec-style).
    This is a heuristic for ``min ||x - L - S||_F`` over ``L in A, S in B`` (a hard,
    non-convex problem), not an exact projection: each half-step minimizes the error over
    one component, so the error is non-increasing when both projections are exact (LowRank,
    Cardinality); for the quasi-optimal TT-SVD the best iterate is kept.  It is not idempotent
    in general.  ``contains(x)`` decomposes ``x`` the same way (and also from ``L = 0``) and
    accepts when the residual is within tolerance: ``True`` is certain (a witness
    ``(L, S)`` was found), ``False`` may be a miss of the heuristic.

    Cost: one projection of each set per alternation.
    """

    def __init__(self, a: ConstraintSet, b: ConstraintSet, iters: int = 100, tol: float = 1e-4):
        for name, s in (("a", a), ("b", b)):
            if not isinstance(s, ConstraintSet):
                raise TypeError(f"Sum: {name} must be a ConstraintSet (a hard constraint such as "
                                f"LowRank, TTRank or Cardinality), got {s!r}")
            if getattr(s, "is_global", False):
                raise ValueError(f"Sum: {name}={s!r} has scope='global'; a Sum's components are projected per "
                                 f"layer, so use scope='layer' there")
        self.a, self.b = a, b
        self.sets = (a, b)
        self.iters = check_int("iters", iters, low=1, where="Sum")
        self.tol = check_float("tol", tol, low=0.0, where="Sum")
        self.min_dim = max(a.min_dim, b.min_dim)

    # ---------------------------------------------------------------- shapes
    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        self.a.check_shape(shape, where)
        self.b.check_shape(shape, where)

    def num_params(self, shape: Sequence[int]) -> int:
        """``a.num_params(shape) + b.num_params(shape)``."""
        return int(self.a.num_params(shape) + self.b.num_params(shape))

    # -------------------------------------------------------------- operators
    def decompose(self, x: torch.Tensor, iters: int | None = None, tol: float | None = None,
                  start: str = "S"):
        """Alternating projections: ``(L, S)`` with ``L in a``, ``S in b``, ``L + S ~ x``.

        Parameters
        ----------
        x : Tensor
        iters, tol : optional
            Override the instance defaults: at most ``iters`` alternations; stop when one
            alternation lowers the error by less than ``tol`` times its previous value, or
            the error is exactly zero.
        start : {"S", "L"}
            ``"S"``: start from ``S = 0`` (first ``L = a.project(x)``); ``"L"``: from ``L = 0``.
        """
        x = self._check_input(x)
        iters = self.iters if iters is None else check_int("iters", iters, low=1, where="Sum.decompose")
        tol = self.tol if tol is None else check_float("tol", tol, low=0.0, where="Sum.decompose")
        check_choice("start", start, ("S", "L"), where="Sum.decompose")
        return self._decompose(x, iters, tol, start)

    def _decompose(self, x: torch.Tensor, iters: int, tol: float, start: str = "S"):
        scale = float(torch.linalg.vector_norm(x.detach().double()))
        if start == "S":
            S = torch.zeros_like(x)
            L = self.a._project(x)
        else:
            L = torch.zeros_like(x)
            S = self.b._project(x)
            L = self.a._project(x - S)
        best, best_err, prev = None, math.inf, math.inf
        for it in range(iters):
            S = self.b._project(x - L)
            err = float(torch.linalg.vector_norm((x - L - S).detach().double()))
            if err < best_err:
                best, best_err = (L, S), err
            if err == 0.0 or (it > 0 and prev - err <= tol * prev):
                break
            prev = err
            L = self.a._project(x - S)
        log.debug("Sum.decompose: %d alternations, residual %.3e (||x|| = %.3e)", it + 1,
                  best_err, scale)
        return best

    def project(self, x):
        """``(a.project(L), b.project(S))`` for a pair; ``L + S`` from :meth:`decompose` for a tensor."""
        p = _pair(x)
        if p is not None:
            self.check_shape(tuple(p[0].shape))
            return self.a.project(p[0]), self.b.project(p[1])
        x = self._check_input(x)
        return self._project(x)

    def prox(self, x, tau: float = 0.0):
        """Same as :meth:`project` (``tau`` is ignored for a hard constraint)."""
        check_float("tau", tau, low=0.0)
        return self.project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        L, S = self._decompose(x, self.iters, self.tol)
        return L + S

    def sequential(self, x: torch.Tensor, order: str = "SL"):
        """One-pass greedy splits ``(L, S)`` for comparison with :meth:`decompose`.

        ``order="SL"`` (S after L): :func:`sequential_sl`; ``order="LS"`` (L after S):
        :func:`sequential_ls`.  Both fit the second component to the residual of the first.
        (RASPA's Tables 3-5 call ``S(L)`` / ``L(S)`` schemes that compress the first stage's
        result further; these residual splits are its Fig. 6 "direct method".)
        """
        check_choice("order", order, ("SL", "LS"), where="Sum.sequential")
        x = self._check_input(x)
        return sequential_sl(x, self.a, self.b) if order == "SL" else sequential_ls(x, self.a, self.b)

    def factorize(self, x):
        """``(a.factorize(L), b.factorize(S))`` of the pair, or of :meth:`decompose` of a tensor."""
        p = _pair(x)
        if p is None:
            x = self._check_input(x)
            p = self._decompose(x, self.iters, self.tol)
        else:
            self.check_shape(tuple(p[0].shape))
        return self.a.factorize(p[0]), self.b.factorize(p[1])

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        """``a.reconstruct(fa) + b.reconstruct(fb)``."""
        fa, fb = factors
        return self.a.reconstruct(fa, shape) + self.b.reconstruct(fb, shape)

    def factor_grams(self, factors):
        """The components' Gram matrices, ``(a's, b's)`` (``None`` when neither has any): for
        RASPA's ``TTRank + Cardinality`` the TT cores are preconditioned, the sparse values are
        not."""
        fa, fb = factors
        ga, gb = self.a.factor_grams(fa), self.b.factor_grams(fb)
        return None if ga is None and gb is None else (ga, gb)

    def contains(self, x, atol: float = 1e-5, rtol: float = 1e-5, explain: bool = False):
        """Pair: both components in their sets.  Tensor: a decomposition with residual
        ``||x - L - S||_F <= atol + rtol ||x||_F`` was found (see the class notes)."""
        p = _pair(x)
        if p is None:
            return super().contains(x, atol, rtol, explain)
        atol = check_float("atol", atol, low=0.0)
        rtol = check_float("rtol", rtol, low=0.0)
        self.check_shape(tuple(p[0].shape))
        ok_a, why_a = self.a.contains(p[0], atol, rtol, explain=True)
        ok_b, why_b = self.b.contains(p[1], atol, rtol, explain=True)
        reason = "; ".join(w for w, ok in ((f"L: {why_a}", ok_a), (f"S: {why_b}", ok_b)) if not ok)
        ok = ok_a and ok_b
        return (ok, reason) if explain else ok

    def _contains(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
        scale = float(torch.linalg.vector_norm(x.detach().double()))
        limit = atol + rtol * scale
        errs = []
        for start in ("S", "L"):
            L, S = self._decompose(x, max(self.iters, 200), min(self.tol, 1e-4), start)
            err = float(torch.linalg.vector_norm((x - L - S).detach().double()))
            if err <= limit:
                return True, ""
            errs.append(err)
        return False, (f"no decomposition L + S found: residual {min(errs):.3e} > "
                       f"atol + rtol * ||x|| = {limit:.3e} (alternating projections)")

    def __repr__(self) -> str:
        return f"Sum({self.a!r}, {self.b!r})"
