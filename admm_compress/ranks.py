r"""Rank selection: how many singular values each layer keeps.

One home for the rank rules the methods share; each takes the singular values of the layers'
matrices (one 1-D tensor per layer) and returns one rank per layer.

* :func:`global_rank_selection` -- one global ranking of all layers' singular values, the ``d``
  least important bases dropped (Decomposable-Net Sec. 2.3: raw :math:`\sigma_{\ell,i}`;
  LoRITa's GSVT, Sec. 4: ``normalize=True``, ``min_rank=1``; ``criterion="energy"``: the TRP /
  Alvarez-Salzmann energy criterion compared across layers), with the floor rules of
  ``floor_mode``.  :func:`num_dropped` gives its ``d`` for a rank ratio.
* :func:`ranks_for_macs_budget` -- the largest such global selection whose cost (MACs, or any
  non-decreasing per-layer cost) fits a budget.
* :func:`uniform_rank_selection` -- every layer keeps the same fraction of its bases.
* :func:`energy_rank_selection` -- per layer, the smallest rank holding a fraction of the energy
  (:func:`admm_compress.functional.energy_rank`, TRP's rule).
* :func:`largest_within` -- the bisection behind every budgeted choice here and in the TT rank
  budget (:func:`admm_compress.methods.raspa.tt_ranks_for_budget`).

Users: Decomposable-Net (training and any-size export), LoRITa (:func:`~admm_compress.methods.
_lorita.truncation.gsvt`), TRP and ``LowRank(energy=...)`` (through ``functional.energy_rank``).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch

from ._validation import check_choice, check_float, check_int, check_tensor
from .functional import energy_rank

__all__ = [
    "global_rank_selection",
    "ranks_from_order",
    "num_dropped",
    "uniform_rank_selection",
    "energy_rank_selection",
    "ranks_for_macs_budget",
    "largest_within",
]

logger = logging.getLogger(__name__)

CRITERIA = ("sv", "energy")
FLOOR_MODES = ("reserve", "clip", "none")


def largest_within(n: int, fits: Callable[[int], bool]) -> int:
    """The largest ``t`` in ``[0, n]`` with ``fits(t)``, for ``fits`` true up to some point and
    false after it (a cost that is non-decreasing in ``t`` against a budget); ``fits(0)`` is
    assumed true (the caller checks the floor).  Bisection: ``O(log n)`` calls."""
    if fits(n):
        return n
    lo, hi = 0, n                      # invariant: fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


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


def _check_full_ranks(full_ranks) -> List[int]:
    if isinstance(full_ranks, (str, bytes)) or not isinstance(full_ranks, Sequence) or not full_ranks:
        raise TypeError(f"full_ranks must be a non-empty list of positive integers, got {full_ranks!r}")
    return [check_int(f"full_ranks[{i}]", r, low=1) for i, r in enumerate(full_ranks)]


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
    check_choice("criterion", criterion, CRITERIA)
    check_choice("floor_mode", floor_mode, FLOOR_MODES)
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
    ``min(min_rank, R_l)``; an all-zero layer keeps its floor.  ``energy`` in (0, 1].  The rule
    is :func:`admm_compress.functional.energy_rank` (the one ``LowRank(energy=...)`` and TRP use,
    computed in float64 here).  Cost :math:`O(N)`.  For a comparison at a matched size use
    ``global_rank_selection(..., criterion="energy")``.
    """
    svals = _check_svals(svals)
    energy = check_float("energy", energy, low=0.0, high=1.0, low_open=True)
    min_rank = check_int("min_rank", min_rank, low=1)
    return [int(energy_rank(torch.sort(s.to(torch.float64), descending=True).values, energy, min_rank))
            for s in svals]


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
    check_choice("criterion", criterion, CRITERIA)
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
    lo = largest_within(order_ids.numel(), lambda t: cost(ranks_from_order(floors, order_ids, t)) <= budget)
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
