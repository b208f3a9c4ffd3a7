"""Tensors of bounded tensor-train rank: :class:`TTRank`."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .. import functional as F
from .._validation import check_int, where_prefix
from .base import ConstraintSet, GramSpec

__all__ = ["TTRank"]


class TTRank(ConstraintSet):
    r"""``d``-way tensors of TT ranks at most ``(r_1, ..., r_{d-1})``.

    ``C = {X : rank(X_<k>) <= r_k, k = 1..d-1}`` where ``X_<k> = X.reshape(n_1 ... n_k, -1)`` is
    the ``k``-th unfolding; exactly the tensors with a TT decomposition
    ``X(i_1, ..., i_d) = G_1(i_1) G_2(i_2) ... G_d(i_d)``, ``G_k(i_k)`` of size
    ``r_{k-1} x r_k``, ``r_0 = r_d = 1`` (Oseledets 2011, Thm. 2.1).

    Parameters
    ----------
    ranks : int or tuple of int
        The ``d - 1`` internal ranks of a ``d``-way tensor (RASPA's ``gamma_1..gamma_{d-1}``;
        its Table 8 writes ``(1, 10, 10, 1)`` for ``ranks=(10, 10)``), or one int for all.
        A rank larger than its unfolding allows is capped to
        ``r_k = min(ranks_k, r_{k-1} n_k, n_{k+1} ... n_d)`` (see :meth:`rank_for`).

    Notes
    -----
    "Projection" is the TT-SVD truncation (Oseledets 2011, Alg. 1; RASPA Eq. 8-10), computed
    with ``tensorly.decomposition.tensor_train`` on the PyTorch backend.  It is quasi-optimal,
    not the exact Euclidean projection (which is NP-hard to compute in general): with ``eps_k``
    the best rank-``r_k`` approximation error of the ``k``-th unfolding of ``X``,

        ``||X - P(X)||_F^2 <= sum_{k=1}^{d-1} eps_k^2``   (Oseledets 2011, Thm. 2.2),

    so ``||X - P(X)||_F <= sqrt(d - 1) * min_{Y in C} ||X - Y||_F``.  A tensor already in ``C``
    is reproduced (up to rounding).  Cost: ``d - 1`` SVDs, the first of an
    ``n_1 x (n_2 ... n_d)`` matrix.  A layer's weight becomes a tensor through one of the two
    named TT layouts of :mod:`admm_compress.views`: ``TTView.oki()`` (``(O, kh*kw, I)``, ranks
    ``(r_1, r_2)``; exported as three stock convolutions) or ``TTView(out_factors, in_factors)``
    (``(kh*kw, o_1 i_1, ..., o_d i_d)``, the literal reading of RASPA Eq. 9).
    """

    min_dim = 2

    def __init__(self, ranks):
        if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
            self.ranks = check_int("ranks", ranks, low=1, where="TTRank")
        elif isinstance(ranks, (tuple, list)):
            if len(ranks) == 0:
                raise ValueError("TTRank: ranks=() is empty; give d-1 >= 1 positive ints")
            self.ranks = tuple(check_int(f"ranks[{i}]", r, low=1, where="TTRank")
                               for i, r in enumerate(ranks))
        else:
            raise TypeError(f"TTRank: ranks must be an int or a tuple of ints, got {ranks!r}")

    def _targets(self, d: int) -> tuple[int, ...]:
        return (self.ranks,) * (d - 1) if isinstance(self.ranks, int) else self.ranks

    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        super().check_shape(shape, where)
        pre = where_prefix(where)
        d = len(shape)
        if any(int(n) < 1 for n in shape):
            raise ValueError(f"{pre}TTRank acts on non-empty tensors, got shape {tuple(shape)}")
        if not isinstance(self.ranks, int) and len(self.ranks) != d - 1:
            raise ValueError(f"{pre}TTRank: ranks={self.ranks} has length {len(self.ranks)} but a "
                             f"{d}-way tensor needs {d - 1} ranks (shape {tuple(shape)})")

    def rank_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Effective internal ranks ``(r_1, ..., r_{d-1})`` for tensors of ``shape``."""
        self.check_shape(tuple(shape))
        return F.tt_effective_ranks(shape, self._targets(len(shape)))

    def num_params(self, shape: Sequence[int]) -> int:
        """``sum_k r_{k-1} n_k r_k`` (the sizes of the TT cores)."""
        r = (1, *self.rank_for(shape), 1)
        return int(sum(r[k] * int(n) * r[k + 1] for k, n in enumerate(shape)))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return F.project_tt(x, self.rank_for(x.shape))

    def factorize(self, x: torch.Tensor) -> list[torch.Tensor]:
        """TT cores ``[G_1, ..., G_d]``, ``G_k: (r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``, in x's dtype."""
        x = self._check_input(x)
        return [c.to(x.dtype) for c in F.tt_svd(x, self.rank_for(x.shape))]

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        """Full tensor from the cores (``tensorly.tt_to_tensor``), reshaped to ``shape``."""
        return F.tt_to_tensor(list(factors)).reshape(tuple(shape))

    #: Damping of :meth:`factor_grams`, relative to the largest eigenvalue of each interface
    #: Gram matrix (as :attr:`LowRank.scaled_gd_damping`).
    scaled_gd_damping: float = 1e-2

    def factor_grams(self, factors):
        r"""ScaledGD for TT cores (as :meth:`LowRank.factor_grams`, one core at a time): core
        ``G_k: (r_{k-1}, n_k, r_k)`` enters the tensor through its left interface ``L_{<k}:
        (n_1...n_{k-1}, r_{k-1})`` (the product of the cores before it) and its right interface
        ``R_{>k}: (r_k, n_{k+1}...n_d)``; its gradient is mapped to ``(L^T L + delta I)^{-1} grad
        (R R^T + delta I)^{-1}`` on its rank indices (``delta = scaled_gd_damping * lambda_max``
        of each Gram matrix; no map on the boundary ranks ``r_0 = r_d = 1``).  The step of core
        ``k`` alone then moves the tensor by the orthogonal projection of the dense gradient
        onto ``{L_{<k} X R_{>k}}`` (``delta -> 0``), so a step of all ``d`` cores moves it by at
        most ``d`` times the dense step whatever the cores' scales; with two cores this is
        :class:`LowRank`'s map.  The Gram matrices come from the recursion ``L_{<k+1}^T
        L_{<k+1} = sum_i G_k[:, i, :]^T (L_{<k}^T L_{<k}) G_k[:, i, :]`` (and its mirror), never
        from the interfaces themselves."""
        cores = [c.detach() for c in factors]
        d = len(cores)
        damping = self.scaled_gd_damping
        left: list = [None] * d  # left[k] = L_{<k}^T L_{<k}, (r_{k-1}, r_{k-1}), k >= 1
        right: list = [None] * d  # right[k] = R_{>k} R_{>k}^T, (r_k, r_k), k <= d - 2
        for k in range(1, d):
            c = cores[k - 1]
            left[k] = (torch.einsum("aic,aid->cd", c, c) if k == 1
                       else torch.einsum("ab,aic,bid->cd", left[k - 1], c, c))
        for k in range(d - 2, -1, -1):
            c = cores[k + 1]
            right[k] = (torch.einsum("aic,bic->ab", c, c) if k == d - 2
                        else torch.einsum("cd,aic,bid->ab", right[k + 1], c, c))
        out = []
        for k in range(d):
            specs = ((GramSpec("left", left[k], damping),) if k > 0 else ()) + \
                ((GramSpec("right", right[k], damping),) if k < d - 1 else ())
            out.append(specs or None)
        return out

    def _contains(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
        targets = self._targets(x.dim())
        for k in range(1, x.dim()):
            s = F.unfolding_singular_values(x.detach(), k)
            tol = atol + rtol * float(s[0]) if s.numel() else atol
            nr = int((s > tol).sum())
            if nr > targets[k - 1]:
                return False, (f"unfolding {k} (shape {math.prod(x.shape[:k])} x "
                               f"{math.prod(x.shape[k:])}) has numerical rank {nr} > "
                               f"ranks[{k - 1}]={targets[k - 1]}")
        return True, ""

    def __repr__(self) -> str:
        return f"TTRank(ranks={self.ranks})"
