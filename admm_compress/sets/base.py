"""Abstract base classes of constraint sets and penalties.

A constraint set ``C`` knows nothing about layers: it acts on the tensor a *view* produced
(see :mod:`admm_compress.views`).  The solver only uses the uniform operator

    prox(x, tau) = argmin_z 0.5 * ||z - x||_F^2 + tau * g(z)

which is the Euclidean projection onto ``C`` for a hard constraint (``g`` = indicator of
``C``; ``tau`` is ignored) and the proximal operator of the penalty ``g`` otherwise.  The ADMM
Z-step is then ``Z = g.prox(W + U, 1 / rho)`` for every kind of ``g``.

Subclasses implement ``_project`` / ``_prox`` (no argument checks needed there), ``_contains``,
``factorize``, ``reconstruct``, ``num_params`` and ``check_shape``; the public methods validate first, so bad
input raises before any work and nothing is modified in place.
"""
from __future__ import annotations

import abc
from typing import Any, NamedTuple, Sequence

import torch

from .._validation import check_finite, check_float, check_tensor, where_prefix

__all__ = ["Constraint", "ConstraintSet", "Penalty", "GramSpec"]


class GramSpec(NamedTuple):
    """One side of a factor's ScaledGD preconditioner (:meth:`Constraint.factor_grams`).

    ``side="left"`` maps a factor gradient ``g``, viewed as ``(*batch, r, -1)``, to ``(M +
    delta I)^{-1} g``; ``side="right"`` maps ``g`` viewed as ``(*batch, -1, r)`` to ``g (M +
    delta I)^{-1}``; ``M = gram`` (``(*batch, r, r)``, symmetric positive semi-definite,
    detached) and ``delta = damping * lambda_max(M)`` per matrix of the batch."""

    side: str
    gram: torch.Tensor
    damping: float


class Constraint(abc.ABC):
    """Anything the solver can put on a weight: a hard set or a soft penalty.

    Attributes
    ----------
    is_penalty : bool
        ``True`` for penalties (soft constraints), ``False`` for sets (hard constraints).
    min_dim : int
        Smallest number of dimensions of the tensors this constraint acts on
        (2 for matrix sets, which broadcast over leading dimensions).
    broadcasts : bool
        ``True`` when the operator acts independently on every matrix ``x[..., :, :]``, so that
        equal-shaped weights may be stacked and handled in one batched call.
    isometric_structure : bool
        ``True`` when the trainable form fine-tuning keeps (:meth:`factorize` /
        :meth:`reconstruct`, :func:`admm_compress.parametrizations.structure`) moves the weight by
        exactly the dense SGD step restricted to the set (:class:`Cardinality`: the kept values
        are entries of the weight), so it trains stably at the learning rate the dense weight
        trained at.  ``False`` for factor forms (low rank, TT): there a step on the factors
        moves the weight by up to ``2 sigma_1`` times the dense step (``W = A B``, ``dW = dA B +
        A dB``), and fine-tuning wants a smaller learning rate.  :class:`~admm_compress.Solver`'s
        ``settle`` reads it.
    settles_long_runs : bool
        Whether :class:`~admm_compress.Solver`'s ``settle="auto"`` also ends ADMM early in a
        long run (``epochs >= Solver.min_updates``); every hard set settles in a short one.
        ``True`` for :class:`Cardinality` and :class:`LowRank`; ``False`` for TT and ``L + S``:
        on the digits FCN bench (30 epochs at lr 0.02) settling their factors lost 6.3 (TT) and
        2.5 (RASPA) points against ADMM to the end, while on the digits32 ResNet-20 bench (4
        epochs) it lifted them from 50.6 to 96.9 % and 63.6 to 98.6 % (docs/results).
    """

    is_penalty: bool = False
    min_dim: int = 0
    broadcasts: bool = False
    isometric_structure: bool = False
    settles_long_runs: bool = False

    # ------------------------------------------------------------------ checks
    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        """Raise ``ValueError`` if this constraint cannot act on tensors of ``shape``.

        ``where`` names the layer or spec in the message.  The default checks ``min_dim``.
        """
        if len(shape) < self.min_dim:
            pre = where_prefix(where)
            raise ValueError(f"{pre}{type(self).__name__} acts on tensors with at least "
                             f"{self.min_dim} dimensions, got shape {tuple(shape)}")

    def _check_input(self, x: Any, name: str = "x") -> torch.Tensor:
        x = check_tensor(name, x)
        if x.is_complex():
            raise TypeError(f"{type(self).__name__}: {name} must be a real floating-point tensor, "
                            f"got dtype {x.dtype}")
        self.check_shape(tuple(x.shape))
        check_finite(name, x)
        return x

    # --------------------------------------------------------------- operator
    def prox(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        """``argmin_z 0.5 ||z - x||^2 + tau * g(z)`` (projection for a hard set)."""
        tau = check_float("tau", tau, low=0.0)
        x = self._check_input(x)
        return self._prox(x, tau)

    @abc.abstractmethod
    def _prox(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        """Unchecked prox; must not modify ``x``."""

    # ------------------------------------------------------------- compression
    @abc.abstractmethod
    def factorize(self, x: torch.Tensor) -> Any:
        """The compact factors of ``project(x)`` (or of ``x`` for a penalty) used by export.

        LowRank: ``(U, V)`` with ``U @ V`` equal to the projection; TTRank: the list of TT
        cores; Cardinality: ``(values, indices)``; Sum: one entry per component.
        """

    @abc.abstractmethod
    def num_params(self, shape: Sequence[int]) -> int:
        """Number of stored numbers of the compressed form of a tensor of ``shape``."""

    @abc.abstractmethod
    def reconstruct(self, factors: Any, shape: Sequence[int]) -> torch.Tensor:
        """Dense tensor of ``shape`` from ``factorize``'s output (inverse of factorize).

        Differentiable in the floating-point factors (used to fine-tune in factored form).
        """

    def factor_grams(self, factors: Any) -> Any:
        """ScaledGD's preconditioner of the ``factors`` of :meth:`factorize` (the structure it
        returns, e.g. ``(U, V)``, TT cores, ``(L factors, S factors)``) as Gram matrices: the
        same nesting with, in place of each tensor, a tuple of :class:`GramSpec` applied in
        order to that factor's gradient, or ``None`` (plain gradient) for a tensor, a whole part
        or the whole; ``None`` (default): plain gradients.  Computed from the factors' current
        values.  :class:`LowRank` and :class:`TTRank` return ScaledGD's Gram matrices, under
        which a factor step moves the weight by a dense step projected on the factors' column /
        row spaces; :class:`Sum` its components'.  :func:`admm_compress.parametrizations.
        precondition` factors the Gram matrices of all structured weights together, once per
        forward pass, and applies them in gradient hooks."""
        return None

    def factor_grad_preconditioners(self, factors: Any) -> Any:
        """Gradient maps for training the ``factors`` of :meth:`factorize`: the same nesting
        with a callable ``grad -> grad`` (reading the current factors when called) or ``None``
        in place of each tensor, or ``None`` for a whole part or the whole.  By default the maps
        of :meth:`factor_grams`, one factor at a time (:func:`admm_compress.functional.
        scaled_gd_apply`; a factor whose Gram matrices are not finite keeps its gradient).
        :func:`~admm_compress.parametrizations.precondition` uses :meth:`factor_grams` directly
        (batched) unless a subclass overrides this method, whose maps it then registers as
        they are."""
        from .. import functional as F

        grams = self.factor_grams(factors)
        if grams is None:
            return None

        def build(part, path):
            if part is None:
                return None
            if isinstance(part, tuple) and part and isinstance(part[0], GramSpec):
                return lambda g: F.scaled_gd_apply(g, _at(self.factor_grams(factors), path))
            return type(part)(build(p, path + (i,)) for i, p in enumerate(part))

        return build(grams, ())

    def __repr__(self) -> str:  # pragma: no cover - overridden with the parameters
        return f"{type(self).__name__}()"


def _at(nested: Any, path: tuple) -> Any:
    for i in path:
        nested = nested[i]
    return nested


class ConstraintSet(Constraint):
    """A closed set ``C``; the hard constraint ``x in C``.

    ``project(x)`` maps ``x`` into ``C``.  It returns a new tensor of the same shape, dtype and
    device and never modifies ``x``.  It is the exact Euclidean projection
    ``argmin_{z in C} ||z - x||_F`` for :class:`LowRank` with ``rank=``/``ratio=`` and the
    exact SVD (Eckart-Young) and for :class:`Cardinality` (top-k, also per group).  It is
    **not** the Euclidean projection for:

    * :class:`Sum` (``W = L + S``): alternating projections onto the two sets, a local
      minimizer of ``||L + S - x||`` that depends on the start (RASPA Algorithm 1, line 1);
    * :class:`TTRank`: TT-SVD, quasi-optimal within ``sqrt(d - 1)`` of the optimum;
    * :class:`LowRank` with ``energy=`` (TRP's rule): the rank is chosen from the data, a
      rank-selection rule that is not idempotent (applied again it may cut further);
    * :class:`LowRank` with ``energy_transfer=True`` (LRPET Eq. 6): ``alpha * Pi_r(x)`` with
      ``alpha >= 1``, which lies in the set but is not the nearest point;
    * :class:`LowRank` with ``svd="randomized"`` (or ``"auto"`` choosing it): near-optimal
      (Halko et al.), not exact;
    * :class:`LowRank` ``project(x, metric=d)``: the nearest point in the weighted norm
      ``||diag(d) (z - x)||_F`` (LRPET Eq. 7-10), not the Frobenius one.
    """

    is_penalty = False

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A point of the set for ``x``: the Euclidean projection, except where the class
        docstring says otherwise."""
        x = self._check_input(x)
        return self._project(x)

    def _prox(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        return self._project(x)

    @abc.abstractmethod
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Unchecked projection; must not modify ``x``."""

    def contains(self, x: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                 explain: bool = False):
        """Whether ``x`` lies in the set within tolerance.

        With ``explain=True`` returns ``(ok, reason)`` where ``reason`` says what failed.
        """
        atol = check_float("atol", atol, low=0.0)
        rtol = check_float("rtol", rtol, low=0.0)
        x = check_tensor("x", x)
        self.check_shape(tuple(x.shape))
        if x.numel() and not bool(torch.isfinite(x).all()):
            ok, reason = False, "x has non-finite entries (NaN or inf)"
        else:
            ok, reason = self._contains(x, atol, rtol)
        return (bool(ok), reason) if explain else bool(ok)

    @abc.abstractmethod
    def _contains(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
        """Membership test returning ``(ok, reason)``."""


class Penalty(Constraint):
    """A soft constraint ``g(x) >= 0`` added to the training loss.

    ``pen(x)`` returns the value as a scalar tensor (differentiable where ``g`` is),
    ``pen.prox(x, tau)`` the proximal operator of ``tau * g``.
    """

    is_penalty = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        return self._value(x)

    @abc.abstractmethod
    def _value(self, x: torch.Tensor) -> torch.Tensor:
        """Unchecked value."""
