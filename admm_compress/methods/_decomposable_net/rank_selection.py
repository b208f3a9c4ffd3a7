r"""Rank selection and conv matricization of Decomposable-Net (Yaguchi et al., IJCAI 2021).

Pure functions on lists of singular-value vectors (one per layer) and on conv weights.

Rank selection (Sec. 2.3, Algorithm 1)
--------------------------------------
The selection rules are generic and live in :mod:`admm_compress.ranks` (LoRITa's GSVT and the
MACs-budget export use them too); they are re-exported here under their old names:

* :func:`global_rank_selection` -- the paper's criterion :math:`C(\ell, i) = \sigma_{\ell,i}`:
  pool the singular values of all layers (raw, not normalized), sort them globally and drop
  the ``d`` smallest bases.  Three floor rules (``floor_mode``): ``"none"`` -- the paper
  (Sec. 2.3), no floor, a layer may keep 0 bases; ``"clip"`` -- the official code, top
  ``round(Z N)`` then every rank raised to ``min(rank_min, R_l)`` (``rank_min = 5``);
  ``"reserve"`` -- ours, the floors set aside first and the rest of the budget filled from the
  global order (exactly ``max(round(Z N), sum floors)`` bases).
* :func:`uniform_rank_selection`, :func:`energy_rank_selection` and ``criterion="energy"`` --
  the "uni" and "eng" baselines of Fig. 2(c); :func:`ranks_for_macs_budget` -- the global
  selection that fits a MACs budget.

Defined here, because they are the paper's alone: :func:`sample_keep_ratio` /
:func:`check_alphas` -- Algorithm 1, lines 3-4: :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)`
(:func:`num_dropped` gives :math:`d = (1 - Z)\sum_\ell R_\ell`).

Matricization (Sec. 2.1 and the official ``tensor2mat``)
--------------------------------------------------------
For a torch conv weight of shape ``(O, I, kh, kw)``:

* ``"channel"`` (channel-wise, official ``KyKxCin_Cout``):
  :math:`M[(h, w, c), o] = W[o, c, h, w]`, shape ``(kh*kw*I, O)``; rank ``r`` gives a
  ``kh x kw`` conv ``I -> r`` followed by a ``1 x 1`` conv ``r -> O``.
* ``"spatial"`` (spatial-wise, Tai et al. 2016, official ``KxCin_KyCout``):
  :math:`M[(w, c), (h, o)] = W[o, c, h, w]`, shape ``(kw*I, kh*O)``; rank ``r`` gives a
  ``1 x kw`` conv ``I -> r`` (horizontal stride / padding / dilation) followed by a ``kh x 1``
  conv ``r -> O`` (vertical stride / padding / dilation, and the bias).

A linear weight ``(O, I)`` is viewed as ``(I, O)`` (:math:`y = W^\top x`, the paper's convention)
under either scheme.  Singular values do not depend on the orientation, only the factor
layout does.

Prop. 1 (the layer-output error :math:`\|y - \hat y(r)\|^2` is non-increasing in the rank)
holds for linear layers and for the channel-wise view, where every output pixel is
:math:`M^\top` applied to one input patch.  It does **not** carry over to the conv output under
the spatial-wise view: an output pixel there sums blocks of :math:`M^\top` applied to different
row patches, and the error can grow with the rank (tested).

"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..._validation import check_choice, check_float, check_int, check_tensor
from ...functional import sqrt_split
from ...ranks import (  # noqa: F401  (the selection rules live in admm_compress.ranks; old imports work)
    energy_rank_selection, global_rank_selection, num_dropped, ranks_for_macs_budget, ranks_from_order,
    uniform_rank_selection)
from .lowrank_autograd import check_lam, thin_svd

__all__ = [
    "global_rank_selection",
    "ranks_from_order",
    "sample_keep_ratio",
    "num_dropped",
    "check_alphas",
    "check_lam",
    "uniform_rank_selection",
    "energy_rank_selection",
    "ranks_for_macs_budget",
    "dn_matrix",
    "dn_unmatrix",
    "dn_factor_convs",
    "dn_factor_linear",
    "factorize_conv2d",
    "FactorConvs",
]

logger = logging.getLogger(__name__)

_SCHEMES = ("channel", "spatial")


# ===================================================================== Algorithm 1
def check_alphas(alpha_l, alpha_u):
    r"""Validate :math:`0 < \alpha_l < \alpha_u \le 1` (Algorithm 1) and return the pair as floats."""
    alpha_l = check_float("alpha_l", alpha_l, low=0.0, high=1.0, low_open=True)
    alpha_u = check_float("alpha_u", alpha_u, low=0.0, high=1.0, low_open=True)
    if not alpha_l < alpha_u:
        raise ValueError(f"alpha_l={alpha_l} must be smaller than alpha_u={alpha_u}; "
                         f"allowed: 0 < alpha_l < alpha_u <= 1")
    return alpha_l, alpha_u


def sample_keep_ratio(alpha_l: float, alpha_u: float,
                      generator: Optional[torch.Generator] = None) -> float:
    r"""Draw the rank ratio :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)` (Algorithm 1, line 3).

    Requires :math:`0 < \alpha_l < \alpha_u \le 1` (paper: :math:`\alpha_l = 0.01`,
    :math:`\alpha_u = 0.25 / 0.5 / 0.8` for CIFAR-10 / CIFAR-100 / ImageNet).  Uses
    ``generator`` (a CPU ``torch.Generator``) for reproducibility; returns a Python float.
    Pass it to :func:`global_rank_selection` as ``keep_ratio``; :func:`num_dropped` gives ``d``.
    """
    alpha_l, alpha_u = check_alphas(alpha_l, alpha_u)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return alpha_l + (alpha_u - alpha_l) * u


# ===================================================================== matricization
def _shape4(weight: torch.Tensor, name: str = "weight"):
    check_tensor(name, weight)
    if weight.dim() not in (2, 4):
        raise ValueError(f"{name} must be a Linear weight (O, I) or a Conv2d weight (O, I, kh, kw), "
                         f"got shape {tuple(weight.shape)}")


def dn_matrix(weight: torch.Tensor, scheme: str = "channel") -> torch.Tensor:
    r"""Decomposable-Net's matrix view of a conv / linear weight (no copy where possible).

    ``"channel"``: ``(kh*kw*I, O)``, :math:`M[(h,w,c),o] = W[o,c,h,w]`.
    ``"spatial"``: ``(kw*I, kh*O)``, :math:`M[(w,c),(h,o)] = W[o,c,h,w]`.
    A 2-D weight ``(O, I)`` gives ``W^T`` of shape ``(I, O)`` under both.
    """
    _shape4(weight)
    check_choice("scheme", scheme, _SCHEMES)
    if weight.dim() == 2:
        return weight.mT
    O, I, kh, kw = weight.shape
    if scheme == "channel":
        return weight.permute(2, 3, 1, 0).reshape(kh * kw * I, O)
    return weight.permute(3, 1, 2, 0).reshape(kw * I, kh * O)


def dn_unmatrix(mat: torch.Tensor, shape: Sequence[int], scheme: str = "channel") -> torch.Tensor:
    """Inverse of :func:`dn_matrix`: the weight of ``shape`` (contiguous) whose view is ``mat``."""
    check_tensor("mat", mat, min_dim=2)
    check_choice("scheme", scheme, _SCHEMES)
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"shape must have 2 or 4 entries, got {shape}")
    if len(shape) == 2:
        want = (shape[1], shape[0])
    else:
        O, I, kh, kw = shape
        want = (kh * kw * I, O) if scheme == "channel" else (kw * I, kh * O)
    if tuple(mat.shape) != want:
        raise ValueError(f"mat has shape {tuple(mat.shape)} but a {scheme}-wise view of a weight "
                         f"of shape {shape} has shape {want}")
    if len(shape) == 2:
        return mat.mT.contiguous()
    if scheme == "channel":
        return mat.reshape(kh, kw, I, O).permute(3, 2, 0, 1).contiguous()
    return mat.reshape(kw, I, kh, O).permute(3, 1, 2, 0).contiguous()


@dataclasses.dataclass
class FactorConvs:
    """Two stock convolutions that apply a rank-``rank`` conv weight exactly.

    ``first`` (no bias) then ``second`` (with ``bias``); ``first_kwargs`` / ``second_kwargs`` are
    the ``nn.Conv2d`` keyword arguments (``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``padding_mode``, ``bias``).
    """

    first_weight: torch.Tensor
    second_weight: torch.Tensor
    bias: Optional[torch.Tensor]
    first_kwargs: Dict
    second_kwargs: Dict
    scheme: str
    rank: int

    def to_sequential(self) -> nn.Sequential:
        """``nn.Sequential(nn.Conv2d, nn.Conv2d)`` holding copies of the factors."""
        dev, dt = self.first_weight.device, self.first_weight.dtype
        c1 = nn.Conv2d(**self.first_kwargs, device=dev, dtype=dt)
        c2 = nn.Conv2d(**self.second_kwargs, device=dev, dtype=dt)
        with torch.no_grad():
            c1.weight.copy_(self.first_weight)
            c2.weight.copy_(self.second_weight)
            if self.bias is not None:
                c2.bias.copy_(self.bias)
        return nn.Sequential(c1, c2)


_CONV_KEYS = ("stride", "padding", "dilation", "groups", "padding_mode")


def _balanced_factors(mat: torch.Tensor, rank: int, where: str):
    m, n = mat.shape
    rank = check_int("rank", rank, low=1, high=min(m, n), where=where)
    U, S, Vh = thin_svd(mat)
    A, B = sqrt_split(U[:, :rank], S[:rank], Vh[:rank])   # (m, r), (r, n)
    return A.to(mat.dtype), B.to(mat.dtype), rank


def dn_factor_convs(weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int,
                    scheme: str = "channel", conv_kwargs: Optional[Dict] = None) -> FactorConvs:
    r"""Split a conv into two stock convs carrying its best rank-``rank`` approximation.

    With the ``scheme`` view :math:`M = U S V^\top` (:func:`dn_matrix`), the factors are
    :math:`A = U_r S_r^{1/2}` and :math:`B = S_r^{1/2} V_r^\top`:

    * ``"channel"``: ``A -> (r, I, kh, kw)`` conv with the original stride / padding / dilation /
      padding mode, then ``B -> (O, r, 1, 1)`` conv with the bias.
    * ``"spatial"``: ``A -> (r, I, 1, kw)`` conv with stride ``(1, sw)``, padding ``(0, pw)``,
      dilation ``(1, dw)``; then ``B -> (O, r, kh, 1)`` with stride ``(sh, 1)``, padding
      ``(ph, 0)``, dilation ``(dh, 1)`` and the bias.  The first conv acts on each input row
      separately, so padding rows of its output equals padding rows of the input (any
      ``padding_mode``).

    The composition equals ``F.conv2d(x, dn_unmatrix(M_r), bias, ...)`` up to rounding.

    Parameters
    ----------
    weight : Tensor ``(O, I, kh, kw)``
    bias : Tensor ``(O,)`` or None
    rank : int in ``[1, min(m, n)]`` of the view.
    scheme : {"channel", "spatial"}
    conv_kwargs : dict, optional
        ``stride``, ``padding`` (int, pair, ``"valid"`` or ``"same"``), ``dilation``,
        ``groups`` (must be 1), ``padding_mode``; defaults as ``nn.Conv2d``.

    Cost: one SVD of the view, :math:`O(mn\min(m,n))`.
    """
    check_tensor("weight", weight)
    if weight.dim() != 4:
        raise ValueError(f"weight must be a Conv2d weight (O, I, kh, kw), got shape "
                         f"{tuple(weight.shape)}")
    check_choice("scheme", scheme, _SCHEMES)
    O, I, kh, kw = weight.shape
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (O,):
            raise ValueError(f"bias must have shape ({O},), got {tuple(bias.shape)}")
    kw_ = dict(conv_kwargs or {})
    unknown = set(kw_) - set(_CONV_KEYS)
    if unknown:
        raise ValueError(f"conv_kwargs has unknown keys {sorted(unknown)}; allowed: {list(_CONV_KEYS)}")
    groups = check_int("groups", kw_.get("groups", 1), low=1)
    if groups != 1:
        raise ValueError(f"groups={groups} is not supported; only groups=1 convolutions can be "
                         f"factorized")
    stride = _pair(kw_.get("stride", 1))
    dilation = _pair(kw_.get("dilation", 1))
    padding = kw_.get("padding", 0)
    if isinstance(padding, str):
        check_choice("padding", padding, ("valid", "same"))
        pad_first = pad_second = padding
        if padding == "valid":
            pad_first, pad_second = (0, 0), (0, 0)
    else:
        padding = _pair(padding)
        pad_first = (0, padding[1]) if scheme == "spatial" else padding
        pad_second = (padding[0], 0) if scheme == "spatial" else (0, 0)
    padding_mode = kw_.get("padding_mode", "zeros")
    check_choice("padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular"))
    for name, v in (("stride", stride), ("dilation", dilation)):
        if any(not isinstance(x, numbers.Integral) or x < 1 for x in v):
            raise ValueError(f"{name}={v} must be positive integers")

    A, B, rank = _balanced_factors(dn_matrix(weight.detach(), scheme), rank, "dn_factor_convs")
    if scheme == "channel":
        first = A.reshape(kh, kw, I, rank).permute(3, 2, 0, 1).contiguous()
        second = B.mT.reshape(O, rank, 1, 1).contiguous()
        k1, s1, d1 = (kh, kw), stride, dilation
        k2, s2, d2 = (1, 1), (1, 1), (1, 1)
        mode2 = "zeros"
    else:
        first = A.reshape(kw, I, rank).permute(2, 1, 0).unsqueeze(2).contiguous()
        second = B.reshape(rank, kh, O).permute(2, 0, 1).unsqueeze(-1).contiguous()
        k1, s1, d1 = (1, kw), (1, stride[1]), (1, dilation[1])
        k2, s2, d2 = (kh, 1), (stride[0], 1), (dilation[0], 1)
        mode2 = padding_mode
    first_kwargs = dict(in_channels=I, out_channels=rank, kernel_size=k1, stride=s1,
                        padding=pad_first, dilation=d1, padding_mode=padding_mode, bias=False)
    second_kwargs = dict(in_channels=rank, out_channels=O, kernel_size=k2, stride=s2,
                         padding=pad_second, dilation=d2, padding_mode=mode2, bias=bias is not None)
    return FactorConvs(first, second, None if bias is None else bias.detach().clone(),
                       first_kwargs, second_kwargs, scheme, rank)


def factorize_conv2d(conv: nn.Conv2d, rank: int, scheme: str = "channel") -> nn.Sequential:
    """``nn.Sequential`` of two stock ``nn.Conv2d`` applying ``conv``'s rank-``rank`` weight."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  groups=conv.groups, padding_mode=conv.padding_mode)
    return dn_factor_convs(conv.weight, conv.bias, rank, scheme, kwargs).to_sequential()


def dn_factor_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int):
    r"""Split ``y = W x + b`` (``W``: ``(O, I)``) into ``(I -> r)`` then ``(r -> O)``.

    Returns ``(first_weight (r, I), second_weight (O, r), bias)`` with
    ``second_weight @ first_weight`` the best rank-``rank`` approximation of ``W``
    (balanced :math:`S^{1/2}` split).  Cost: one SVD.
    """
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a Linear weight (O, I), got shape {tuple(weight.shape)}")
    A, B, rank = _balanced_factors(dn_matrix(weight.detach()), rank, "dn_factor_linear")
    # dn_matrix(W) = W^T = A B  ->  W = B^T A^T: first (r, I) = A^T, second (O, r) = B^T
    return (A.mT.contiguous(), B.mT.contiguous(),
            None if bias is None else bias.detach().clone())
