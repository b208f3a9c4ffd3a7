r"""Decomposable-Net after training: one model, any size (Yaguchi et al., IJCAI 2021; papers/002).

Rank selection for a size (a rank ratio ``Z`` of all bases, or a MACs budget; Sec. 2.3 with the
``rank_rule`` floors), the per-layer ``LowRank(rank=r)`` specs that :func:`admm_compress.export`
builds compact stock layers from, and the BatchNorm statistics recomputed for that size
(footnote 1, :func:`recalibrate_bn`).  :class:`AnySizeExport` is the part of
:class:`~admm_compress.methods.DecomposableNetSolver` that runs after training (the training
side, Eq. 1 and Algorithm 1, is in :mod:`.solver`).

Size (~480 lines): one class, :class:`AnySizeExport`, whose parts (layer geometry and costs,
the three criteria under a ratio or a MACs budget, the floors' feasibility message, the specs,
the BatchNorm pass) all answer one question -- which ranks for this size -- and share its
per-layer singular values; the rules themselves are :mod:`admm_compress.ranks`'.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..._validation import check_float, check_int
from ...ranks import ranks_for_macs_budget, uniform_rank_selection
from ...sets import LowRank
from ...specs import Constrain, unwrap
from ...views import get_view
from ...training import recalibrate_bn  # noqa: F401  (re-exported: methods.recalibrate_bn)

__all__ = ["AnySizeExport", "DNLayer", "recalibrate_bn"]

log = logging.getLogger(__name__)

CRITERIA = ("global", "uniform", "energy")
SCHEMES = ("channel", "spatial")
RANK_RULES = ("official", "paper", "reserve")
_SV_CRITERION = {"global": "sv", "energy": "energy"}
_FLOOR_MODE = {"official": "clip", "paper": "none", "reserve": "reserve"}



class _AnyRank(LowRank):
    """Spec placeholder: Decomposable-Net constrains no rank during training (identity projection).

    The model stays full-rank; sizes are chosen at export (:meth:`DecomposableNetSolver.export_spec`
    and :meth:`DecomposableNetSolver.export`); ``ac.export(model, solver.spec)`` would return the
    dense model.
    """

    sized_at_export = True  # no break-even warning at prepare: the rank is chosen at export

    def __init__(self, label: str):
        super().__init__(ratio=1.0)
        self._label = label

    def __repr__(self):
        return f"AnyRank({self._label})"


class _RankZero(LowRank):
    """Rank 0 (the paper's removed layer) for :func:`admm_compress.export`: the projection is
    zero and the factors are a zero rank-1 pair, exported as stock layers whose output is the
    bias alone (``LowRank`` itself needs ``rank >= 1``)."""

    def __init__(self):
        super().__init__(rank=1)

    def _project(self, x, metric=None):
        return torch.zeros_like(x)

    def factorize(self, x, metric=None):
        x = self._check_input(x)
        return (x.new_zeros(*x.shape[:-1], 1), x.new_zeros(*x.shape[:-2], 1, x.shape[-1]))

    def _contains(self, x, atol, rtol):
        ok = bool((x.abs() <= atol).all())
        return ok, "" if ok else "rank 0: the weight must be zero"

    def __repr__(self):
        return "LowRank(rank=0)"


@dataclasses.dataclass(eq=False)
class DNLayer:
    r"""One decomposed layer: module, its Decomposable-Net view and rank bounds.

    Attributes
    ----------
    name : str
        Fully-qualified module name.
    module : nn.Module
        ``nn.Linear`` or ``nn.Conv2d`` (groups = 1).
    scheme : {"channel", "spatial"}
        Matrix view (``"channel"`` for linear layers and 1 x 1 convs).
    matrix_shape : (m, n)
        Shape of the weight's matrix in the library view :attr:`view` (``"channel"`` ``(O,
        I*kh*kw)``, ``"spatial"`` ``(O*kh, I*kw)``, ``"matrix"`` ``(O, I)`` for a linear layer):
        the transpose, up to row/column permutations, of the paper's matricization
        (:func:`~admm_compress.methods._decomposable_net.rank_selection.dn_matrix`), so its
        rank-``r`` truncations and singular values are the same.
    full_rank : int
        :math:`R_\ell = \min(m, n)`.
    floor : int
        Smallest rank allowed, ``min(min_rank, R_l)``.
    """

    name: str
    module: nn.Module
    scheme: str
    matrix_shape: tuple
    full_rank: int
    floor: int

    @property
    def key(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def view(self):
        """The :mod:`admm_compress.views` view the layer is truncated in (and exported from)."""
        return get_view("matrix" if isinstance(self.module, nn.Linear) else self.scheme)

    def params_at(self, rank: int) -> int:
        """Weight entries of the factorized layer at ``rank``: ``r (m + n)``."""
        m, n = self.matrix_shape
        return rank * (m + n)

    def dense_params(self) -> int:
        m, n = self.matrix_shape
        return m * n


class AnySizeExport:
    """Size selection and export of a trained Decomposable-Net model (mixed into the solver)."""

    # --------------------------------------------------------------------- sizes
    def _geometry(self, model: nn.Module, layers: Sequence[DNLayer], input_size) -> dict:
        """Input / output shapes of every decomposed layer on one ``(1, *input_size)`` input."""
        net = unwrap(model)
        shapes: dict = {}
        hooks = [L.module.register_forward_hook(
            lambda mod, inp, out, name=L.name: shapes.__setitem__(name, (tuple(inp[0].shape), tuple(out.shape))))
            for L in layers]
        p = next(net.parameters())
        modes = {m: m.training for m in net.modules()}
        net.eval()
        try:
            with torch.no_grad():
                net(torch.zeros((1, *input_size), dtype=p.dtype, device=p.device))
        finally:
            for h in hooks:
                h.remove()
            for m, t in modes.items():
                m.training = t
        missing = [L.name for L in layers if L.name not in shapes]
        if missing:
            raise ValueError(f"layers {missing} were not called in a forward pass with input_size="
                             f"{tuple(input_size)}; their MACs are unknown")
        return shapes

    @staticmethod
    def _macs_fns(L: DNLayer, shapes) -> tuple[int, Callable[[int], int]]:
        """``(dense MACs, rank -> factorized MACs)`` of the weight products of one layer.

        Linear: ``P I O`` vs ``P r (I + O)`` (``P`` output positions); channel conv:
        ``Ho Wo O I kh kw`` vs ``Ho Wo r (I kh kw + O)``; spatial conv: the ``1 x kw`` conv runs on
        every input row, ``r I kw H_in Wo + O r kh Ho Wo``.  Bias MACs are the same in both forms.
        """
        w = L.weight
        (in_shape, out_shape) = shapes[L.name]
        if isinstance(L.module, nn.Linear):
            O, I = w.shape
            P = math.prod(out_shape) // O
            return P * I * O, (lambda r: P * r * (I + O))
        O, I, kh, kw = w.shape
        Ho, Wo = out_shape[-2:]
        dense = Ho * Wo * O * I * kh * kw
        if L.scheme == "channel":
            return dense, (lambda r: Ho * Wo * r * (I * kh * kw + O))
        Hin = in_shape[-2]
        return dense, (lambda r: r * I * kw * Hin * Wo + O * r * kh * Ho * Wo)

    def _cost_fns(self, layers, shapes):
        """Per layer ``rank -> cost`` as exported: factorized while that is cheaper, else dense.

        Cost = MACs when ``shapes`` is known, else the number of weight entries.  Non-decreasing in
        the rank (the minimum of an increasing function and a constant).
        """
        fns = []
        for L in layers:
            if shapes is None:
                dense, fact = L.dense_params(), L.params_at
            else:
                dense, fact = self._macs_fns(L, shapes)
            fact0 = (lambda r, f=fact: f(max(r, 1)))  # rank 0 is exported as a zero rank-1 pair
            fns.append((dense, (lambda r, d=dense, f=fact0, R=L.full_rank: d if r >= R else min(f(r), d)),
                        fact0))
        return fns

    def select_ranks(self, model: nn.Module, rank_ratio: float | None = None, *, macs: float | None = None,
                     input_size: Sequence[int] | None = None, backend: str = "pytorch") -> dict[str, int]:
        r"""Per-layer ranks of ``model`` for a target size, by the solver's criterion (Sec. 2.3).

        Parameters
        ----------
        rank_ratio : float in (0, 1]
            :math:`Z`: keep ``round(Z * sum_l R_l)`` bases (drop :math:`d = (1-Z)\sum R_\ell`).
        macs : float
            Budget for the whole exported model (as counted by :func:`admm_compress.complexity`
            with ``backend``); the largest selection that fits
            (:func:`~admm_compress.methods._decomposable_net.rank_selection.ranks_for_macs_budget`;
            for ``"uniform"``, the
            largest common ratio that fits).  Needs ``input_size``.
        input_size : tuple of int
            Input shape without the batch dimension.

        Returns
        -------
        dict
            ``{layer name: rank}`` (full rank = the layer stays as it is).

        Raises
        ------
        ValueError
            A target below what the per-layer floors ``min(min_rank, R_l)`` allow (a MACs
            budget; a ``rank_ratio`` with ``rank_rule="reserve"`` -- the official rule raises the
            ranks to the floors instead, with a WARNING); the message names the layers, their
            floors and the smallest admissible target.
        """
        layers = self._layers_for(model)
        if (rank_ratio is None) == (macs is None):
            raise ValueError(f"give exactly one of rank_ratio= and macs=; got rank_ratio={rank_ratio!r}, "
                             f"macs={macs!r}")
        total = sum(L.full_rank for L in layers)
        floors = sum(L.floor for L in layers)
        if rank_ratio is not None:
            z = check_float("rank_ratio", rank_ratio, low=0.0, high=1.0, low_open=True, where="export")
            n_keep = int(round(z * total))
            if self.rank_rule == "reserve" and n_keep < floors:
                binding = ", ".join(f"'{L.name}': floor {L.floor} of R={L.full_rank}" for L in layers[:6])
                raise ValueError(
                    f"export: rank_ratio={z:g} keeps {n_keep} of the {total} bases, below the per-layer "
                    f"floors min(min_rank={self.min_rank}, R_l), which keep {floors} ({binding}"
                    f"{', ...' if len(layers) > 6 else ''}); the smallest admissible rank_ratio is "
                    f"{floors / total:.4f}")
            svals = [s[1] for s in self._svds(layers)]
            ranks = self._select(layers, svals, z)
            if sum(ranks) > n_keep:
                log.warning("export: rank_ratio=%g asks for %d of %d bases; the %r rule raises every layer to "
                            "its floor min(min_rank=%d, R_l) and keeps %d (ratio %.4f)", z, n_keep, total,
                            self.rank_rule, self.min_rank, sum(ranks), sum(ranks) / total)
            return {L.name: int(r) for L, r in zip(layers, ranks)}
        budget = check_float("macs", macs, low=0.0, low_open=True, where="export")
        if input_size is None:
            raise ValueError("export: macs= needs input_size= (the input shape without the batch "
                             "dimension) to count MACs")
        input_size = tuple(check_int(f"input_size[{i}]", d, low=1, where="export")
                           for i, d in enumerate(input_size))
        from ...complexity import complexity

        shapes = self._geometry(model, layers, input_size)
        fns = self._cost_fns(layers, shapes)
        dense_total = complexity(unwrap(model), input_size, backend=backend).macs
        fixed = dense_total - sum(d for d, _, _ in fns)
        if fixed < 0:
            log.warning("the %s backend counts fewer MACs (%d) than the decomposed layers' weight products "
                        "(%d); treating the rest of the model as free", backend, dense_total, dense_total - fixed)
            fixed = 0
        floor_costs = [(cost(L.floor), L) for (_, cost, _), L in zip(fns, layers)]
        floor_total = fixed + sum(c for c, _ in floor_costs)
        if floor_total > budget:
            worst = sorted(floor_costs, key=lambda t: -t[0])[:4]
            detail = ", ".join(f"'{L.name}' at rank {L.floor}: {c:,} MACs" for c, L in worst)
            raise ValueError(
                f"export: macs={budget:,.0f} is below the smallest size the per-layer floors "
                f"min(min_rank={self.min_rank}, R_l) allow: {floor_total:,} MACs ({fixed:,} in layers not "
                f"decomposed; largest floor costs: {detail}); the dense model has {dense_total:,} MACs")
        if self.criterion == "uniform":
            ranks = self._uniform_for_budget(layers, fns, fixed, budget)
        else:
            svals = [s[1] for s in self._svds(layers)]
            ranks = ranks_for_macs_budget(svals, lambda l, r: fns[l][1](r), budget,
                                          0 if self.rank_rule == "paper" else self.min_rank,
                                          criterion=_SV_CRITERION[self.criterion], fixed_macs=float(fixed))
        return {L.name: int(r) for L, r in zip(layers, ranks)}

    def _uniform_for_budget(self, layers, fns, fixed, budget) -> list[int]:
        full = [L.full_rank for L in layers]

        def cost(z):
            rk = uniform_rank_selection(full, z, self.min_rank)
            return fixed + sum(fns[i][1](r) for i, r in enumerate(rk)), rk

        if cost(1.0)[0] <= budget:
            return list(full)
        lo, hi = 0.0, 1.0               # cost(lo) <= budget (floors checked by the caller)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if cost(mid)[0] <= budget:
                lo = mid
            else:
                hi = mid
        return cost(lo)[1]

    def _check_ranks(self, layers, ranks: Mapping[str, int]) -> list[int]:
        if not isinstance(ranks, Mapping):
            raise TypeError(f"ranks must be a mapping {{layer name: rank}}, got {type(ranks).__name__}")
        by_name = {L.name: L for L in layers}
        unknown = [k for k in ranks if k not in by_name]
        if unknown:
            raise ValueError(f"ranks names layers that are not decomposed: {unknown}; decomposed layers: "
                             f"{list(by_name)[:8]}{' ...' if len(by_name) > 8 else ''}")
        out = []
        for L in layers:
            r = ranks.get(L.name, L.full_rank)
            r = check_int(f"ranks['{L.name}']", r, low=0 if self.rank_rule == "paper" else 1, where="export")
            if r < L.floor:
                raise ValueError(f"export: layer '{L.name}': rank={r} is below its floor "
                                 f"min(min_rank={self.min_rank}, R={L.full_rank}) = {L.floor}")
            if r > L.full_rank:
                raise ValueError(f"export: layer '{L.name}': rank={r} exceeds its full rank R={L.full_rank} "
                                 f"(view {L.scheme} {L.matrix_shape})")
            out.append(r)
        return out

    # ---------------------------------------------------------------------- export
    @torch.no_grad()
    def truncate(self, model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
        """A dense copy of ``model`` whose decomposed weights are their rank-``ranks[name]``
        truncations (the low-rank network of Eq. 1 at that size); ``model`` is unchanged."""
        layers = self._layers_for(model)
        rk = self._check_ranks(layers, ranks)
        out = copy.deepcopy(unwrap(model))
        mods = dict(out.named_modules())
        for L, r in zip(layers, rk):
            if r < L.full_rank:
                w = mods[L.name].weight
                w.copy_(self.low_rank_weight(L, w.detach(), r))
        return out

    # ------------------------------------------------------------- export specs
    def _view_of(self, L: DNLayer) -> str:
        """The name of ``L``'s library view (the one its training truncations use)."""
        return L.view.name

    def _specs(self, layers, ranks) -> list[Constrain]:
        specs = []
        for L, r in zip(layers, ranks):
            if r >= L.full_rank:
                continue
            glob = "".join(f"[{c}]" if c in "*?[" else c for c in L.name)
            specs.append(Constrain(glob, _RankZero() if r == 0 else LowRank(rank=int(r)), view=self._view_of(L),
                                   name=f"decomposable_net:{L.name}"))
        return specs

    def export_spec(self, rank_ratio: float | None = None, macs: float | None = None, *,
                    input_size: Sequence[int] | None = None, backend: str = "pytorch") -> list[Constrain]:
        r"""Per-layer ``Constrain(<layer name>, LowRank(rank=r_l), view=...)`` at one size.

        The ranks are :meth:`select_ranks` of the prepared model at ``rank_ratio`` or ``macs``
        (default: the configured ``export_ratio``); layers kept at full rank get no spec; rank 0
        (``rank_rule="paper"``) is ``LowRank(rank=0)``, a zero rank-1 pair at export.  Views:
        ``"channel"`` / ``"spatial"`` for convs, ``"matrix"`` for linear layers.

        ``ac.export(model, solver)`` builds the compact model from this (the configured size) and
        cannot recalibrate BatchNorm statistics, which Decomposable-Net computes per size
        (footnote 1): with BatchNorm in the model a WARNING says so; use
        ``solver.export(model, bn_loader=...)`` (or after :meth:`fit`, ``solver.export(model)``).
        """
        self._require_prepared()
        model = self._model_ref
        if rank_ratio is None and macs is None:
            rank_ratio = self.export_ratio
        sel = self.select_ranks(model, rank_ratio, macs=macs, input_size=input_size, backend=backend)
        if any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules()):
            log.warning("Decomposable-Net export_spec (ac.export(model, solver)): the model is exported "
                        "at %s without recalibrating its BatchNorm statistics for that size (paper "
                        "footnote 1); use solver.export(model, bn_loader=train_loader) instead",
                        f"rank_ratio={rank_ratio:g}" if rank_ratio is not None else f"macs={macs:g}")
        return self._specs(self.layers, [sel[L.name] for L in self.layers])


    @torch.no_grad()
    def export(self, model: nn.Module, rank_ratio: float | None = None, *, macs: float | None = None,
               ranks: Mapping[str, int] | None = None, input_size: Sequence[int] | None = None,
               bn_loader: Iterable | None = None, bn_batches: int | None = None,
               backend: str = "pytorch") -> nn.Module:
        r"""A compact copy of ``model`` at one size, without retraining (Sec. 2.3, Fig. 1(a)).

        Give at most one target: ``rank_ratio`` (fraction :math:`Z` of :math:`\sum_\ell R_\ell`
        bases kept), ``macs`` (budget for the whole model, needs ``input_size``) or ``ranks``
        (``{layer name: rank}``, missing layers keep full rank); none: the configured
        ``export_ratio``.  Ranks are chosen by the solver's criterion and rule
        (:meth:`select_ranks`).  The compact model is :func:`admm_compress.export` with the
        specs of :meth:`export_spec` at these ranks: every decomposed layer with ``r_l < R_l``
        becomes two stock layers (``U_r S_r^{1/2}``, ``S_r^{1/2} V_r^T``) when that is cheaper --
        in MACs when ``input_size`` is given, else in weight entries -- and otherwise stays one
        layer holding the truncated weight, so the output equals :meth:`truncate`'s before BN
        recalibration.  Then the BN statistics are recomputed for this size (footnote 1).

        Parameters
        ----------
        model : nn.Module
            The trained model (unchanged).
        bn_loader : iterable or False, optional
            Training batches for the BatchNorm statistics of this size (:func:`recalibrate_bn`).
            Default: the loader of the last :meth:`fit`; ``False`` keeps the full model's
            statistics.  Without either (a model with BatchNorm) a WARNING says the statistics
            were not recalibrated.
        bn_batches : int >= 1 or None
            ``None`` (default): the whole loader, "the whole training set" of footnote 1; an int
            bounds the cost to that many batches.
        backend : {"pytorch", "aten"}
            ptflops backend for ``macs``.

        Returns
        -------
        nn.Module
            The compact model (same device, dtype and train/eval mode as ``model``); the chosen
            ranks are in ``compact.decomposable_net_ranks``.

        Raises
        ------
        ValueError
            Bad target (also one below the per-layer floors, naming the layers), before any copy
            or recalibration.
        """
        from ...export import export as generic_export

        given = [k for k, v in (("rank_ratio", rank_ratio), ("macs", macs), ("ranks", ranks)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"export: give at most one of rank_ratio=, macs=, ranks=; got {given}")
        if not given:
            rank_ratio = self.export_ratio
        if bn_batches is not None:
            bn_batches = check_int("bn_batches", bn_batches, low=1, where="export")
        if input_size is not None:
            input_size = tuple(check_int(f"input_size[{i}]", d, low=1, where="export")
                               for i, d in enumerate(input_size))
        layers = self._layers_for(model)
        if ranks is not None:
            rk = self._check_ranks(layers, ranks)
        else:
            sel = self.select_ranks(model, rank_ratio, macs=macs, input_size=input_size, backend=backend)
            rk = [sel[L.name] for L in layers]
        shapes = self._geometry(model, layers, input_size) if input_size is not None else None
        costs = self._cost_fns(layers, shapes)
        # layers whose factor pair is not cheaper by this cost stay one layer (truncated weight)
        factored = [r < L.full_rank and fact(r) < dense for L, r, (dense, _, fact) in zip(layers, rk, costs)]
        src = unwrap(model)
        specs = self._specs([L for L, f in zip(layers, factored) if f], [r for r, f in zip(rk, factored) if f])
        out = generic_export(src, specs) if specs else copy.deepcopy(src)
        mods = dict(out.named_modules())
        for L, r, f in zip(layers, rk, factored):
            if r < L.full_rank and not f:
                log.info("layer '%s' at rank %d of %d stays one layer (factorized form not cheaper)",
                         L.name, r, L.full_rank)
                w = mods[L.name].weight
                w.copy_(self.low_rank_weight(L, w.detach(), r))
        out.decomposable_net_ranks = {L.name: int(r) for L, r in zip(layers, rk)}
        log.info("exported %d of %d decomposed layers as factor pairs; kept %d of %d bases",
                 sum(factored), len(layers), sum(rk), sum(L.full_rank for L in layers))
        if bn_loader is None:
            bn_loader = self._fit_loader
        has_bn = any(isinstance(m, _BatchNorm) and m.track_running_stats for m in out.modules())
        if bn_loader is False:
            pass
        elif bn_loader is not None:
            recalibrate_bn(out, bn_loader, bn_batches)
        elif has_bn:
            log.warning("Decomposable-Net export: BatchNorm statistics were not recalibrated for this size "
                        "(no bn_loader and no fit() loader); pass bn_loader=train_loader (footnote 1)")
        from ...attention import convert as _convert_attention  # fused attention reads weights

        _convert_attention(out, only_changed=True)
        return out
