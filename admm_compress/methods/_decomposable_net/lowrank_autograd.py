r"""Differentiable truncated SVD (Decomposable-Net, Yaguchi et al., IJCAI 2021, App. A).

The rank-``r`` reconstruction

.. math::  \widetilde W = P_r(W) = \widetilde U \widetilde S \widetilde V^\top
           \qquad (\text{top-}r\text{ singular triplets of } W)

is the Euclidean projection onto the matrices of rank at most ``r``.  Its derivative exists
wherever :math:`\sigma_r > \sigma_{r+1}`; Decomposable-Net back-propagates through it with the
closed form of App. A, Eq. (5)-(11), and keeps it finite near repeated singular values by
clipping the ratio :math:`\rho_{ik} = \sigma_k / \sigma_i` (kept index ``i``, dropped index ``k``).

Backward pass (App. A, Eq. 8-11)
--------------------------------
With :math:`G = \partial\mathcal L/\partial \widetilde W`, thin SVD :math:`W = U S V^\top`
(:math:`U = (\widetilde U, \bar U)`, :math:`V = (\widetilde V, \bar V)`),
:math:`A = \widetilde V^\top G^\top \bar U` and :math:`B = \widetilde U^\top G \bar V`:

.. math::

   \nabla_W = G\widetilde V\widetilde V^\top
            + \widetilde U\,(F_2\odot A + F_1\odot B)\,\bar V^\top
            + \bar U\,(F_3\odot A + F_2\odot B)^\top\,\widetilde V^\top
            \;[\,+\;\widetilde U\widetilde U^\top G\,(I - V V^\top)\ \text{ if } m < n\,]

   (F_1)_{ik} = \frac{1}{1-\rho_{ik}^2}\ \text{(Eq. 10)},\quad
   (F_2)_{ik} = \frac{\rho_{ik}}{1-\rho_{ik}^2}\ \text{(Eq. 9)},\quad
   (F_3)_{ik} = \frac{\rho_{ik}^2}{1-\rho_{ik}^2}\ \text{(Eq. 11)}.

The paper derives the case :math:`m \ge n` and handles :math:`m < n` by transposing; the
bracketed term is exactly what the transposition contributes (the rows of :math:`\widetilde
U^\top G` outside the row space of :math:`W`), so one formula covers both shapes.

Clipping (App. A, text after Eq. 11)
------------------------------------
The clipped quantity is the **squared** ratio :math:`\rho_{ik}^2 = \sigma_k^2/\sigma_i^2`:
:math:`\rho^2 \leftarrow \min(\rho^2, \delta^2)` with ``clip`` :math:`= \delta^2 = 0.99`
(the paper writes :math:`\rho \leftarrow \min(\rho, \delta)`, :math:`\delta = \sqrt{0.99}`; the
official code clips ``x2 = s_k^2 / max(s_i^2, 1e-15)`` at ``svd_bp_eps = 0.99``, the same thing).
:math:`F_1, F_2, F_3` are all evaluated at the clipped ratio, so each is bounded by
:math:`1/(1-\delta^2) = 100`.  Where :math:`\sigma_i = 0` (the kept part is rank deficient) the
ratio is taken as 1 and hence clipped.  When no ratio exceeds :math:`\delta` the backward
pass is the exact derivative of :math:`P_r`.

Cost: one thin SVD, :math:`O(mn\min(m,n))`, in the forward pass (the factors are saved);
:math:`O(mnk)` matrix products in the backward pass, :math:`k = \min(m, n)`.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ... import functional
from ..._validation import check_float, check_int, check_tensor

__all__ = [
    "TruncatedSVD",
    "truncated_svd_reconstruct",
    "truncated_svd_grad",
    "thin_svd",
    "compute_dtype",
    "check_lam",
    "rescale_to_norm",
    "combine_gradients",
]

logger = logging.getLogger(__name__)

SVD = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------- pure functions
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision the SVD is computed in: ``float64`` stays, every other float becomes ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def thin_svd(w: torch.Tensor) -> SVD:
    r"""Thin SVD ``w = U diag(S) Vh`` computed in :func:`compute_dtype` precision.

    Parameters
    ----------
    w : Tensor, shape ``(..., m, n)``
        Real floating-point matrices (batched over leading dimensions).

    Returns
    -------
    U : ``(..., m, k)``, S : ``(..., k)`` descending, Vh : ``(..., k, n)``, with ``k = min(m, n)``,
    all in ``float64`` if ``w`` is ``float64`` else ``float32``; on ``w``'s device.

    Notes
    -----
    Cost :math:`O(mnk)`.  Pass the result as ``svd=`` to :func:`truncated_svd_reconstruct` to
    reuse one decomposition for rank selection (Sec. 2.3) and reconstruction.  Computed by the
    library's one SVD entry point, :func:`admm_compress.functional.svd` (float64 / jitter
    fallbacks on a convergence failure).
    """
    check_tensor("w", w, min_dim=2)
    if w.is_complex():
        raise TypeError(f"w must be a real floating-point tensor, got dtype {w.dtype}")
    U, S, Vh = functional.svd(w.detach().to(compute_dtype(w.dtype)), full_matrices=False)
    return U, S, Vh


def truncated_svd_grad(grad: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                       rank: int, clip: float = 0.99) -> torch.Tensor:
    r"""Gradient of :math:`\mathcal L(P_r(W))` w.r.t. ``W`` from ``grad`` :math:`= \partial
    \mathcal L/\partial P_r(W)` (App. A, Eq. 8-11 with the squared ratio clipped at ``clip``).

    ``U, S, Vh`` is the thin SVD of ``W`` (:func:`thin_svd`), batched over leading dims; ``grad``
    has ``W``'s shape.  No argument checks (internal kernel); see the module docstring for the
    formula.  Returns a tensor in ``U``'s dtype.
    """
    n = grad.shape[-1]
    k = S.shape[-1]
    G = grad.to(U.dtype)
    if rank <= 0:
        return torch.zeros_like(G)
    if rank >= k:
        return G.clone()
    V = Vh.mT
    Ur, Ub = U[..., :, :rank], U[..., :, rank:]
    Vr, Vb = V[..., :, :rank], V[..., :, rank:]
    sr, sb = S[..., :rank], S[..., rank:]

    # rho^2_{ik} = s_k^2 / s_i^2 for kept i (rows), dropped k (columns); s_i = 0 -> ratio 1.
    si2 = (sr * sr).unsqueeze(-1)
    sk2 = (sb * sb).unsqueeze(-2)
    rho2 = torch.where(si2 > 0, sk2 / torch.where(si2 > 0, si2, torch.ones_like(si2)),
                       torch.ones_like(si2 * sk2))
    rho2 = rho2.clamp(max=clip)                    # rho^2 <- min(rho^2, delta^2)
    f1 = 1.0 / (1.0 - rho2)                        # Eq. (10)
    f2 = rho2.sqrt() * f1                          # Eq. (9)
    f3 = rho2 * f1                                 # Eq. (11)

    GVr = G @ Vr                                   # (m, r)
    UrtG = Ur.mT @ G                               # (r, n)
    A = (Ub.mT @ GVr).mT                           # A = Vr^T G^T Ub, (r, k-r)
    B = UrtG @ Vb                                  # B = Ur^T G Vb,  (r, k-r)
    out = GVr @ Vr.mT
    out = out + Ur @ (f2 * A + f1 * B) @ Vb.mT
    out = out + Ub @ (f3 * A + f2 * B).mT @ Vr.mT
    if n > k:  # m < n: part of Ur^T G outside the row space of W (the paper's transposed case)
        out = out + Ur @ (UrtG - (UrtG @ V) @ Vh)
    return out


class TruncatedSVD(torch.autograd.Function):
    r"""``W -> U_r S_r V_r^T`` with the clipped closed-form backward of Decomposable-Net.

    ``TruncatedSVD.apply(w, rank, clip, svd)``; prefer :func:`truncated_svd_reconstruct`, which
    validates its arguments.
    """

    @staticmethod
    def forward(ctx, w, rank, clip, svd):  # noqa: D102
        k = min(w.shape[-2], w.shape[-1])
        ctx.rank, ctx.clip, ctx.in_dtype = rank, clip, w.dtype
        if rank >= k:
            ctx.identity = True
            return w.clone()
        ctx.identity = False
        U, S, Vh = thin_svd(w) if svd is None else svd
        ctx.save_for_backward(U, S, Vh)
        if rank == 0:
            return torch.zeros_like(w)
        w_r = (U[..., :, :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]
        return w_r.to(w.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.identity:
            return grad.clone(), None, None, None
        U, S, Vh = ctx.saved_tensors
        g = truncated_svd_grad(grad, U, S, Vh, ctx.rank, ctx.clip)
        return g.to(ctx.in_dtype), None, None, None


def truncated_svd_reconstruct(w: torch.Tensor, rank: int, clip: float = 0.99,
                              svd: Optional[SVD] = None) -> torch.Tensor:
    r"""Best rank-``rank`` approximation :math:`U_r S_r V_r^\top` of ``w``, differentiable.

    Parameters
    ----------
    w : Tensor, shape ``(..., m, n)``
        Matrices, batched over leading dimensions; any real floating dtype.  The SVD runs in
        ``float64`` for ``float64`` input and ``float32`` otherwise; the result is cast back.
    rank : int
        Number of singular triplets kept, ``>= 0``.  ``rank >= min(m, n)`` returns a copy of ``w``
        and the identity gradient; ``rank = 0`` returns zeros (zero gradient).
    clip : float
        :math:`\delta^2 \in (0, 1)`: the squared singular-value ratio
        :math:`\sigma_k^2/\sigma_i^2` is clipped at ``clip`` in the backward pass (Decomposable-Net
        App. A after Eq. 11; the paper's :math:`\delta = \sqrt{0.99}`).  Exact gradient wherever
        no ratio is clipped.
    svd : tuple (U, S, Vh), optional
        Thin SVD of ``w`` from :func:`thin_svd`, to avoid computing it twice.  Not verified beyond
        shapes.

    Returns
    -------
    Tensor of ``w``'s shape, dtype and device.

    Notes
    -----
    Forward = Eq. (1)'s :math:`\widetilde W_\ell`; backward = App. A Eq. (5)-(11) (see module
    docstring).  Cost: thin SVD :math:`O(mn\min(m,n))` plus :math:`O(mn\min(m,n))` products.
    """
    check_tensor("w", w, min_dim=2)
    if w.is_complex():
        raise TypeError(f"w must be a real floating-point tensor, got dtype {w.dtype}")
    rank = check_int("rank", rank, low=0)
    clip = check_float("clip", clip, low=0.0, high=1.0, low_open=True, high_open=True)
    if svd is not None:
        if not (isinstance(svd, (tuple, list)) and len(svd) == 3
                and all(isinstance(t, torch.Tensor) for t in svd)):
            raise TypeError("svd must be a tuple (U, S, Vh) of tensors as returned by thin_svd")
        U, S, Vh = svd
        k = min(w.shape[-2], w.shape[-1])
        lead = tuple(w.shape[:-2])
        want = (lead + (w.shape[-2], k), lead + (k,), lead + (k, w.shape[-1]))
        got = (tuple(U.shape), tuple(S.shape), tuple(Vh.shape))
        if got != want:
            raise ValueError(f"svd shapes {got} do not match the thin SVD of w with shape "
                             f"{tuple(w.shape)}; expected {want}")
        svd = tuple(svd)
    return TruncatedSVD.apply(w, rank, clip, svd)


# ------------------------------------------------------------- joint gradient (Eq. 1, 12)
def check_lam(lam) -> float:
    r"""Validate the balance :math:`\lambda \in [0, 1]` of Eq. (1) and return it as ``float``."""
    return check_float("lam", lam, low=0.0, high=1.0)


def rescale_to_norm(grad_low: torch.Tensor, grad_full: torch.Tensor,
                    eps: float = 1e-15) -> torch.Tensor:
    r"""Rescale the low-rank gradient to the Frobenius norm of the full-rank one (Eq. 12).

    .. math:: \nabla \leftarrow \frac{\|\nabla_f\|_F}{\max(\|\nabla\|_F, \epsilon)}\,\nabla

    This is how the official code realises Eq. (12) (``lam`` itself stays fixed), per layer.
    Cost :math:`O(\text{numel})`.
    """
    check_tensor("grad_low", grad_low)
    check_tensor("grad_full", grad_full)
    if grad_low.shape != grad_full.shape:
        raise ValueError(f"grad_low shape {tuple(grad_low.shape)} != grad_full shape "
                         f"{tuple(grad_full.shape)}")
    eps = check_float("eps", eps, low=0.0, low_open=True)
    scale = torch.linalg.vector_norm(grad_full) / torch.linalg.vector_norm(grad_low).clamp_min(eps)
    return grad_low * scale


def combine_gradients(grad_full: torch.Tensor, grad_low: torch.Tensor, lam: float = 0.5,
                      rescale: bool = True) -> torch.Tensor:
    r"""Gradient of Eq. (1) for one weight: :math:`(1-\lambda)\nabla_f + \lambda\,\nabla`.

    With ``rescale=True`` the low-rank part is first rescaled by :func:`rescale_to_norm`
    (Eq. 12, as in the official code).  Returns a new tensor; inputs are not modified.
    """
    lam = check_lam(lam)
    check_tensor("grad_full", grad_full)
    check_tensor("grad_low", grad_low)
    if grad_low.shape != grad_full.shape:
        raise ValueError(f"grad_low shape {tuple(grad_low.shape)} != grad_full shape "
                         f"{tuple(grad_full.shape)}")
    g = rescale_to_norm(grad_low, grad_full) if rescale else grad_low
    return (1.0 - lam) * grad_full + lam * g
