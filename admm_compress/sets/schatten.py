"""The Schatten-p quasi-norm penalty: :class:`SchattenP`."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import functional as F
from .._validation import check_float, where_prefix
from .base import Penalty
from .lowrank import LowRank

__all__ = ["SchattenP", "SquaredFrobenius"]


class SchattenP(Penalty):
    r"""Penalty ``g(X) = weight * sum_i sigma_i(X)^p``, ``0 < p <= 1`` (sum over the batch).

    Acts on the last two dimensions and broadcasts over leading ones.  ``p = 1`` is the nuclear
    norm; ``p < 1`` promotes low rank more strongly.  LoRITa (Prop. 4.2) shows that weight decay
    on an ``N``-factor product ``W = F_1 ... F_N`` is equivalent to this penalty with
    ``p = 2 / N`` on ``W``.

    Parameters
    ----------
    p : float
        Exponent in ``(0, 1]``.
    weight : float, default 1.0
        Non-negative multiplier.

    Notes
    -----
    ``pen(X)`` uses ``torch.linalg.svdvals`` and is differentiable; zero singular values
    contribute 0 and get gradient 0.

    ``prox(X, tau) = argmin_Z 0.5 ||Z - X||_F^2 + tau * weight * sum_i sigma_i(Z)^p`` is exact:
    ``U diag(h(s)) V^T`` with ``X = U diag(s) V^T`` and ``h`` the scalar prox of
    ``lam |z|^p``, ``lam = tau * weight`` (the penalty is unitarily invariant and ``h`` is
    non-decreasing).  ``h`` is soft thresholding for ``p = 1``, Xu et al.'s half thresholding
    (IEEE TNNLS 2012) for ``p = 1/2``, and generalized soft thresholding (Zuo et al., ICCV 2013)
    with the root found to machine precision by safeguarded Newton for other ``p``; see
    :func:`admm_compress.functional.prox_power`.  Cost: one batched SVD.
    """

    min_dim = 2
    broadcasts = True

    def __init__(self, p: float, weight: float = 1.0):
        self.p = check_float("p", p, low=0.0, high=1.0, low_open=True, where="SchattenP")
        self.weight = check_float("weight", weight, low=0.0, where="SchattenP")

    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        super().check_shape(shape, where)
        if shape[-2] < 1 or shape[-1] < 1:
            pre = where_prefix(where)
            raise ValueError(f"{pre}SchattenP acts on non-empty matrices, got shape {tuple(shape)}")

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.schatten_value(x, self.p)

    def _prox(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        lam = tau * self.weight
        if lam == 0:
            return x.clone()
        return F.prox_schatten(x, lam, self.p)

    def factorize(self, x: torch.Tensor, tol: float | None = None):
        """``(U, V)`` of ``x`` keeping the singular values above ``tol`` (numerical rank).

        ``tol`` defaults to ``max(m, n) * eps * sigma_1`` per matrix (as
        ``torch.linalg.matrix_rank``); ``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T`` with ``r``
        the largest numerical rank in the batch (unused columns of smaller ranks are zero).
        """
        x = self._check_input(x)
        if tol is not None:
            tol = check_float("tol", tol, low=0.0, where="SchattenP.factorize")
        U, s, Vh = F.truncated_svd(x)
        if tol is None:
            thr = F.rank_tolerance(s, x.shape, s.dtype)
        else:
            thr = torch.full_like(s[..., :1], tol)
        keep = s > thr
        r = max(1, int(keep.sum(-1).max())) if keep.numel() else 1
        s = torch.where(keep, s, torch.zeros_like(s))[..., :r]
        A, B = F.sqrt_split(U[..., :r], s, Vh[..., :r, :])
        return A.to(x.dtype), B.to(x.dtype)

    def project(self, x: torch.Tensor, tol: float | None = None) -> torch.Tensor:
        """Numerical-rank truncation ``reconstruct(factorize(x, tol))``: the dense tensor that
        the factored (exported) form of ``x`` represents.

        A penalty has no set to project on; this is the map export applies, provided so that
        code treating sets and penalties alike can compare a dense weight with its export.
        """
        x = self._check_input(x)
        return self.reconstruct(self.factorize(x, tol), x.shape)

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        """``U @ V`` reshaped to ``shape``."""
        U, V = factors
        return (U @ V).reshape(tuple(shape))

    def num_params(self, shape: Sequence[int]) -> int:
        """The dense size ``prod(shape)``: a penalty fixes no rank, so it guarantees no saving
        (count the factors of :meth:`factorize` after training instead)."""
        self.check_shape(tuple(shape))
        return int(math.prod(shape))

    def __repr__(self) -> str:
        return f"SchattenP(p={self.p}, weight={self.weight})"


class SquaredFrobenius(Penalty):
    r"""Penalty ``g(X) = weight * ||X||_F^2 = weight * sum_j sigma_j(X)^2``: plain weight decay.

    The ``N = 1`` member of the family ``weight * sum_j sigma_j^{2/N}`` (Prop. 4.2), which
    :class:`~admm_compress.SchattenP` (``0 < p <= 1``) does not cover.  ``prox(X, tau) =
    X / (1 + 2 tau weight)``.  Used only to state the baseline's training constraint.
    """

    min_dim = 2
    broadcasts = True
    # exported like the other spectral penalties: LoRITa truncates, then exports LowRank pairs
    export_as = LowRank(rank=1)
    sized_at_export = True

    def __init__(self, weight: float = 1.0):
        self.weight = check_float("weight", weight, low=0.0, where="SquaredFrobenius")

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x.pow(2).sum()

    def _prox(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        return x / (1.0 + 2.0 * tau * self.weight)

    def factorize(self, x: torch.Tensor):
        """``(U, V)`` of the numerical rank of ``x`` (as :meth:`SchattenP.factorize`)."""
        return SchattenP(1.0).factorize(x)

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        U, V = factors
        return (U @ V).reshape(tuple(shape))

    def num_params(self, shape: Sequence[int]) -> int:
        self.check_shape(tuple(shape))
        n = 1
        for s in shape:
            n *= int(s)
        return n

    def __repr__(self) -> str:
        return f"SquaredFrobenius(weight={self.weight})"
