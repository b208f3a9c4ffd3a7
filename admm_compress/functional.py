"""Pure tensor functions behind the constraint sets (no classes, no argument checks).

Everything here takes and returns ``torch`` tensors on the input's device and never modifies
its input.  Linear algebra runs in ``float32`` at least (``float64`` when the input is
``float64``) and results are cast back to the input dtype.  The classes in
:mod:`admm_compress.sets` validate arguments and call these functions.

Contents
--------
Robust SVD (every SVD of this module goes through these)
    :func:`svd`, :func:`svdvals`, :func:`randomized_svd`, :func:`use_randomized`.
Low rank (matrices, batched over leading dimensions)
    :func:`truncated_svd`, :func:`rank_from_ratio`, :func:`energy_rank`,
    :func:`energy_transfer_scale`, :func:`lowrank_parts`, :func:`project_rank`,
    :func:`lowrank_factors`, :func:`unfolding_singular_values`.
Cardinality
    :func:`topk_indices`, :func:`project_topk`, :func:`group_norms`,
    :func:`group_topk_indices`, :func:`project_group_topk`.
Tensor train
    :func:`tt_effective_ranks`, :func:`tt_svd`, :func:`tt_to_tensor`, :func:`project_tt`.
Schatten-p quasi-norm
    :func:`soft_threshold`, :func:`gst_threshold`, :func:`prox_power_half`,
    :func:`prox_power_newton`, :func:`prox_power`, :func:`schatten_value`,
    :func:`prox_schatten`.

Size (~690 lines): the flat namespace of tensor functions behind every set (the role of
``torch.nn.functional``), in sections -- robust SVD, low rank, cardinality, tensor train,
Schatten-p -- each a few small functions; splitting it would only add import hops.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Sequence

import torch

__all__ = [
    "compute_dtype",
    "damped_gram",
    "damp_gram",
    "scaled_gd_apply",
    "svd",
    "svdvals",
    "randomized_svd",
    "use_randomized",
    "SVD_METHODS",
    "truncated_svd",
    "rank_from_ratio",
    "energy_rank",
    "energy_transfer_scale",
    "lowrank_parts",
    "project_rank",
    "joint_topk_masks",
    "lowrank_factors",
    "unfolding_singular_values",
    "topk_indices",
    "project_topk",
    "group_norms",
    "group_topk_indices",
    "project_group_topk",
    "tt_effective_ranks",
    "tt_svd",
    "tt_to_tensor",
    "project_tt",
    "soft_threshold",
    "gst_threshold",
    "prox_power_half",
    "prox_power_newton",
    "prox_power",
    "schatten_value",
    "prox_schatten",
]

log = logging.getLogger(__name__)


# ============================================================================ helpers
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the linear algebra runs in: ``float64`` for ``float64`` input, else ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """``float64`` for the scalar prox root finding, unless the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


# ============================================================================ robust SVD
#: Relative size of the diagonal jitter of the last SVD attempt (see :func:`svd`).
SVD_JITTER = {torch.float64: 1e-10, torch.float32: 1e-6}

#: Accepted values of the ``method`` argument of the low-rank functions.
SVD_METHODS = ("exact", "randomized")


def _is_convergence_error(err: BaseException) -> bool:
    """A LAPACK/cuSOLVER convergence failure (retryable), as opposed to e.g. out of memory."""
    if isinstance(err, torch.linalg.LinAlgError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("converge" in msg or "ill-conditioned" in msg)


def _attempt(fn, xc: torch.Tensor, in_ok: torch.Tensor | None):
    """Run ``fn(xc)``; return ``(outputs, None)`` or ``(None, reason)`` on a retryable failure.

    ``in_ok`` (a 0-d bool tensor, or ``None``) is synchronized together with the output check so
    that the common path costs one device sync.  Non-finite input raises ``ValueError``.
    """
    try:
        out = fn(xc)
    except RuntimeError as err:
        if not _is_convergence_error(err):
            raise
        if in_ok is not None and not bool(in_ok):
            _raise_nonfinite(xc)
        return None, f"raised {type(err).__name__}: {str(err).splitlines()[0]}"
    outs = out if isinstance(out, tuple) else (out,)
    if xc.device.type == "meta":
        return out, None
    flags = [torch.isfinite(o).all() for o in outs]
    if in_ok is not None:
        flags.append(in_ok)
    ok = torch.stack(flags)
    if bool(ok.all()):
        return out, None
    if in_ok is not None and not bool(ok[-1]):
        _raise_nonfinite(xc)
    return None, "returned non-finite values"


def _raise_nonfinite(x: torch.Tensor):
    n_bad = int((~torch.isfinite(x)).sum())
    raise ValueError(f"SVD input of shape {tuple(x.shape)} has {n_bad} non-finite entries "
                     f"(NaN or inf); only finite matrices can be decomposed")


def _robust(fn, x: torch.Tensor, name: str):
    """``fn`` (an SVD routine) applied to ``x`` in the compute dtype, with the fallbacks of :func:`svd`."""
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    in_ok = None if xc.device.type == "meta" else torch.isfinite(xc).all()
    out, reason = _attempt(fn, xc, in_ok)
    if out is not None:
        return out
    shape = tuple(x.shape)
    wide = _scalar_dtype(xc.device)          # float64 unless the device lacks it (MPS)
    tries = []
    if dt != wide:
        tries.append((f"retrying in {wide}", lambda: xc.to(wide)))
    eps_rel = SVD_JITTER[wide]

    def jittered():
        x64 = xc.to(wide)
        k = min(x64.shape[-2], x64.shape[-1])
        scale = eps_rel * torch.linalg.matrix_norm(x64.detach(), ord="fro")
        eye = torch.eye(k, dtype=wide, device=x64.device)
        pad = torch.zeros_like(x64)
        pad[..., :k, :k] = scale[..., None, None] * eye
        return x64 + pad

    tries.append((f"retrying in {wide} with diagonal jitter {eps_rel:g} * ||x||_F * I "
                  f"on the leading {min(shape[-2:])}x{min(shape[-2:])} block", jittered))
    for what, make in tries:
        log.warning("%s of a %s tensor of shape %s %s; %s", name, dt, shape, reason, what)
        out, reason = _attempt(fn, make(), None)
        if out is not None:
            if isinstance(out, tuple):
                return tuple(o.to(dt) for o in out)
            return out.to(dt)
    raise torch.linalg.LinAlgError(
        f"{name} failed for a tensor of shape {shape} ({dt}) and after "
        f"{'; '.join(w for w, _ in tries)} (last attempt {reason}); the matrix is likely "
        f"badly scaled (entries near the floating-point limits)")


def svd(x: torch.Tensor, full_matrices: bool = False):
    """``torch.linalg.svd`` of ``x[..., :, :]`` in the compute dtype, with fallbacks.

    The single entry point for every SVD of this module.  Returns ``(U, s, Vh)`` in
    :func:`compute_dtype` (differentiable like ``torch.linalg.svd``).  If the decomposition
    raises a convergence error (``torch.linalg.LinAlgError`` or a ``RuntimeError`` saying it
    failed to converge) or returns non-finite values:

    1. it is recomputed in ``float64`` (skipped when the compute dtype already is ``float64``,
       or the device has no ``float64``);
    2. then on ``x + j I_k`` with ``j = SVD_JITTER[float64] * ||x||_F`` (``1e-10`` relative,
       per matrix; ``I_k`` fills the leading ``k x k`` block, ``k = min(m, n)``), which moves
       every singular value by at most ``j`` (Weyl) -- far below float32 resolution.

    Each retry logs a WARNING (logger ``admm_compress.functional``) naming the shape and what
    was done; results are cast back to the compute dtype.  If every attempt fails,
    ``torch.linalg.LinAlgError`` is raised.  Input with NaN or inf raises ``ValueError``
    (never jittered).  Other errors (e.g. out of memory) propagate unchanged.  Cost: one SVD,
    ``O(b m n min(m, n))``, plus one device sync for the finiteness checks.
    """
    fm = bool(full_matrices)
    return _robust(lambda a: torch.linalg.svd(a, full_matrices=fm), x, "torch.linalg.svd")


def svdvals(x: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` (descending, compute dtype) with the fallbacks of :func:`svd`."""
    return _robust(torch.linalg.svdvals, x, "torch.linalg.svdvals")


def rank_tolerance(s: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """The numerical-rank threshold ``max(m, n) * eps(dtype) * s_max`` per matrix (shape
    ``(..., 1)``) for singular values ``s`` (descending) of matrices of ``shape[-2:]`` stored in
    ``dtype``: the rule of ``numpy.linalg.matrix_rank`` / ``torch.linalg.matrix_rank``.  The one
    threshold of this library (:func:`numerical_rank`, ``SchattenP.factorize``, TRP's kept ranks)."""
    return s.max(-1, keepdim=True).values * max(shape[-2:]) * torch.finfo(dtype).eps


def numerical_rank_of(s: torch.Tensor, shape, dtype: torch.dtype) -> int:
    """Number of singular values ``s`` above :func:`rank_tolerance` (max over a batch, at least 1)."""
    return max(1, int((s > rank_tolerance(s, shape, dtype)).sum(-1).max()))


def numerical_rank(x: torch.Tensor) -> int:
    """Number of singular values above ``max(m, n) * eps(dtype of x) * s_max`` (max over a batch,
    at least 1): the rank ``numpy.linalg.matrix_rank`` would report, in the input's precision."""
    return numerical_rank_of(svdvals(x.to(torch.float64)), x.shape, x.dtype)


def use_randomized(m: int, n: int, rank: int) -> bool:
    """The ``"auto"`` rule: randomized SVD when ``min(m, n) > 256`` and ``rank <= min(m, n) / 4``."""
    q = min(int(m), int(n))
    return q > 256 and int(rank) <= q / 4


def _fork_rng(device: torch.device):
    """Leave the caller's RNG stream untouched by the random test matrix of ``svd_lowrank``."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[idx], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def randomized_svd(x: torch.Tensor, rank: int, *, oversample: int = 10, niter: int = 2):
    """Rank-``rank`` truncated SVD by ``torch.svd_lowrank`` (Halko, Martinsson & Tropp 2011).

    Randomized range finder with ``q = min(rank + oversample, m, n)`` Gaussian test vectors and
    ``niter`` subspace (power) iterations (Halko et al., Alg. 4.4 + 5.1), then an exact SVD of
    the ``q x n`` projected matrix.  Returns ``(U, s, Vh)`` like :func:`truncated_svd` with
    ``q = rank`` columns, in the compute dtype, batched over leading dimensions (one test matrix
    shared by the batch).  Cost ``O(b m n q (2 niter + 2))`` instead of ``O(b m n min(m, n))``.
    Error: with a decaying spectrum it is close to the Eckart-Young optimum
    ``(sum_{i>r} s_i^2)^{1/2}``; each power iteration sharpens it by ``(s_{r+1}/s_r)^2``.

    The random draw comes from the global generator but inside ``torch.random.fork_rng``, so
    the caller's RNG stream is not advanced (results are reproducible under a fixed seed).
    If ``torch.svd_lowrank`` fails to converge or returns non-finite values, the exact
    :func:`svd` (with its fallbacks) is used, with a WARNING.
    """
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    m, n = xc.shape[-2], xc.shape[-1]
    rank = int(rank)
    q = min(rank + int(oversample), m, n)
    in_ok = None if xc.device.type == "meta" else torch.isfinite(xc).all()
    with _fork_rng(xc.device):
        out, reason = _attempt(lambda a: torch.svd_lowrank(a, q=q, niter=int(niter)), xc, in_ok)
    if out is None:
        log.warning("torch.svd_lowrank of a %s tensor of shape %s %s; using the exact SVD",
                    dt, tuple(x.shape), reason)
        U, s, Vh = svd(xc)
    else:
        U, s, V = out
        Vh = V.mT
    return U[..., :rank], s[..., :rank], Vh[..., :rank, :]


# ============================================================================ low rank
def truncated_svd(x: torch.Tensor, rank: int | None = None, *, method: str = "exact",
                  oversample: int = 10, niter: int = 2):
    """Reduced SVD of the matrices ``x[..., :, :]``, optionally truncated to ``rank``.

    Returns ``(U, s, Vh)`` in :func:`compute_dtype` with ``U: (..., m, q)``, ``s: (..., q)``
    (descending), ``Vh: (..., q, n)``, ``q = min(m, n, rank)``.  Cost ``O(b m n min(m, n))``
    (:func:`svd`).  ``method="randomized"`` (needs ``rank``) uses :func:`randomized_svd`.
    """
    if method == "randomized":
        if rank is None:
            raise ValueError("truncated_svd: method='randomized' needs a rank, got rank=None")
        return randomized_svd(x, min(int(rank), *x.shape[-2:]), oversample=oversample, niter=niter)
    U, s, Vh = svd(x)
    if rank is not None and rank < s.shape[-1]:
        U, s, Vh = U[..., :rank], s[..., :rank], Vh[..., :rank, :]
    return U, s, Vh


def rank_from_ratio(ratio: float, m: int, n: int, min_rank: int = 1) -> int:
    """Rank kept for a ``(m, n)`` matrix: ``max(min_rank, int(ratio * min(m, n) + 1e-9))``.

    Capped at ``min(m, n)``.  ``ratio = 1 - P`` with LRPET's pruning ratio ``P`` (Sec. III-D);
    the ``1e-9`` guards against ``0.25 * 16 = 3.9999...``.
    """
    q = min(m, n)
    return min(q, max(int(min_rank), int(ratio * q + 1e-9)))


def damped_gram(M: torch.Tensor, damping: float) -> torch.Tensor | None:
    """``M + damping * lambda_max(M) I`` for symmetric PSD Gram matrices ``M: (..., r, r)`` (the
    ScaledGD preconditioners of ``LowRank`` / ``TTRank``), ``None`` when ``M`` is not finite."""
    if not bool(torch.isfinite(M).all()):
        return None
    return damp_gram(M, damping)


def damp_gram(M: torch.Tensor, damping: float) -> torch.Tensor:
    """``M + damping * lambda_max(M) I`` per matrix of a finite batch ``M: (..., r, r)`` (no
    finiteness check; :func:`damped_gram` and ``parametrizations.ScaledGDHooks`` check first)."""
    lam = torch.linalg.eigvalsh(M)[..., -1:].unsqueeze(-1).clamp_min(torch.finfo(M.dtype).tiny)
    return M + (damping * lam) * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)


def scaled_gd_apply(g: torch.Tensor, specs) -> torch.Tensor:
    """Apply a factor's ScaledGD Gram matrices (``sets.GramSpec``: ``side``, ``gram``,
    ``damping``) in order to its gradient ``g``: ``"left"`` solves ``(M + delta I) X = g`` with
    ``g`` viewed as ``(*batch, r, -1)``, ``"right"`` ``X (M + delta I) = g`` with ``g`` viewed as
    ``(*batch, -1, r)`` (:func:`damped_gram`).  If any Gram matrix is not finite, ``g`` is
    returned as it is.  One factor at a time (the reference of
    ``parametrizations.precondition``'s batched hooks)."""
    damped = []
    for spec in specs:
        M = damped_gram(spec.gram, spec.damping)
        if M is None:
            return g
        damped.append((spec.side, M))
    out = g
    for side, M in damped:
        out = _gram_solve(side, M, out)
    return out


def _gram_solve(side: str, M: torch.Tensor, g: torch.Tensor, lu=None) -> torch.Tensor:
    """``M^{-1} g`` (``side="left"``, ``g`` viewed as ``(*batch, r, -1)``) or ``g M^{-1}``
    (``"right"``, ``(*batch, -1, r)``; ``M`` symmetric), with ``M``'s LU factors ``lu = (LU,
    pivots)`` when given."""
    batch, r = M.shape[:-2], M.shape[-1]
    if side == "left":
        b = g.reshape(*batch, r, -1)
    elif side == "right":
        b = g.reshape(*batch, -1, r).mT
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    x = torch.linalg.solve(M, b) if lu is None else torch.linalg.lu_solve(lu[0], lu[1], b)
    return (x if side == "left" else x.mT).reshape(g.shape)


def energy_rank(s: torch.Tensor, energy: float, min_rank: int = 1) -> torch.Tensor:
    """TRP's energy criterion: smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2``.

    ``s`` holds descending singular values on its last dimension; returns an ``int64`` tensor of
    shape ``s.shape[:-1]``, clamped to ``[min_rank, len(s)]``.  An all-zero spectrum gets
    ``min_rank``.  The comparison allows a relative ``4 eps`` of rounding in the cumulative sum,
    so that e.g. a flat spectrum ``(1, 1, 1, 1)`` with ``energy = 0.75`` keeps 3 values even
    when the computed singular values are ``1 - eps``.
    """
    q = s.shape[-1]
    e = s.to(compute_dtype(s.dtype)) ** 2
    c = torch.cumsum(e, dim=-1)
    total = c[..., -1:]
    # number of prefixes that are still short of the target, +1
    short = (c < energy * total * (1 - 4 * torch.finfo(c.dtype).eps)).sum(dim=-1)
    r = short + 1
    return r.clamp(min=min(int(min_rank), q), max=q)


def energy_transfer_scale(s: torch.Tensor, rank, total: torch.Tensor | None = None) -> torch.Tensor:
    """LRPET Eq. 6: ``alpha = ||s|| / ||s_{1:r}||`` per matrix (1 where ``s_{1:r} = 0``).

    ``rank`` is an int or an ``int64`` tensor of shape ``s.shape[:-1]``.  ``total`` is
    ``||s||^2`` per matrix when ``s`` is only the leading part of the spectrum (randomized
    SVD): it then equals ``||X||_F^2``.
    """
    e = s ** 2
    keep = _rank_mask(s, rank)
    kept = (e * keep).sum(dim=-1)
    if total is None:
        total = e.sum(dim=-1)
    safe = torch.where(kept > 0, kept, torch.ones_like(kept))
    return torch.where(kept > 0, torch.sqrt(total / safe), torch.ones_like(kept))


def _rank_mask(s: torch.Tensor, rank) -> torch.Tensor:
    """``mask[..., i] = i < rank[...]`` in the dtype of ``s``."""
    idx = torch.arange(s.shape[-1], device=s.device)
    if isinstance(rank, torch.Tensor):
        return (idx < rank.unsqueeze(-1)).to(s.dtype)
    return (idx < int(rank)).to(s.dtype).expand_as(s)


def lowrank_parts(x: torch.Tensor, rank=None, *, energy: float | None = None,
                  energy_transfer: bool = False, min_rank: int = 1,
                  metric: torch.Tensor | None = None, metric_eps: float = 1e-5,
                  method: str = "exact", oversample: int = 10, niter: int = 2):
    """The pieces of the (metric) rank-``r`` projection of ``x`` (..., m, n).

    Returns ``(U, s, Vh, left)`` in the compute dtype with ``U: (..., m, q)``, ``s: (..., q)``
    (singular values after truncation and optional energy transfer; zeros beyond each matrix's
    rank), ``Vh: (..., q, n)`` and ``left`` either ``None`` or the row scale
    ``d / (d^2 + eps)`` of shape ``(..., m)``, so that the projection is
    ``left[..., None] * (U * s[..., None, :]) @ Vh``.

    ``rank`` is an int (all matrices) or ``None`` with ``energy`` given (per matrix).  With a
    ``metric`` ``d`` the SVD is that of ``diag(d) x`` (LRPET Algorithm 1, lines 5-10).

    ``method="exact"`` uses :func:`svd`; ``"randomized"`` uses :func:`randomized_svd` with
    ``oversample`` and ``niter`` (fixed int ``rank`` only, not the energy criterion); energy
    transfer then takes ``||s||^2 = ||diag(d) x||_F^2`` exactly.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"lowrank_parts: method={method!r} is not allowed; choose one of {SVD_METHODS}")
    if method == "randomized" and (energy is not None or rank is None):
        raise ValueError("lowrank_parts: method='randomized' needs a fixed int rank; the energy "
                         "criterion needs the whole spectrum (use method='exact')")
    dt = compute_dtype(x.dtype)
    xc = x.to(dt)
    left = None
    if metric is not None:
        d = metric.to(device=x.device, dtype=dt)
        xc = d.unsqueeze(-1) * xc
        left = d / (d * d + metric_eps)
    if method == "randomized":
        r = min(int(rank), xc.shape[-2], xc.shape[-1])
        U, s, Vh = randomized_svd(xc, r, oversample=oversample, niter=niter)
        if energy_transfer:
            total = torch.linalg.matrix_norm(xc, ord="fro") ** 2
            s = s * energy_transfer_scale(s, r, total=total).unsqueeze(-1)
        return U, s, Vh, left
    U, s, Vh = svd(xc)
    alpha = None
    if energy is not None:
        r = energy_rank(s, energy, min_rank)
        if energy_transfer:  # alpha from the whole spectrum, before it is cut to the largest rank
            alpha = energy_transfer_scale(s, r)
        q = int(r.max()) if r.numel() else 1
        U, s, Vh = U[..., :q], s[..., :q], Vh[..., :q, :]
        keep = _rank_mask(s, r)
    else:
        r = int(rank)
        keep = None
    if energy_transfer and alpha is None:
        alpha = energy_transfer_scale(s, r)
    if keep is None:
        U, s, Vh = U[..., :r], s[..., :r], Vh[..., :r, :]
    else:
        s = s * keep
    if energy_transfer:
        s = s * alpha.unsqueeze(-1)
    return U, s, Vh, left


def project_rank(x: torch.Tensor, rank=None, *, energy: float | None = None,
                 energy_transfer: bool = False, min_rank: int = 1,
                 metric: torch.Tensor | None = None, metric_eps: float = 1e-5,
                 method: str = "exact", oversample: int = 10, niter: int = 2) -> torch.Tensor:
    """Best rank-``r`` approximation of every matrix ``x[..., :, :]`` (Eckart-Young).

    ``Pi_r(X) = sum_{i<=r} s_i u_i v_i^T`` (LRPET Eq. 2).  With ``energy_transfer`` the kept
    singular values are scaled by ``||s|| / ||s_{1:r}||`` (Eq. 6); with a ``metric`` ``d`` the
    result is ``diag(d / (d^2 + eps)) Pi_r(diag(d) X)`` (Eq. 7-10).  Returns ``x``'s dtype.
    Cost: one batched SVD, ``O(b m n min(m, n))``; ``method="randomized"``
    (:func:`randomized_svd`) costs ``O(b m n (r + oversample) (2 niter + 2))`` and is
    near-optimal rather than exact.
    """
    U, s, Vh, left = lowrank_parts(x, rank, energy=energy, energy_transfer=energy_transfer,
                                   min_rank=min_rank, metric=metric, metric_eps=metric_eps,
                                   method=method, oversample=oversample, niter=niter)
    out = (U * s.unsqueeze(-2)) @ Vh
    if left is not None:
        out = left.unsqueeze(-1) * out
    return out.to(x.dtype)


def sqrt_split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor):
    """The balanced factor pair ``(U diag(sqrt(s)), diag(sqrt(s)) Vh)`` of ``U diag(s) Vh``
    (batched): the one ``sqrt(S)`` split behind every factored export (LRPET Sec. III-E)."""
    rs = torch.sqrt(s)
    return U * rs.unsqueeze(-2), rs.unsqueeze(-1) * Vh


def lowrank_factors(x: torch.Tensor, rank=None, **kw):
    """``(A, B)`` with ``A = [D^-1] U_r sqrt(S_r)`` (..., m, r), ``B = sqrt(S_r) V_r^T`` (..., r, n).

    ``A @ B`` equals :func:`project_rank` with the same arguments (LRPET Sec. III-E split).
    With a per-matrix (energy) rank, ``r`` is the largest rank in the batch and the unused
    columns/rows are zero.
    """
    U, s, Vh, left = lowrank_parts(x, rank, **kw)
    A, B = sqrt_split(U, s, Vh)
    if left is not None:
        A = left.unsqueeze(-1) * A
    return A.to(x.dtype), B.to(x.dtype)


def unfolding_singular_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """Singular values of the ``k``-th TT unfolding ``x.reshape(prod(n_1..n_k), -1)``."""
    rows = math.prod(x.shape[:k])
    return svdvals(x.to(compute_dtype(x.dtype)).reshape(rows, -1))


# ============================================================================ cardinality
def topk_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest entries of ``a`` (1-D scores), ties to lower index.

    Exactly ``min(k, a.numel())`` indices are returned (``int64``, ascending).  Cost ``O(n)``
    (``torch.topk`` for the threshold, then a cumulative count among the ties).
    """
    a = a.reshape(-1)
    n = a.numel()
    if k >= n:
        return torch.arange(n, device=a.device)
    t = torch.topk(a, k, sorted=False).values.min()
    gt = a > t
    eq = a == t
    room = k - gt.sum()
    mask = gt | (eq & (torch.cumsum(eq, 0) <= room))
    return mask.nonzero().reshape(-1)


def project_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest ``|x|`` entries of the whole tensor, zero the rest.

    ``Pi(x) = argmin_{card(z) <= k} ||z - x||_F`` (RASPA Eq. 12); ties go to lower flat index.
    """
    if k >= x.numel():
        return x.clone()
    idx = topk_indices(x.detach().abs(), k)
    flat = x.reshape(-1)
    out = torch.zeros_like(flat).index_copy(0, idx, flat.index_select(0, idx))
    return out.reshape(x.shape)


def joint_topk_masks(xs: Sequence[torch.Tensor], k: int,
                     weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Boolean masks of the ``k`` entries kept by the joint projection of several tensors.

    ``argmin_{card(z_1) + ... + card(z_n) <= k} sum_b w_b ||z_b - x_b||_F^2`` keeps the ``k``
    entries of largest ``w_b x^2`` over all tensors together (unweighted, ``w_b = 1``: the ``k``
    largest ``|x|`` -- global magnitude pruning); ties go to the lower index in the order
    ``xs[0].flatten(), xs[1].flatten(), ...``.  ``weights`` must be positive.
    """
    if weights is None:
        scores = torch.cat([x.detach().abs().reshape(-1) for x in xs])
    else:
        scores = torch.cat([float(w) * x.detach().to(compute_dtype(x.dtype)).reshape(-1).square()
                            for x, w in zip(xs, weights)])
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[topk_indices(scores, k)] = True
    out, o = [], 0
    for x in xs:
        out.append(keep[o:o + x.numel()].reshape(x.shape))
        o += x.numel()
    return out


def group_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm of every slice ``x.select(dim, i)`` (computed in the compute dtype)."""
    xc = x.to(compute_dtype(x.dtype)).movedim(dim, 0)
    return torch.linalg.vector_norm(xc.reshape(xc.shape[0], -1), dim=1)


def group_topk_indices(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sorted indices of the ``k`` slices along ``dim`` with the largest L2 norms."""
    return topk_indices(group_norms(x.detach(), dim), k)


def project_group_topk(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep the ``k`` slices along ``dim`` with the largest L2 norms, zero the others.

    Exact Euclidean projection onto ``{z : at most k slices z.select(dim, i) are non-zero}``.
    """
    if k >= x.shape[dim]:
        return x.clone()
    idx = group_topk_indices(x, k, dim)
    return torch.zeros_like(x).index_copy(dim, idx, x.index_select(dim, idx))


# ============================================================================ tensor train
@contextlib.contextmanager
def _tensorly_torch():
    """TensorLy's PyTorch backend for this thread only (the global backend is left alone)."""
    import tensorly as tl

    with tl.backend_context("pytorch", local_threadsafe=True):
        yield tl


def tt_effective_ranks(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Internal TT ranks TT-SVD actually produces for ``shape`` and target ``ranks`` (length d-1).

    ``r_k = min(ranks_k, r_{k-1} n_k, n_{k+1} ... n_d)`` with ``r_0 = 1``: a rank above what
    the ``k``-th unfolding allows is capped (this is also what ``tensorly`` does).
    """
    shape = tuple(int(n) for n in shape)
    out, prev = [], 1
    for k, r in enumerate(ranks):
        rk = min(int(r), prev * shape[k], math.prod(shape[k + 1:]))
        out.append(rk)
        prev = rk
    return tuple(out)


def tt_svd(x: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) via ``tensorly.decomposition.tensor_train``.

    Returns cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)``, ``r_0 = r_d = 1``, with the
    effective ranks of :func:`tt_effective_ranks`, in the compute dtype on ``x``'s device.
    Cost: ``d-1`` SVDs of matrices of at most ``numel`` entries.
    """
    from tensorly.decomposition import tensor_train

    eff = tt_effective_ranks(x.shape, ranks)
    xc = x.detach().to(compute_dtype(x.dtype))
    with _tensorly_torch():
        cores = tensor_train(xc, rank=[1, *eff, 1], svd=_tensorly_svd)
    return [c for c in cores]


def _tensorly_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_):
    """tensorly's SVD hook (``svd=callable``): :func:`svd` with its fallbacks, truncated to
    ``n_eigenvecs``; returns ``(U, s, Vh)`` as ``tensorly.truncated_svd`` does."""
    U, s, Vh = svd(matrix)
    if n_eigenvecs is not None:
        U, s, Vh = U[:, :n_eigenvecs], s[:n_eigenvecs], Vh[:n_eigenvecs]
    return U, s, Vh


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full tensor from TT cores (``tensorly.tt_to_tensor``); differentiable in the cores."""
    with _tensorly_torch() as tl:
        return tl.tt_to_tensor(list(cores))


def project_tt(x: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """TT-SVD truncation of ``x`` to TT ranks ``<= ranks`` (RASPA Eq. 8-10), in ``x``'s dtype.

    Quasi-optimal: ``||x - P(x)||_F^2 <= sum_k eps_k^2`` with ``eps_k`` the best rank-``r_k``
    error of the ``k``-th unfolding (Oseledets 2011, Thm. 2.2).
    """
    eff = tt_effective_ranks(x.shape, ranks)
    if all(e >= min(math.prod(x.shape[:k + 1]), math.prod(x.shape[k + 1:]))
           for k, e in enumerate(eff)):
        return x.clone()  # no unfolding is truncated: TT-SVD is exact
    return tt_to_tensor(tt_svd(x, ranks)).to(x.dtype).reshape(x.shape)


# ============================================================================ Schatten-p
def soft_threshold(y: torch.Tensor, lam: float) -> torch.Tensor:
    """``sign(y) max(|y| - lam, 0)``: the prox of ``lam |.|`` (p = 1)."""
    return torch.sign(y) * torch.clamp(y.abs() - lam, min=0)


def gst_threshold(lam: float, p: float) -> float:
    """Threshold of the prox of ``lam |z|^p``, 0 < p < 1 (Zuo et al., ICCV 2013, Eq. 9).

    ``tau_GST = (2 lam (1-p))^(1/(2-p)) + lam p (2 lam (1-p))^((p-1)/(2-p))``: the prox is 0
    for ``|y| <= tau_GST`` and the larger root of ``z - |y| + lam p z^(p-1) = 0`` above it.
    """
    if lam <= 0:
        return 0.0
    b = (2.0 * lam * (1.0 - p)) ** (1.0 / (2.0 - p))
    return b + lam * p * b ** (p - 1.0)


def prox_power_half(y: torch.Tensor, lam: float) -> torch.Tensor:
    """Closed-form prox of ``lam |z|^(1/2)``: half thresholding (Xu et al., IEEE TNNLS 2012).

    ``argmin_z 0.5 (z - y)^2 + lam |z|^(1/2)`` equals
    ``(2/3) y (1 + cos(2 pi / 3 - (2/3) phi(y)))``, ``phi(y) = arccos((lam / 4) (|y| / 3)^(-3/2))``
    for ``|y| > (3/2) lam^(2/3)`` and 0 otherwise (Xu et al.'s ``lambda`` is ``2 lam`` here,
    their objective has no factor 1/2).  Computed in float64 (where the device has it).
    """
    sd = _scalar_dtype(y.device)
    yy = y.to(sd)
    if lam <= 0:
        return y.clone()
    a = yy.abs()
    thr = 1.5 * lam ** (2.0 / 3.0)
    big = a > thr
    safe = torch.where(big, a, torch.full_like(a, thr))
    phi = torch.arccos(torch.clamp((lam / 4.0) * (safe / 3.0) ** -1.5, -1.0, 1.0))
    z = (2.0 / 3.0) * safe * (1.0 + torch.cos(2.0 * math.pi / 3.0 - (2.0 / 3.0) * phi))
    z = torch.where(big, z, torch.zeros_like(z))
    # exact tie-break against z = 0 (equal objective at the threshold)
    f_z = 0.5 * (z - a) ** 2 + lam * torch.sqrt(z)
    z = torch.where(f_z < 0.5 * a * a, z, torch.zeros_like(z))
    return (torch.sign(yy) * z).to(y.dtype)


def prox_power_newton(y: torch.Tensor, lam: float, p: float, max_iter: int = 100) -> torch.Tensor:
    """Prox of ``lam |z|^p`` for any ``0 < p < 1`` to machine precision (vectorized).

    For ``|y| > tau_GST`` (:func:`gst_threshold`) the minimizer on ``z > 0`` is the root of
    ``g(z) = z - |y| + lam p z^(p-1)`` in ``[z*, |y|]``, ``z* = (lam p (1-p))^(1/(2-p))``;
    ``g`` is increasing and convex there, so Newton's method started at ``|y|`` decreases
    monotonically to the root (quadratically: the root is well above ``z*``).  Each step is
    kept inside the bracket ``[z*, z]`` (bisection if Newton leaves it).  The result is then
    compared with ``z = 0`` on the objective ``0.5 (z - |y|)^2 + lam z^p`` and the sign of ``y``
    restored.  Computed in float64 (where the device has it).
    """
    if lam <= 0:
        return y.clone()
    sd = _scalar_dtype(y.device)
    yy = y.to(sd)
    a = yy.abs()
    thr = gst_threshold(lam, p)
    zstar = (lam * p * (1.0 - p)) ** (1.0 / (2.0 - p))
    active = a > thr
    z = torch.where(active, a, torch.ones_like(a))
    aa = torch.where(active, a, torch.ones_like(a) * 2.0)
    lo = torch.full_like(a, zstar)
    hi = aa.clone()
    eps = torch.finfo(sd).eps
    for _ in range(max_iter):
        g = z - aa + lam * p * z ** (p - 1.0)
        dg = 1.0 - lam * p * (1.0 - p) * z ** (p - 2.0)
        step = g / dg
        z_new = z - step
        hi = torch.where(g > 0, torch.minimum(hi, z), hi)
        lo = torch.where(g < 0, torch.maximum(lo, z), lo)
        bad = (z_new < lo) | (z_new > hi) | ~torch.isfinite(z_new)
        z_new = torch.where(bad, 0.5 * (lo + hi), z_new)
        done = (z_new - z).abs() <= 2 * eps * z
        z = z_new
        if bool((done | ~active).all()):
            break
    z = torch.where(active, z, torch.zeros_like(z))
    f_z = 0.5 * (z - a) ** 2 + lam * torch.where(active, z, torch.ones_like(z)) ** p
    z = torch.where(active & (f_z < 0.5 * a * a), z, torch.zeros_like(z))
    return (torch.sign(yy) * z).to(y.dtype)


def prox_power(y: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """``argmin_z 0.5 (z - y)^2 + lam |z|^p`` elementwise, ``0 < p <= 1``.

    ``p = 1``: :func:`soft_threshold`; ``p = 1/2``: :func:`prox_power_half`; otherwise
    :func:`prox_power_newton`.  Ties at the threshold go to 0.
    """
    if p == 1.0:
        return soft_threshold(y, lam)
    if p == 0.5:
        return prox_power_half(y, lam)
    return prox_power_newton(y, lam, p)


def schatten_value(x: torch.Tensor, p: float) -> torch.Tensor:
    """``sum_i sigma_i(x)^p`` summed over the matrices ``x[..., :, :]``; differentiable.

    Uses :func:`svdvals`.  Zero singular values contribute 0 and get gradient 0 (a
    valid limiting subgradient of ``sigma^p`` at 0, where the derivative is infinite for p < 1).
    """
    s = svdvals(x)
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, safe ** p, torch.zeros_like(s)).sum().to(x.dtype)


def prox_schatten(x: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """Prox of ``lam sum_i sigma_i^p`` on every matrix ``x[..., :, :]``.

    ``U diag(prox_power(s, lam, p)) V^T`` with ``x = U diag(s) V^T``.  Exact: the objective is
    unitarily invariant and the scalar prox is non-decreasing, so the minimizer shares the
    singular vectors of ``x`` (von Neumann's trace inequality; Lewis 1995 for p = 1).  Cost:
    one batched SVD.
    """
    U, s, Vh = truncated_svd(x)
    t = prox_power(s, lam, p).to(s.dtype)
    return ((U * t.unsqueeze(-2)) @ Vh).to(x.dtype)
