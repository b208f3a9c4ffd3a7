r"""Rank selection and conv matricization of Decomposable-Net (Yaguchi et al., IJCAI 2021).

Pure functions on lists of singular-value vectors (one per layer) and on conv weights.

Rank selection (Sec. 2.3, Algorithm 1)
--------------------------------------
* :func:`global_rank_selection` -- the paper's criterion :math:`C(\ell, i) = \sigma_{\ell,i}`:
  pool the singular values of all layers (raw, not normalized), sort them globally and drop
  the ``d`` smallest bases.  Three floor rules (``floor_mode``): ``"none"`` -- the paper
  (Sec. 2.3), no floor, a layer may keep 0 bases; ``"clip"`` -- the official code, top
  ``round(Z N)`` then every rank raised to ``min(rank_min, R_l)`` (``rank_min = 5``);
  ``"reserve"`` -- ours, the floors set aside first and the rest of the budget filled from the
  global order (exactly ``max(round(Z N), sum floors)`` bases).
* :func:`sample_keep_ratio` / :func:`num_dropped` -- Algorithm 1, lines 3-4:
  :math:`Z \sim \mathcal U(\alpha_l, \alpha_u)`, :math:`d = (1 - Z)\sum_\ell R_\ell`.
* :func:`uniform_rank_selection`, :func:`energy_rank_selection` and ``criterion="energy"`` --
  the "uni" and "eng" baselines of Fig. 2(c).
* :func:`ranks_for_macs_budget` -- the global selection that fits a MACs budget.

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

Size (~590 lines): the paper's rank-selection criteria (Sec. 2.3, the official code's floor rule)
and its matricizations with the reference factor layers the export is tested against, all of
Sec. 2.1-2.3 in one place.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..._validation import check_choice, check_float, check_int, check_tensor
from ...functional import sqrt_split
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

_CRITERIA = ("sv", "energy")
_FLOOR_MODES = ("reserve", "clip", "none")
_SCHEMES = ("channel", "spatial")


# ===================================================================== validation
def _check_svals(svals) -> List[torch.Tensor]:
    if isinstance(svals, torch.Tensor) or not isinstance(svals, Sequence):
        raise TypeError(f"svals must be a list of 1-D tensors (one per layer), got "
                        f"{type(svals).__name__}")
    if len(svals) == 0:
        raise ValueError("svals must hold at least one layer, got an empty list")
    out = []
    for i, s in enumerate(svals):
        check_tensor(f"svals[{i}]", s)
        if s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"svals[{i}] must be a non-empty 1-D tensor of singular values, "
                             f"got shape {tuple(s.shape)}")
        s = s.detach()
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"svals[{i}] must hold finite non-negative singular values")
        out.append(s)
    return out


def check_alphas(alpha_l, alpha_u):
    r"""Validate :math:`0 < \alpha_l < \alpha_u \le 1` (Algorithm 1) and return the pair as floats."""
    alpha_l = check_float("alpha_l", alpha_l, low=0.0, high=1.0, low_open=True)
    alpha_u = check_float("alpha_u", alpha_u, low=0.0, high=1.0, low_open=True)
    if not alpha_l < alpha_u:
        raise ValueError(f"alpha_l={alpha_l} must be smaller than alpha_u={alpha_u}; "
                         f"allowed: 0 < alpha_l < alpha_u <= 1")
    return alpha_l, alpha_u


def _check_full_ranks(full_ranks) -> List[int]:
    if isinstance(full_ranks, (str, bytes)) or not isinstance(full_ranks, Sequence) or not full_ranks:
        raise TypeError(f"full_ranks must be a non-empty list of positive integers, got {full_ranks!r}")
    return [check_int(f"full_ranks[{i}]", r, low=1) for i, r in enumerate(full_ranks)]


# ===================================================================== rank selection
def _scores(s: torch.Tensor, criterion: str, normalize: bool) -> torch.Tensor:
    """Per-basis importance for a descending singular-value vector (higher = keep first)."""
    s = s.to(torch.float64)
    if criterion == "sv":
        if normalize:
            top = s[0]
            return s / top if bool(top > 0) else torch.zeros_like(s)
        return s
    # "energy": basis i is kept by a threshold rule iff the energy before it, C'(l, i-1), is
    # below the threshold; score = remaining energy sum_{k>=i} s_k^2 / sum_j s_j^2 = 1 - C'(l,i-1).
    e = s * s
    tot = e.sum()
    if not bool(tot > 0):
        return torch.zeros_like(s)
    tail = torch.flip(torch.cumsum(torch.flip(e, (0,)), 0), (0,))
    return tail / tot


def _pool(svals, min_rank, criterion, normalize):
    """Floors and the globally sorted pool of non-floor bases (layer id of each, best first)."""
    floors, ids, scores = [], [], []
    for l, s in enumerate(svals):
        s = torch.sort(s, descending=True).values
        f = min(min_rank, s.numel())
        floors.append(f)
        sc = _scores(s, criterion, normalize)[f:]
        scores.append(sc.cpu())
        ids.append(torch.full((sc.numel(),), l, dtype=torch.long))
    scores = torch.cat(scores)
    ids = torch.cat(ids)
    order = torch.sort(scores, descending=True, stable=True).indices
    return floors, ids[order]


def ranks_from_order(floors: Sequence[int], order_ids: torch.Tensor, n_pool_keep: int) -> List[int]:
    """Ranks when the first ``n_pool_keep`` bases of the sorted pool are kept on top of ``floors``."""
    counts = torch.bincount(order_ids[:n_pool_keep], minlength=len(floors))
    return [int(f) + int(c) for f, c in zip(floors, counts.tolist())]


def global_rank_selection(svals: Sequence[torch.Tensor], keep_ratio: Optional[float] = None,
                          drop: Optional[int] = None, min_rank: int = 5, normalize: bool = False,
                          *, criterion: str = "sv", floor_mode: str = "reserve") -> List[int]:
    r"""Ranks that keep the globally most important bases (Decomposable-Net Sec. 2.3).

    All bases of all layers are sorted by the criterion (default :math:`C(\ell,i) =
    \sigma_{\ell,i}`, raw values compared across layers) and the ``d`` least important are
    dropped; layer ``l`` keeps ``r_l`` bases, always its top ones.

    Parameters
    ----------
    svals : list of 1-D Tensor
        Singular values of each layer's matrix (any order; sorted internally), ``R_l`` entries.
    keep_ratio : float in [0, 1], optional
        Rank ratio ``Z``: keep ``round(Z * sum_l R_l)`` bases (the official rounding), i.e.
        drop ``d = sum R_l - round(Z sum R_l)``.  Exactly one of ``keep_ratio`` / ``drop``.
    drop : int in [0, sum R_l], optional
        Number ``d`` of bases to drop.
    min_rank : int >= 1
        Floor: each layer keeps at least ``min(min_rank, R_l)`` (official ``rank_min = 5``).
    normalize : bool
        Divide each layer's values by its largest before pooling (GSVT-style).  The paper does
        not (default ``False``).
    criterion : {"sv", "energy"}
        ``"sv"``: :math:`\sigma_{\ell,i}` (the paper).  ``"energy"``: the energy criterion of
        Alvarez & Salzmann / TRP used as the "eng" baseline of Fig. 2(c): score
        :math:`1 - C'(\ell, i-1) = \sum_{k\ge i}\sigma_{\ell,k}^2 / \sum_j \sigma_{\ell,j}^2`.
    floor_mode : {"reserve", "clip", "none"}
        ``"reserve"`` (default; ours, neither the paper nor the official code): the floor bases
        are set aside and the remaining keep budget is filled from the global order of the other
        bases, so exactly ``max(n_keep, sum floors)`` bases are kept.  ``"clip"``: the official
        code -- keep the top ``n_keep`` globally, then raise every rank to its floor (may keep
        more).  ``"none"``: the paper (Sec. 2.3) -- keep the top ``n_keep`` globally, no floor
        (``min_rank`` is ignored; a layer may get rank 0, which the paper reads as removing it).

        Example (Z = 0.25, four layers of full ranks 16/32/64/10, ``min_rank=5``, tested):
        ``"none"`` [3, 23, 0, 4], ``"clip"`` [5, 23, 5, 5], ``"reserve"`` [5, 15, 5, 5].

    Returns
    -------
    list of int
        ``r_l`` with ``min(min_rank, R_l) <= r_l <= R_l`` (``0 <= r_l`` for ``"none"``);
        non-decreasing in ``keep_ratio``.

    Notes
    -----
    Cost :math:`O(N \log N)`, :math:`N = \sum_\ell R_\ell`.  Ties are broken by layer order.
    """
    svals = _check_svals(svals)
    min_rank = check_int("min_rank", min_rank, low=1)
    check_choice("criterion", criterion, _CRITERIA)
    check_choice("floor_mode", floor_mode, _FLOOR_MODES)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    total = sum(s.numel() for s in svals)
    if (keep_ratio is None) == (drop is None):
        raise ValueError("give exactly one of keep_ratio (fraction of bases kept, in [0, 1]) "
                         f"and drop (number of bases dropped); got keep_ratio={keep_ratio!r}, "
                         f"drop={drop!r}")
    if keep_ratio is not None:
        keep_ratio = check_float("keep_ratio", keep_ratio, low=0.0, high=1.0)
        n_keep = int(round(keep_ratio * total))
    else:
        drop = check_int("drop", drop, low=0, high=total)
        n_keep = total - drop

    if floor_mode == "reserve":
        floors, order_ids = _pool(svals, min_rank, criterion, normalize)
        n_pool = max(0, min(n_keep - sum(floors), order_ids.numel()))
        return ranks_from_order(floors, order_ids, n_pool)
    # "none" (paper): the global cut alone; "clip" (official code): floors applied after it
    zeros, order_ids = _pool(svals, 0, criterion, normalize)
    ranks = ranks_from_order(zeros, order_ids, n_keep)
    if floor_mode == "none":
        return ranks
    return [max(r, min(min_rank, s.numel())) for r, s in zip(ranks, svals)]


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


def num_dropped(keep_ratio: float, full_ranks: Sequence[int]) -> int:
    r""":math:`d = (1 - Z)\sum_\ell R_\ell` rounded as :func:`global_rank_selection` does
    (``sum R - round(Z * sum R)``)."""
    keep_ratio = check_float("keep_ratio", keep_ratio, low=0.0, high=1.0)
    total = sum(_check_full_ranks(full_ranks))
    return total - int(round(keep_ratio * total))


def uniform_rank_selection(full_ranks: Sequence[int], ratio: float, min_rank: int = 5) -> List[int]:
    r"""The "uni" baseline of Fig. 2(c): every layer keeps the same fraction of its bases.

    :math:`r_\ell = \mathrm{clamp}(\mathrm{round}(\text{ratio}\cdot R_\ell),
    \min(\text{min\_rank}, R_\ell), R_\ell)`, ``ratio`` in [0, 1].  Cost :math:`O(L)`.
    """
    full_ranks = _check_full_ranks(full_ranks)
    ratio = check_float("ratio", ratio, low=0.0, high=1.0)
    min_rank = check_int("min_rank", min_rank, low=1)
    return [min(R, max(min(min_rank, R), int(round(ratio * R)))) for R in full_ranks]


def energy_rank_selection(svals: Sequence[torch.Tensor], energy: float, min_rank: int = 5) -> List[int]:
    r"""The energy-threshold rule (TRP, Alvarez & Salzmann; "eng" in Fig. 2(c)).

    Layer ``l`` keeps the smallest ``r`` with :math:`C'(\ell, r) = \sum_{k\le r}\sigma_{\ell,k}^2 /
    \sum_j \sigma_{\ell,j}^2 \ge` ``energy`` (relative tolerance 1e-12), raised to
    ``min(min_rank, R_l)``; an all-zero layer keeps its floor.  ``energy`` in (0, 1].
    Cost :math:`O(N)`.  For a comparison at a matched size use
    ``global_rank_selection(..., criterion="energy")``.
    """
    svals = _check_svals(svals)
    energy = check_float("energy", energy, low=0.0, high=1.0, low_open=True)
    min_rank = check_int("min_rank", min_rank, low=1)
    ranks = []
    for s in svals:
        s = torch.sort(s.to(torch.float64), descending=True).values
        e = torch.cumsum(s * s, 0)
        tot = float(e[-1])
        floor = min(min_rank, s.numel())
        if tot <= 0:
            ranks.append(floor)
            continue
        r = int((e < energy * tot * (1 - 1e-12)).sum()) + 1
        ranks.append(max(floor, min(r, s.numel())))
    return ranks


def ranks_for_macs_budget(svals: Sequence[torch.Tensor], layer_macs_fn: Callable[[int, int], float],
                          budget: float, min_rank: int = 5, *, normalize: bool = False,
                          criterion: str = "sv", fixed_macs: float = 0.0,
                          fill: bool = True) -> List[int]:
    r"""Largest global selection whose MACs fit ``budget`` (target size at inference, Sec. 2.3).

    Bases are ordered as in :func:`global_rank_selection` (``floor_mode="reserve"``); the number
    ``t`` of pooled bases kept -- i.e. the global singular-value threshold -- is found by
    bisection as the largest ``t`` with
    ``fixed_macs + sum_l layer_macs_fn(l, r_l(t)) <= budget``.

    Parameters
    ----------
    svals : list of 1-D Tensor
        Singular values per layer.
    layer_macs_fn : callable ``(layer_index, rank) -> float``
        Cost of layer ``l`` at rank ``r``; must be non-decreasing in ``r`` (e.g.
        ``(kh*kw*I + O) * r * H_out * W_out`` for the channel scheme, or the dense cost once the
        factorization stops paying off).
    budget : float >= 0
        Total MACs allowed (including ``fixed_macs``, the cost of the layers not decomposed).
    min_rank : int >= 0
        Floor per layer, ``min(min_rank, R_l)`` (0: no floor, the paper's rule).
    normalize, criterion
        As in :func:`global_rank_selection`.
    fill : bool
        After the threshold search, walk the rest of the global order once and add every basis
        that still fits (a layer that failed once is frozen, as its later bases only cost more
        in total).  The result is then maximal: raising any single layer's rank by one exceeds
        the budget or is impossible.  ``False`` returns the pure threshold (the paper).

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        If even the floors cost more than ``budget`` (message gives both numbers).

    Notes
    -----
    Cost: :math:`O(\log N)` evaluations of :math:`L` calls, plus :math:`O(N)` calls with ``fill``.
    """
    svals = _check_svals(svals)
    if not callable(layer_macs_fn):
        raise TypeError(f"layer_macs_fn must be callable (layer_index, rank) -> MACs, got "
                        f"{type(layer_macs_fn).__name__}")
    budget = check_float("budget", budget, low=0.0)
    fixed_macs = check_float("fixed_macs", fixed_macs, low=0.0)
    min_rank = check_int("min_rank", min_rank, low=0)
    check_choice("criterion", criterion, _CRITERIA)
    if not isinstance(normalize, bool) or not isinstance(fill, bool):
        raise TypeError(f"normalize and fill must be bools, got normalize={normalize!r}, fill={fill!r}")
    floors, order_ids = _pool(svals, min_rank, criterion, normalize)

    def cost(ranks):
        return fixed_macs + sum(float(layer_macs_fn(l, r)) for l, r in enumerate(ranks))

    floor_cost = cost(floors)
    if floor_cost > budget:
        raise ValueError(f"budget={budget:g} MACs is below the minimum achievable {floor_cost:g} "
                         f"MACs (every layer at its floor rank min(min_rank={min_rank}, R_l), "
                         f"fixed_macs={fixed_macs:g})")
    lo, hi = 0, order_ids.numel()          # invariant: cost(t=lo) <= budget
    if cost(ranks_from_order(floors, order_ids, hi)) <= budget:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(ranks_from_order(floors, order_ids, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    ranks = ranks_from_order(floors, order_ids, lo)
    if fill and lo < order_ids.numel():
        current = cost(ranks)
        frozen = [False] * len(ranks)
        full = [s.numel() for s in svals]
        for l in order_ids[lo:].tolist():
            if frozen[l] or ranks[l] >= full[l]:
                continue
            delta = float(layer_macs_fn(l, ranks[l] + 1)) - float(layer_macs_fn(l, ranks[l]))
            if current + delta <= budget:
                ranks[l] += 1
                current += delta
            else:
                frozen[l] = True
    logger.debug("ranks_for_macs_budget: budget=%g, threshold keeps %d pooled bases", budget, lo)
    return ranks


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
