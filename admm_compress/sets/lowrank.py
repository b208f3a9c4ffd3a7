"""Matrices of bounded rank: :class:`LowRank`."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import functional as F
from .._validation import check_choice, check_finite, check_float, check_int, check_tensor, where_prefix
from .base import ConstraintSet, GramSpec

__all__ = ["LowRank"]


class LowRank(ConstraintSet):
    r"""Matrices of rank at most ``r``: ``C_r = {X in R^{m x n} : rank(X) <= r}``.

    Acts on the last two dimensions and broadcasts over leading ones (``x.shape = (..., m, n)``,
    one rank constraint per matrix).

    Parameters
    ----------
    rank : int, optional
        Target rank ``r >= 1``.  ``r >= min(m, n)`` makes the projection the identity.
    ratio : float, optional
        Fraction of ``min(m, n)`` kept, in ``(0, 1]``:
        ``r = max(min_rank, int(ratio * min(m, n) + 1e-9))``.  LRPET's pruning ratio is
        ``P = 1 - ratio`` (Sec. III-D).
    energy : float, optional
        TRP's criterion in ``(0, 1]``: per matrix, the smallest ``r`` with
        ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2`` (at least ``min_rank``).
    energy_transfer : bool, default False
        LRPET Eq. 6: scale the kept singular values by ``alpha = ||s|| / ||s_{1:r}||`` so that
        ``||P(X)||_F = ||X||_F``.  The map is then **not** a Euclidean projection (it is
        ``alpha * Pi_r(X)``); :meth:`contains` still checks the rank only.
    min_rank : int, default 1
        Lower bound on the rank chosen by ``ratio`` or ``energy``.
    svd : {"exact", "randomized", "auto"}, default "exact"
        How the truncated SVD is computed.  ``"exact"``: full SVD
        (:func:`admm_compress.functional.svd`), the exact Euclidean projection.
        ``"randomized"``: ``torch.svd_lowrank`` with ``q = r + oversample`` test vectors and
        ``niter`` power iterations (:func:`admm_compress.functional.randomized_svd`); the result
        has rank ``<= r`` but is only near-optimal (close to Eckart-Young on a decaying
        spectrum).  ``"auto"``: randomized only for matrices with ``min(m, n) > 256`` and
        ``r <= min(m, n) / 4``, exact otherwise.  The energy criterion needs the whole spectrum:
        ``energy=`` with ``svd="randomized"`` raises ``ValueError`` and ``"auto"`` stays exact.
        Energy transfer and the metric work with every option.
    oversample : int, default 10
        Extra test vectors of the randomized SVD (``>= 0``).
    niter : int, default 2
        Power (subspace) iterations of the randomized SVD (``>= 0``).

    Exactly one of ``rank``, ``ratio``, ``energy`` must be given.

    Notes
    -----
    Projection (Eckart-Young; LRPET Eq. 2): with the SVD ``X = U diag(s) V^T``,
    ``Pi_r(X) = sum_{i<=r} s_i u_i v_i^T`` and ``||X - Pi_r(X)||_F^2 = sum_{i>r} s_i^2``.
    Cost: one (batched) SVD, ``O(m n min(m, n))`` per matrix, in float32 (float64 for float64
    input), result cast back to the input dtype; randomized: ``O(m n (r + oversample)
    (2 niter + 2))`` (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    *Metric projection* (LRPET BN rectification, Eq. 7-10, Algorithm 1 lines 5-10).  Given a
    diagonal row metric ``D = diag(d)`` (e.g. ``d = gamma / sqrt(running_var + eps_bn)`` of the
    BatchNorm that follows the layer), ``project(X, metric=d)`` computes
    ``W~ = Pi_r(D X)`` (with energy transfer if enabled) and maps back with the regularized
    inverse ``diag(d / (d^2 + metric_eps))`` (Eq. 10, ``metric_eps = 1e-5``).  For invertible
    ``D`` and ``metric_eps -> 0`` (without energy transfer) this is the exact minimizer of
    ``||D (X' - X)||_F`` over rank-``r`` matrices ``X'``, because ``X' -> D X'`` maps the
    rank-``r`` matrices onto themselves.  The sign of ``d`` does not matter; a zero ``d_i`` maps
    row ``i`` to zero.

    *Energy criterion*: the rank is chosen from the data, so the map is a rank-selection rule,
    not the projection onto one fixed set: applied twice it may drop further components
    (``s = (3, 1, 1)``, ``energy = 0.9`` keeps ``(3, 1)``, which then keeps ``(3)``).  Here
    :meth:`contains` accepts ``X`` when the rule would keep all of ``X``'s numerical rank
    (``X`` is a fixed point), so ``contains(project(X))`` can be ``False`` in this mode.

    The factored form (LRPET Sec. III-E) is ``U_r sqrt(S_r)`` times ``sqrt(S_r) V_r^T``,
    ``r (m + n)`` numbers instead of ``m n``.
    """

    min_dim = 2
    broadcasts = True
    settles_long_runs = True  # settle="auto": ADMM for 0.2 of fit's epochs, then the factors (ScaledGD, 0.3 lr)

    def __init__(self, rank: int | None = None, ratio: float | None = None,
                 energy: float | None = None, energy_transfer: bool = False, min_rank: int = 1,
                 svd: str = "exact", oversample: int = 10, niter: int = 2):
        given = [n for n, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"LowRank: give exactly one of rank=, ratio=, energy=; got "
                             f"{', '.join(given) if given else 'none'}")
        self.rank = None if rank is None else check_int("rank", rank, low=1, where="LowRank")
        self.ratio = None if ratio is None else check_float(
            "ratio", ratio, low=0.0, high=1.0, low_open=True, where="LowRank")
        self.energy = None if energy is None else check_float(
            "energy", energy, low=0.0, high=1.0, low_open=True, where="LowRank")
        if not isinstance(energy_transfer, bool):
            raise TypeError(f"LowRank: energy_transfer must be a bool, got {energy_transfer!r}")
        self.energy_transfer = energy_transfer
        self.min_rank = check_int("min_rank", min_rank, low=1, where="LowRank")
        self.svd = check_choice("svd", svd, ("exact", "randomized", "auto"), where="LowRank")
        self.oversample = check_int("oversample", oversample, low=0, where="LowRank")
        self.niter = check_int("niter", niter, low=0, where="LowRank")
        if self.energy is not None and self.svd == "randomized":
            raise ValueError("LowRank: svd='randomized' is not supported with energy= (the energy "
                             "criterion needs the whole spectrum); use svd='exact' or 'auto'")
        self.metric_eps = 1e-5

    # ---------------------------------------------------------------- shapes
    def check_shape(self, shape: Sequence[int], where: str | None = None) -> None:
        super().check_shape(shape, where)
        m, n = shape[-2], shape[-1]
        if m < 1 or n < 1:
            pre = where_prefix(where)
            raise ValueError(f"{pre}LowRank acts on non-empty matrices, got shape {tuple(shape)}")

    def rank_for(self, shape: Sequence[int]) -> int | None:
        """Target rank for matrices of ``shape[-2:]`` (capped at ``min(m, n)``); ``None`` for
        the data-dependent energy criterion."""
        self.check_shape(tuple(shape))
        m, n = int(shape[-2]), int(shape[-1])
        q = min(m, n)
        if self.rank is not None:
            return min(self.rank, q)
        if self.ratio is not None:
            return F.rank_from_ratio(self.ratio, m, n, self.min_rank)
        return None

    def num_params(self, shape: Sequence[int]) -> int:
        """``batch * r * (m + n)`` numbers in factored form.

        Raises ``ValueError`` for the energy criterion, whose rank depends on the data (count
        the factors of :meth:`factorize` instead).
        """
        r = self.rank_for(shape)
        if r is None:
            raise ValueError(f"{self!r}: the rank is chosen from the data (energy criterion), "
                             f"so num_params cannot be computed from the shape alone")
        batch = math.prod(shape[:-2])
        return int(batch * r * (shape[-2] + shape[-1]))

    # -------------------------------------------------------------- operators
    def _check_metric(self, metric, x: torch.Tensor) -> torch.Tensor | None:
        if metric is None:
            return None
        metric = check_tensor("metric", metric, where="LowRank")
        rows = tuple(x.shape[:-1])
        if tuple(metric.shape) not in ((x.shape[-2],), rows):
            raise ValueError(f"LowRank: metric must have shape ({x.shape[-2]},) (one weight per "
                             f"row) or {rows}, got {tuple(metric.shape)}")
        check_finite("metric", metric, where="LowRank")
        return metric

    def svd_method_for(self, shape: Sequence[int]) -> str:
        """``"exact"`` or ``"randomized"``: the SVD used for matrices of ``shape[-2:]``."""
        if self.svd == "auto":
            r = self.rank_for(shape)
            return "randomized" if r is not None and F.use_randomized(shape[-2], shape[-1], r) else "exact"
        return self.svd

    def _args(self, x: torch.Tensor) -> dict:
        r = self.rank_for(x.shape)
        return dict(rank=r, energy=self.energy, energy_transfer=self.energy_transfer,
                    min_rank=self.min_rank, metric_eps=self.metric_eps,
                    method=self.svd_method_for(x.shape), oversample=self.oversample,
                    niter=self.niter)

    def _is_identity(self, x: torch.Tensor) -> bool:
        r = self.rank_for(x.shape)
        return r is not None and r >= min(x.shape[-2], x.shape[-1])

    def project(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
        """Rank-``r`` projection of every matrix ``x[..., :, :]`` (optionally in a row metric).

        Parameters
        ----------
        x : Tensor (..., m, n)
        metric : Tensor, optional
            Diagonal row metric ``d``: shape ``(m,)`` or ``x.shape[:-1]``, finite.

        Returns
        -------
        Tensor of ``x``'s shape, dtype and device; ``x`` is not modified.
        """
        x = self._check_input(x)
        metric = self._check_metric(metric, x)
        return self._project(x, metric)

    def _project(self, x: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:
        if self._is_identity(x):
            return x.clone()
        return F.project_rank(x, metric=metric, **self._args(x))

    def factorize(self, x: torch.Tensor, metric: torch.Tensor | None = None):
        """``(U, V)``, ``U: (..., m, r) = U_r sqrt(S_r)``, ``V: (..., r, n) = sqrt(S_r) V_r^T``.

        ``U @ V == project(x, metric)`` (up to rounding); with the identity case
        (``r >= min(m, n)``) the factors are those of the full reduced SVD of ``x``.
        """
        x = self._check_input(x)
        metric = self._check_metric(metric, x)
        if self._is_identity(x):
            return F.lowrank_factors(x, min(x.shape[-2:]))
        return F.lowrank_factors(x, metric=metric, **self._args(x))

    def reconstruct(self, factors, shape: Sequence[int]) -> torch.Tensor:
        """``U @ V`` reshaped to ``shape``."""
        U, V = factors
        return (U @ V).reshape(tuple(shape))

    #: Damping of :meth:`factor_grams`, relative to the largest eigenvalue of ``V V^T`` /
    #: ``U^T U``: it bounds the gain in the weakest kept directions to ``1 / damping`` times the
    #: strongest's.
    scaled_gd_damping: float = 1e-2

    def factor_grams(self, factors):
        r"""ScaledGD's preconditioning (Tong, Ma & Chi, JMLR 2021; used with SGD / AdamW on
        network factors by Zhang & Pilanci, ICML 2024): ``grad_U -> grad_U (V V^T + delta
        I)^{-1}``, ``grad_V -> (U^T U + delta I)^{-1} grad_V``, ``delta = scaled_gd_damping *
        lambda_max``.  For ``W = U V`` a step ``eta`` then moves ``W`` by ``-eta (P_U G + G
        P_V)`` to first order (``G = dL/dW``, ``P`` the projections onto the column / row
        spaces, ``delta -> 0``): a dense step restricted to the tangent space of the rank-``r``
        manifold, at most twice the dense step in norm whatever the factors' singular values;
        plain factor gradients move ``W`` by up to ``2 sigma_1`` times it along the leading
        directions and by ``sigma_r`` times it along the weakest.  Returns ``((GramSpec("right",
        V V^T),), (GramSpec("left", U^T U),))``."""
        U, V = factors
        u, v = U.detach(), V.detach()
        damping = self.scaled_gd_damping
        return (GramSpec("right", v @ v.mT, damping),), (GramSpec("left", u.mT @ u, damping),)

    def _contains(self, x: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
        s = F.svdvals(x)
        q = s.shape[-1]
        if self.energy is not None:
            r = F.energy_rank(s, self.energy, self.min_rank)
        else:
            r = torch.full(s.shape[:-1], self.rank_for(x.shape), dtype=torch.long, device=s.device)
        tol = atol + rtol * s[..., :1]
        idx = torch.arange(q, device=s.device)
        over = (s > tol) & (idx >= r.unsqueeze(-1))
        if bool(over.any()):
            numrank = (s > tol).sum(-1)
            worst = int((numrank - r).argmax()) if numrank.dim() else 0
            nr = int(numrank.reshape(-1)[worst])
            rr = int(r.reshape(-1)[worst])
            return False, (f"numerical rank {nr} exceeds the target rank {rr} "
                           f"(matrix {worst} of the batch; tolerance atol + rtol * s_1)")
        return True, ""

    def __repr__(self) -> str:
        if self.rank is not None:
            arg = f"rank={self.rank}"
        elif self.ratio is not None:
            arg = f"ratio={self.ratio}"
        else:
            arg = f"energy={self.energy}"
        extra = ", energy_transfer=True" if self.energy_transfer else ""
        if self.min_rank != 1:
            extra += f", min_rank={self.min_rank}"
        if self.svd != "exact":
            extra += f", svd={self.svd!r}"
            if self.oversample != 10:
                extra += f", oversample={self.oversample}"
            if self.niter != 2:
                extra += f", niter={self.niter}"
        return f"LowRank({arg}{extra})"
