"""RASPA: co-exploring low TT-rankness and sparsity (papers/003), as a configuration of the Solver.

Every targeted convolution weight is reparameterized as ``W = L + S``
(:class:`~admm_compress.structure.Additive`, a :mod:`torch.nn.utils.parametrize`
parametrization: the module tree is the original one) and the problem (Eq. 1-2)

.. math::

    \\min_{L, S} f(L + S) \\quad \\text{s.t.}\\quad \\mathrm{TT\\text{-}rank}(\\widetilde L) \\le
    (\\gamma_1, \\dots, \\gamma_d), \\qquad \\mathrm{card}(S) \\le \\kappa

is solved by the general ADMM of :class:`~admm_compress.Solver` with one auxiliary/dual pair per
component (keys ``<layer>.weight#L`` and ``<layer>.weight#S``):

* W-step (Eq. 4-6): SGD on ``f + rho/2 (||L - Z_L + U||^2 + ||S - Z_S + V||^2)``;
* Z-steps: ``Z_L = trunc_P(L + U)`` by TT-SVD of the Eq. 9 tensorization
  ``(kh*kw, o_1 i_1, ..., o_d i_d)`` (Eq. 8-10, :class:`~admm_compress.TTRank` on
  :class:`AutoTTView`), ``Z_S = proj_Q(S + V)`` keeping the ``kappa`` largest entries (Eq. 11-12,
  :class:`~admm_compress.Cardinality`);
* dual step (Eq. 13): ``U += L - Z_L``, ``V += S - Z_S``; ``rho`` adaptive per component
  (``"auto"``), constant or geometric (``rho_growth``) as in the general solver.

Initialization (Algorithm 1, line 1): ``init="decompose"`` splits the given (pre-trained) weight
by alternating projections (:meth:`Sum.decompose`): ``S`` = the sparse part, ``L = W - S``, so the
network function is unchanged; ``Z_L = trunc(L)``, ``Z_S = S``, ``U = V = 0``.
``init="scratch"``: ``L = W`` (e.g. a fresh initialization), ``S = 0``.

End (Algorithm 1, lines 11-12): :meth:`Solver.finalize` projects ``L`` onto the TT-rank set and
``S`` onto the cardinality set; :func:`admm_compress.export` builds, per layer,
``SumBranches(TTConv2d(cores of L), SparseConv2d(S))`` (:mod:`admm_compress.tt_layers`).
Fine-tuning (``fit(..., finetune_epochs=...)``) trains the TT cores and the non-zero entries of
``S`` only; afterwards the ``L + S`` split is kept so the export is exact.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import tt_layers  # noqa: F401  (registers the TTConv2d exporter and MAC counter)
from .._validation import check_choice, check_float, check_int
from ..sets import Cardinality, Sum, TTRank
from ..solver import Solver
from ..specs import Constrain
from ..structure import Additive, Factored, additive_components, unflatten_factors
from ..views import TTView, View, balanced_factors

__all__ = ["raspa", "RaspaSolver", "AutoTTView"]

log = logging.getLogger(__name__)


def _pre(where):
    return f"{where}: " if where else ""


class AutoTTView(View):
    """RASPA Eq. 9 tensorization whose channel factorizations are chosen per weight shape.

    One spec covers layers of different widths, so the fixed :class:`~admm_compress.views.TTView`
    is picked per shape ``(O, I, *k)`` by :meth:`for_shape`:

    * ``d`` (number of channel modes): as given; otherwise from the length ``m`` of a tuple of
      target ranks (the viewed tensor has ``m + 1`` modes: ``d = m`` for a ``kh x kw > 1``
      kernel, whose kernel mode comes first, ``d = m + 1`` for a 1x1 kernel); otherwise 2
      (RASPA Tables 8-11 use three-way tensors ``(1, r_1, r_2, 1)``).
    * factors: ``None`` -> :func:`~admm_compress.views.balanced_factors` of ``O`` and ``I``
      into ``d`` factors; a pair ``(out_factors, in_factors)`` for every layer; or a mapping
      ``{channels: factors}`` giving the factorization of each channel count.

    Parameters
    ----------
    d : int, optional
    factors : None, pair of tuples, or mapping int -> tuple
    n_ranks : int, optional
        Length of the target rank tuple (used when ``d`` is None).
    """

    name = "tt"

    def __init__(self, d: int | None = None, factors: Any = None, n_ranks: int | None = None):
        self.d = None if d is None else check_int("d", d, low=1, where="AutoTTView")
        self.n_ranks = None if n_ranks is None else check_int("n_ranks", n_ranks, low=1, where="AutoTTView")
        if factors is not None and not isinstance(factors, Mapping):
            if not (isinstance(factors, (tuple, list)) and len(factors) == 2
                    and all(isinstance(f, (tuple, list)) for f in factors)):
                raise TypeError(f"AutoTTView: factors must be None, a pair (out_factors, in_factors) "
                                f"of int tuples, or a mapping {{channels: factors}}, got {factors!r}")
            factors = (tuple(factors[0]), tuple(factors[1]))
        elif isinstance(factors, Mapping):
            factors = {check_int("factors key", k, low=1, where="AutoTTView"): tuple(v)
                       for k, v in factors.items()}
        self.factors = factors
        self._cache: dict[tuple, TTView] = {}

    def _d_for(self, shape) -> int:
        if self.d is not None:
            return self.d
        if self.n_ranks is not None:
            K = math.prod(shape[2:])
            return self.n_ranks if K > 1 else self.n_ranks + 1
        return 2

    def for_shape(self, shape: Sequence[int], where: str | None = None) -> TTView:
        """The :class:`TTView` for a weight of ``shape`` (raises naming ``where`` if impossible)."""
        shape = tuple(int(s) for s in shape)
        if shape in self._cache:
            return self._cache[shape]
        if len(shape) < 2:
            raise ValueError(f"{_pre(where)}TT view needs a weight (O, I, *k), got shape {shape}")
        O, I = shape[0], shape[1]
        d = self._d_for(shape)
        if self.factors is None:
            of, inf = balanced_factors(O, d), balanced_factors(I, d)
        elif isinstance(self.factors, tuple):
            of, inf = self.factors
        else:
            missing = [c for c in (O, I) if c not in self.factors]
            if missing:
                raise ValueError(f"{_pre(where)}factors has no factorization for {missing[0]} channels "
                                 f"(weight shape {shape}); given for {sorted(self.factors)}")
            of, inf = self.factors[O], self.factors[I]
        for nm, f, n in (("out", of, O), ("in", inf, I)):
            if math.prod(f) != n:
                raise ValueError(f"{_pre(where)}cannot factor the {n} {nm}put channels as {tuple(f)} "
                                 f"(product {math.prod(f)}; weight shape {shape})")
            if (self.d is not None or self.n_ranks is not None) and len(f) != d:
                raise ValueError(f"{_pre(where)}{nm}put factors {tuple(f)} have {len(f)} entries but the "
                                 f"tensorization of weight shape {shape} needs d={d}")
        view = TTView(of, inf)
        self._cache[shape] = view
        return view

    def check(self, shape, where=None):
        self.for_shape(shape, where).check(shape, where)

    def viewed_shape(self, shape):
        return self.for_shape(shape).viewed_shape(shape)

    def to(self, w):
        return self.for_shape(w.shape).to(w)

    def back(self, t, shape):
        return self.for_shape(shape).back(t, shape)

    def __repr__(self):
        return f"AutoTTView(d={self.d}, factors={self.factors})"


class _ScratchAdditive(Additive):
    """``W = L + S`` registered with ``L = W``, ``S = 0`` (training from scratch)."""

    def right_inverse(self, weight: torch.Tensor):
        w = weight.detach()
        return w.clone().contiguous(), torch.zeros_like(w, memory_format=torch.contiguous_format)


class _GivenAdditive(Additive):
    """``W = L + S`` registered with given components (restores the split after fine-tuning)."""

    def __init__(self, constraint, view, shape, L, S):
        super().__init__(constraint, view, shape)
        self._given = (L, S)

    def right_inverse(self, weight: torch.Tensor):
        L, S = self._given
        self._given = None
        return L.detach().clone().contiguous(), S.detach().clone().contiguous()


class RaspaSolver(Solver):
    """:class:`~admm_compress.Solver` in ADMM mode with RASPA's initialization and fine-tuning.

    Differences from the base solver: ``prepare`` registers ``W = L + S`` itself (``init``), and
    after fine-tuning the ``L + S`` components (TT cores, non-zero values) are kept as an
    :class:`Additive` parametrization so :func:`admm_compress.export` rebuilds them exactly.
    """

    def __init__(self, spec, *, init: str = "decompose", decompose_iters: int = 10, **kw):
        super().__init__(spec, mode="admm", **kw)
        self.init = check_choice("init", init, ("decompose", "scratch"), where="raspa")
        self.decompose_iters = check_int("decompose_iters", decompose_iters, low=1, where="raspa")

    def _make_slots(self, bindings):
        for b in bindings:
            if isinstance(b.constraint, Sum) and additive_components(b.module, b.param_name) is None:
                if parametrize.is_parametrized(b.module, b.param_name):
                    raise ValueError(f"layer '{b.name}': '{b.param_name}' is already parametrized; RASPA "
                                     f"needs to reparameterize it as L + S")
                cls = Additive if self.init == "decompose" else _ScratchAdditive
                parametrize.register_parametrization(
                    b.module, b.param_name, cls(b.constraint, b.view, b.shape, iters=self.decompose_iters),
                    unsafe=True)
        return super()._make_slots(bindings)

    # ------------------------------------------------------------- fine-tuning
    def components(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (L, S)}`` (weight-shaped, detached) of every bound weight, from the ``L + S``
        parametrization or from the fine-tuning factors."""
        self._require_prepared()
        out = {}
        for b in self.bindings:
            comps = additive_components(b.module, b.param_name)
            if comps is not None:
                out[b.key] = (comps[0].detach().clone(), comps[1].detach().clone())
                continue
            if not parametrize.is_parametrized(b.module, b.param_name):
                continue
            plist = b.module.parametrizations[b.param_name]
            fac = next((p for p in plist if isinstance(p, Factored)), None)
            if fac is None or not isinstance(fac.constraint, Sum):
                continue
            floats = [getattr(plist, f"original{i}") for i in range(len(fac._float_pos))]
            leaves = [None] * fac._n_leaves
            for pos, t in zip(fac._float_pos, floats):
                leaves[pos] = t
            for i in range(fac._n_leaves):
                if leaves[i] is None:
                    leaves[i] = getattr(fac, f"aux{i}")
            fa, fb = unflatten_factors(leaves, fac._spec)
            c = fac.constraint
            with torch.no_grad():
                L = fac.view.back(c.a.reconstruct(fa, fac.viewed_shape), fac.shape)
                S = fac.view.back(c.b.reconstruct(fb, fac.viewed_shape), fac.shape)
            out[b.key] = (L.detach().clone(), S.detach().clone())
        return out

    def _finetune(self, model, loader, loss_fn, dev, epochs, optimizer, lr, val_loader, history,
                  checkpoint, start_epoch, progress, callbacks):
        captured: dict = {}

        def grab(solver, m, rec):  # runs first after every fine-tuning epoch
            captured.clear()
            captured.update(self.components())
            return False

        super()._finetune(model, loader, loss_fn, dev, epochs, optimizer, lr, val_loader, history,
                          checkpoint, start_epoch, progress, (grab,) + tuple(callbacks))
        for b in self.bindings:  # keep the fine-tuned split (the base release leaves W = L + S dense)
            if b.key in captured and not parametrize.is_parametrized(b.module, b.param_name):
                L, S = captured[b.key]
                parametrize.register_parametrization(
                    b.module, b.param_name, _GivenAdditive(b.constraint, b.view, b.shape, L, S), unsafe=True)


def _check_ranks(tt_ranks):
    if isinstance(tt_ranks, numbers.Integral) and not isinstance(tt_ranks, bool):
        return check_int("tt_ranks", tt_ranks, low=1, where="raspa")
    if isinstance(tt_ranks, (tuple, list)) and len(tt_ranks) > 0:
        return tuple(check_int(f"tt_ranks[{i}]", r, low=1, where="raspa") for i, r in enumerate(tt_ranks))
    raise TypeError(f"raspa: tt_ranks must be a positive int or a non-empty tuple of positive ints "
                    f"(RASPA's gamma_1..gamma_d), got {tt_ranks!r}")


def raspa(tt_ranks=(10, 10), density: float = 0.1, rho: Any = "auto", rho_growth: float = 1.0,
          every: Any = "epoch", d: int | None = None, factors: Any = None, *, targets=nn.Conv2d,
          exclude=None, init: str = "decompose", rho_max: float | None = None, tol: float | None = None,
          decompose_iters: int = 10) -> RaspaSolver:
    """A :class:`RaspaSolver`: ADMM on ``W = L + S`` with low TT-rank ``L`` and sparse ``S``.

    Parameters
    ----------
    tt_ranks : int or tuple of int
        Target internal TT ranks ``(gamma_1, ..., gamma_m)`` of the tensorized ``L`` (RASPA
        Table 8 writes ``(1, 10, 10, 1)`` for ``(10, 10)``); one int for all.  A rank above
        what an unfolding allows is capped (:meth:`TTRank.rank_for`).
    density : float in (0, 1]
        Fraction of entries of ``S`` kept: ``kappa = round(density * numel)`` (RASPA's
        "sparsity 90%" is ``density=0.1``).
    rho : "auto", float > 0 or AdaptiveRho
        ADMM penalty ``lambda`` of Eq. 3; ``"auto"`` (default): the general solver's adaptive
        per-component penalty (:class:`~admm_compress.penalty.AdaptiveRho`).
    rho_growth, rho_max, every, tol :
        Schedule of the general :class:`~admm_compress.Solver`.
    d : int, optional
        Number of channel factors (cores besides the kernel core).  Default: from the length
        of ``tt_ranks`` (see :class:`AutoTTView`), else 2.
    factors : None, (out_factors, in_factors), or {channels: factors}
        Channel factorizations ``O = o_1...o_d``, ``I = i_1...i_d``; default balanced.
    targets : module type(s), glob or predicate
        Layers compressed (every ``nn.Conv2d`` by default).
    exclude : str or sequence of str, optional
        Globs of layer names left dense (e.g. the stem ``"conv1"``).
    init : {"decompose", "scratch"}
        ``"decompose"``: ``L, S`` from the given weight by alternating projections (Algorithm 1,
        line 1; ``decompose_iters`` alternations); ``"scratch"``: ``L = W``, ``S = 0``.

    Raises
    ------
    ValueError, TypeError
        Bad values (density 0 or > 1, non-positive ranks, ``tt_ranks`` longer than ``d``), at
        call time; shapes a layer cannot take (channels not factorable as asked, ranks longer
        than the layer's tensor order) at ``prepare`` (before any training), naming the layer.
    """
    ranks = _check_ranks(tt_ranks)
    dens = check_float("density", density, low=0.0, high=1.0, low_open=True, where="raspa")
    from ..penalty import AdaptiveRho

    if not (isinstance(rho, str) and rho == "auto") and not isinstance(rho, AdaptiveRho):
        rho = check_float("rho", rho, low=0.0, low_open=True, where="raspa")
    if d is not None:
        d = check_int("d", d, low=1, where="raspa")
        if isinstance(ranks, tuple) and len(ranks) > d:
            raise ValueError(f"raspa: tt_ranks={ranks} has {len(ranks)} entries but with d={d} channel "
                             f"factors the tensorized weight has at most d + 1 = {d + 1} modes, i.e. at most "
                             f"{d} internal ranks")
    view = AutoTTView(d=d, factors=factors, n_ranks=len(ranks) if isinstance(ranks, tuple) else None)
    constraint = Sum(TTRank(ranks), Cardinality(density=dens))
    spec = Constrain(targets, constraint, view=view, exclude=exclude, name="raspa")
    return RaspaSolver(spec, rho=rho, every=every, rho_growth=rho_growth, rho_max=rho_max, tol=tol,
                       init=init, decompose_iters=decompose_iters)
