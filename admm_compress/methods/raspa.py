"""RASPA: co-exploring low TT-rankness and sparsity (papers/003), as a configuration of the Solver.

Every targeted convolution weight is reparameterized as ``W = L + S``
(:class:`~admm_compress.parametrizations.Additive`, a :mod:`torch.nn.utils.parametrize`
parametrization: the module tree is the original one) and the problem (Eq. 1-2)

.. math::

    \\min_{L, S} f(L + S) \\quad \\text{s.t.}\\quad \\mathrm{TT\\text{-}rank}(\\widetilde L) \\le
    (\\gamma_1, \\dots, \\gamma_d), \\qquad \\mathrm{card}(S) \\le \\kappa

is solved by the general ADMM of :class:`~admm_compress.Solver` with one auxiliary/dual pair per
component (keys ``<layer>.weight#L`` and ``<layer>.weight#S``):

* W-step (Eq. 4-6): SGD on ``f + rho/2 (||L - Z_L + U||^2 + ||S - Z_S + V||^2)``;
* Z-steps: ``Z_L = trunc_P(L + U)`` by TT-SVD (Eq. 8-10, :class:`~admm_compress.TTRank`) of the
  tensorized weight: by default the ``"oki"`` layout ``(O, kh*kw, I)`` (:meth:`TTView.oki`, whose
  ranks ``(r_1, r_2)`` are Tables 8-9's and reproduce Table 1's ResNet compression), with
  ``layout="paired"`` Eq. 9's paired channel modes ``(o_1 i_1, kh*kw, o_2 i_2)``
  (:meth:`TTView.paired`, Table 10's DenseNet-40 ranks), or with ``layout="eq9"`` the literal
  Eq. 9 ``(kh*kw, o_1 i_1, ..., o_d i_d)`` (:class:`AutoTTView`);
  ``Z_S = proj_Q(S + V)`` keeping the ``kappa`` largest entries (Eq. 11-12,
  :class:`~admm_compress.Cardinality`);
* dual step (Eq. 13): ``U += L - Z_L``, ``V += S - Z_S``; ``rho`` adaptive per component
  (``"auto"``), constant or geometric (``rho_growth``) as in the general solver.

Initialization (Algorithm 1, line 1): ``init="decompose"`` splits the given (pre-trained) weight
by alternating projections (:meth:`Sum.decompose`): ``S`` = the sparse part, ``L = W - S``, so the
network function is unchanged; ``Z_L = trunc(L)``, ``Z_S = S``, ``U = V = 0``.
``init="scratch"``: ``L = W`` (e.g. a fresh initialization), ``S = 0``.

End (Algorithm 1, lines 11-12): :meth:`Solver.finalize` projects ``L`` onto the TT-rank set and
``S`` onto the cardinality set; :func:`admm_compress.export` builds, per layer,
``SumBranches(L chain, SparseConv2d(S))``, the L chain being three stock convolutions for the
``"oki"`` layout (:func:`~admm_compress.layers.tt.tt_oki_modules`), a
:class:`~admm_compress.layers.tt.TTPairedConv` for ``"paired"`` or a ``TTConv2d`` for ``"eq9"``.
How the ``S`` branch runs: ``SparseConv2d`` keeps its weight dense with a 0/1 mask; by default
(``kernel="dense"``) it runs a dense convolution, costing the dense layer's ``O I K`` MACs per
position whatever the density (ptflops counts it at its non-zeros, ``complexity(...,
backend="aten")`` at what runs), so ``L + S`` is then *slower* than the dense layer.
:func:`admm_compress.select_kernels` times each sparse branch with a ``torch.sparse_csr`` kernel
(im2col + CSR product, ``nnz`` MACs per position plus the unfold) and keeps the faster one
(eager CPU inference only; scripted/exported graphs run the dense kernel).  Measured on
ResNet-56 / VGG-16 at density 0.05: ``docs/results/tt_latency.md``; per layer, S alone costs
1.1-6.3x the dense convolution on ResNet-56's 16-64-channel shapes whatever the kernel
(``docs/results/raspa_sparse_branch.md``), so there ``L + S`` cannot beat dense.
:func:`admm_compress.layers.tt_realize.realize_tt` (``sum_dense=True``) puts each ``L + S`` layer
back as one dense convolution holding ``L + S`` where that is measured faster (counted at dense
MACs), and realizes each L chain in its fastest exact form.
In an engine with unstructured-sparse kernels the exported ONNX file (``S`` a plain ``Conv``
holding zeros) does run ``S`` at its non-zeros: measured in DeepSparse 1.8 (not a dependency;
``benchmarks/sparse_engine.py``, random weights at CIFAR shapes, one core, BatchNorm folded by
:func:`admm_compress.fold_batchnorm` first), ``L + S`` at -75 % MACs runs 1.36-1.66x faster than
the best dense engine on ResNet-56; at -50 % MACs it is faster at batch 32 (1.06-1.33x for ``S`` at
1-10 %) but not at batch 1 (0.82-1.01x), where each sparse branch costs about 11 us whatever its
density and the chains alone (``admm_tt``) at the same MACs run 1.54-1.56x
(``docs/results/sparse_engine_folded.md``, ``docs/results/sparse_engine_split_folded.md``).
Per-layer ranks/densities (Tables 8-10: :mod:`admm_compress.methods.raspa_tables`) and ranks from
a parameter or MAC budget (:func:`tt_ranks_for_budget`) or from a latency budget measured on the
deployment backend (:func:`admm_compress.methods.tt_latency_ranks.tt_ranks_for_latency`) are
supported.
Fine-tuning (``fit(..., finetune_epochs=...)``) trains the TT cores and the non-zero entries of
``S`` only; afterwards the ``L + S`` split is kept so the export is exact.

Size (~600 lines, a ninth of them this docstring): RASPA's whole configuration of the solver -- the
``L + S`` parametrization and its two initializations, per-layer ranks and densities, the TT
rank budget, the per-layer spec check -- read together against Algorithm 1 and Tables 8-10; the
tables themselves are in :mod:`admm_compress.methods.raspa_tables`, the layers in
:mod:`admm_compress.layers.tt`.
"""
from __future__ import annotations

import contextlib

import fnmatch
import logging
import math
import numbers
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layers import tt as tt_layers
from .._validation import check_choice, check_float, check_int
from ..sets import Cardinality, Sum, TTRank
from ..solver import Solver
from ..specs import Constrain, SpecError, exact_glob
from ..parametrizations import Additive, additive_components, factored
from ..ranks import largest_within
from ..views import TT_LAYOUTS, AutoTTView, tt_layout_view  # noqa: F401  (AutoTTView: re-exported)

__all__ = ["raspa", "RaspaSolver", "AutoTTView", "tt_ranks_for_budget"]

log = logging.getLogger(__name__)


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
        self._per_layer: _PerLayer | None = None

    def prepare(self, model: nn.Module) -> "RaspaSolver":
        """:meth:`Solver.prepare`, after expanding per-layer ranks/densities into one spec per layer.

        Logs a warning (with both numbers) for every layer whose TT + sparse form would cost more
        MACs per output position than its dense layer.
        """
        if self._per_layer is not None:
            self.spec = self._per_layer.expand(model)
        super().prepare(model)
        for row in self.layer_costs():
            if row["macs_pos"] > row["dense_macs_pos"]:
                log.warning("layer '%s' (%s, layout %s, TT ranks %s, %d kept entries of S): %d MACs per output "
                            "position, more than the dense layer's %d; lower its TT ranks or density (or leave "
                            "it dense with exclude=)", row["layer"], "x".join(map(str, row["shape"])),
                            row["layout"], row["ranks"], row["s_kept"], row["macs_pos"], row["dense_macs_pos"])
        return self

    def layer_costs(self) -> list[dict]:
        """Per bound layer: effective TT ranks, parameters and MACs per output position.

        Keys: ``layer``, ``shape``, ``layout``, ``ranks`` (effective, :meth:`TTRank.rank_for`),
        ``tt_params`` (values of the exported L branch), ``s_kept`` (``kappa``), ``params``
        (their sum), ``dense_params``, ``macs_pos`` (L branch + one MAC per kept entry of S, per
        output position; the L branch's first 1x1 map runs at the input resolution, counted as
        ``prod(stride)`` positions) and ``dense_macs_pos`` (``O I K``).  Biases are not counted.
        """
        self._require_prepared()
        rows = []
        for b in self.bindings:
            c = b.constraint
            tt, card = (c.sets if isinstance(c, Sum) else (c, None))
            shape = b.shape
            O, I, K = shape[0], shape[1], math.prod(shape[2:])
            vs = b.viewed_shape
            ranks = tt.rank_for(vs)
            tv = tt_layers.resolve_tt_view(b.view, shape)
            stride = math.prod(getattr(b.module, "stride", (1,)))
            padded = tt_layers._pads(b.module)
            tt_params, tt_macs = tt_layers.tt_layer_cost(tv, shape, ranks, in_positions=stride, padded=padded)
            kept = card.num_params(vs) if card is not None else 0
            rows.append(dict(layer=b.name, shape=shape, layout=getattr(tv, "layout", "eq9"), ranks=tuple(ranks),
                             tt_params=int(tt_params), s_kept=int(kept), params=int(tt_params + kept),
                             dense_params=O * I * K, macs_pos=int(tt_macs + kept), dense_macs_pos=O * I * K))
        return rows

    def describe(self) -> str:
        """Table of the bound layers: shape, layout, TT ranks, parameters and MACs per output position
        (L branch + S's kept entries vs dense; :meth:`layer_costs`)."""
        if not self.bindings:
            return "(not prepared)"
        head = ("layer", "shape", "layout", "ranks", "L params", "S kept", "params", "dense", "MACs/pos",
                "dense MACs/pos")
        rows = [head]
        tot = [0, 0, 0, 0]
        for r in self.layer_costs():
            rows.append((r["layer"], "x".join(map(str, r["shape"])), r["layout"], str(r["ranks"]),
                         str(r["tt_params"]), str(r["s_kept"]), str(r["params"]), str(r["dense_params"]),
                         str(r["macs_pos"]), str(r["dense_macs_pos"])))
            tot = [tot[0] + r["params"], tot[1] + r["dense_params"], tot[2] + r["macs_pos"],
                   tot[3] + r["dense_macs_pos"]]
        rows.append(("total", "", "", "", "", "", str(tot[0]), str(tot[1]), str(tot[2]), str(tot[3])))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def make_slots(self, bindings):
        for b in bindings:
            if isinstance(b.constraint, Sum) and additive_components(b.module, b.param_name) is None:
                if parametrize.is_parametrized(b.module, b.param_name):
                    raise ValueError(f"layer '{b.name}': '{b.param_name}' is already parametrized; RASPA "
                                     f"needs to reparameterize it as L + S")
                cls = Additive if self.init == "decompose" else _ScratchAdditive
                parametrize.register_parametrization(
                    b.module, b.param_name, cls(b.constraint, b.view, b.shape, iters=self.decompose_iters),
                    unsafe=True)
        return super().make_slots(bindings)

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
            found = factored(b.module, b.param_name)
            if found is None or not isinstance(found[0].constraint, Sum):
                continue
            fac, (fa, fb) = found
            c = fac.constraint
            with torch.no_grad():
                L = fac.view.back(c.a.reconstruct(fa, fac.viewed_shape), fac.shape)
                S = fac.view.back(c.b.reconstruct(fb, fac.viewed_shape), fac.shape)
            out[b.key] = (L.detach().clone(), S.detach().clone())
        return out

    @contextlib.contextmanager
    def finetune_structure(self, model: nn.Module):
        """Fine-tune the factors of both components, then keep the fine-tuned split: each weight
        stays parametrized as ``W = L + S`` with the trained ``L`` and ``S`` (the generic release
        would leave the dense sum), so :meth:`components` and the export see them."""
        with super().finetune_structure(model):
            captured: dict = {}
            try:
                yield
            finally:
                captured.update(self.components())  # read while the factors are still registered
        for b in self.bindings:
            if b.key in captured and not parametrize.is_parametrized(b.module, b.param_name):
                L, S = captured[b.key]
                parametrize.register_parametrization(
                    b.module, b.param_name, _GivenAdditive(b.constraint, b.view, b.shape, L, S), unsafe=True)


def _check_ranks(tt_ranks, name="tt_ranks"):
    if isinstance(tt_ranks, numbers.Integral) and not isinstance(tt_ranks, bool):
        return check_int(name, tt_ranks, low=1, where="raspa")
    if isinstance(tt_ranks, (tuple, list)) and len(tt_ranks) > 0:
        return tuple(check_int(f"{name}[{i}]", r, low=1, where="raspa") for i, r in enumerate(tt_ranks))
    raise TypeError(f"raspa: {name} must be a positive int or a non-empty tuple of positive ints "
                    f"(RASPA's gamma_1..gamma_d), got {tt_ranks!r}")


def _per_layer(value, name: str, check) -> dict | None:
    """``{glob: checked value}`` for a mapping argument (None for a single value)."""
    if not isinstance(value, Mapping):
        return None
    if not value:
        raise ValueError(f"raspa: {name}={{}} is empty; give {{glob: value, ...}} or a single value")
    out = {}
    for g, v in value.items():
        if not isinstance(g, str):
            raise TypeError(f"raspa: {name} keys must be glob strings of layer names, got {g!r}")
        out[g] = check(v, f"{name}[{g!r}]")
    return out


def _lookup(table: Mapping, layer: str, name: str):
    for g, v in table.items():
        if fnmatch.fnmatchcase(layer, g):
            return v
    raise SpecError(f"raspa: layer '{layer}' matches no glob of {name} ({list(table)}); add an entry "
                    f"for it (e.g. '*': default) or leave it out with exclude=")


class _PerLayer:
    """Per-layer ranks/densities of :func:`raspa`, expanded to one ``Constrain`` per layer at prepare."""

    def __init__(self, ranks, density, view_for, template: Constrain):
        self.ranks, self.density, self.view_for, self.template = ranks, density, view_for, template

    def expand(self, model: nn.Module) -> list[Constrain]:
        from ..specs import unwrap

        specs = []
        names = [n for n, _ in self.template.select(unwrap(model))]
        if not names:
            return [self.template]  # resolve() raises its "selects no layer" error
        for n in names:
            r = _lookup(self.ranks, n, "tt_ranks") if isinstance(self.ranks, dict) else self.ranks
            d = _lookup(self.density, n, "density") if isinstance(self.density, dict) else self.density
            exact = exact_glob(n)  # the name as a glob of itself
            specs.append(Constrain(exact, Sum(TTRank(r), Cardinality(density=d)), view=self.view_for(r),
                                   name=f"raspa:{n}"))
        return specs


def raspa(tt_ranks=(10, 10), density: float = 0.1, rho: Any = "auto", rho_growth: float = 1.0,
          every: Any = "epoch", d: int | None = None, factors: Any = None, *, targets=nn.Conv2d,
          exclude=None, init: str = "decompose", rho_max: float | None = None, tol: float | None = None,
          decompose_iters: int = 10, layout: str = "oki") -> RaspaSolver:
    """A :class:`RaspaSolver`: ADMM on ``W = L + S`` with low TT-rank ``L`` and sparse ``S``.

    Parameters
    ----------
    tt_ranks : int, tuple of int, or {glob: int or tuple}
        Target internal TT ranks of the tensorized ``L``: with ``layout="oki"`` the pair
        ``(r_1, r_2)`` of the ``(O, K, I)`` tensor (RASPA Tables 8-10 write ``(1, 10, 10, 1)``
        for ``(10, 10)``); one int for both.  A mapping gives per-layer values as the tables do
        (``{"layer1.*": (10, 10), "layer3.0.conv1": (20, 15), "*": 5}``: the first glob, in
        order, matching a layer's name applies; a targeted layer matched by none raises at
        ``prepare``).  A rank above what an unfolding allows is capped
        (:meth:`TTRank.rank_for`: ``r_1 <= min(O, K I)``, ``r_2 <= min(r_1 K, I)``).
        :mod:`admm_compress.methods._decomposable_net.rank_selection`-style budgets: :func:`tt_ranks_for_budget`.
    density : float in (0, 1], or {glob: float}
        Fraction of entries of ``S`` kept: ``kappa = round(density * numel)`` (RASPA's
        "sparsity 90%" is ``density=0.1``); per layer like ``tt_ranks``.
    rho : "auto", float > 0 or AdaptiveRho
        ADMM penalty ``lambda`` of Eq. 3; ``"auto"`` (default): the general solver's adaptive
        per-component penalty (:class:`~admm_compress.penalty.AdaptiveRho`).
    rho_growth, rho_max, every, tol :
        Schedule of the general :class:`~admm_compress.Solver`.
    layout : {"oki", "eq9", "paired"}
        TT tensorization (:mod:`admm_compress.views`).  ``"oki"`` (default): ``(O, kh*kw, I)``
        (:meth:`TTView.oki`), which reproduces RASPA Table 1's ResNet compression with Tables
        8-9's ranks and exports to three stock convolutions (DenseNet-40's Table 10 ranks belong
        to the paired channel modes, counted by
        :func:`~admm_compress.methods.raspa_tables.table1_count`).  ``"paired"``:
        ``(o_1 i_1, kh*kw, o_2 i_2)`` (:meth:`TTView.paired`), the tensor of Table 10's
        DenseNet-40 ranks: equal to ``"oki"`` on square layers, fewer parameters on narrow ones
        and more MACs (exported as :class:`~admm_compress.layers.tt.TTPairedConv`).  ``"eq9"``:
        the literal reading of Eq. 9,
        ``(kh*kw, o_1 i_1, ..., o_d i_d)`` (:class:`AutoTTView`, exported as
        :class:`~admm_compress.layers.tt.TTConv2d`).
    d : int, optional
        ``layout="eq9"`` only: number of channel factors (cores besides the kernel core).
        Default: from the length of ``tt_ranks`` (see :class:`AutoTTView`), else 2.
    factors : None, (out_factors, in_factors), or {channels: factors}
        ``layout="eq9"`` only: channel factorizations ``O = o_1...o_d``, ``I = i_1...i_d``;
        default balanced.
    targets : module type(s), glob or predicate
        Layers compressed (every ``nn.Conv2d`` by default).
    exclude : str or sequence of str, optional
        Globs of layer names left dense (e.g. the stem ``"conv1"``).
    init : {"decompose", "scratch"}
        ``"decompose"``: ``L, S`` from the given weight by alternating projections (Algorithm 1,
        line 1; ``decompose_iters`` alternations); ``"scratch"``: ``L = W``, ``S = 0``.

    Notes
    -----
    With per-layer mappings, ``solver.spec`` holds one template spec until ``prepare``, which
    replaces it by one ``Constrain`` per layer (``solver.describe()`` lists each layer's ranks,
    parameters and MACs).  At ``prepare`` a layer whose TT branch would cost more MACs than
    its dense layer is logged as a warning with both numbers.

    Raises
    ------
    ValueError, TypeError
        Bad values (density 0 or > 1, non-positive ranks, ``tt_ranks`` longer than ``d`` or, for
        ``layout="oki"`` or ``"paired"``, longer than 2; ``d``/``factors`` with them), at call time;
        shapes a layer cannot take (channels not factorable as asked, ranks longer than the
        layer's tensor order, layers the TT export cannot build) at ``prepare`` (before any
        training), naming the layer.
    """
    layout = check_choice("layout", layout, TT_LAYOUTS, where="raspa")
    rank_map = _per_layer(tt_ranks, "tt_ranks", _check_ranks)
    dens_map = _per_layer(density, "density", lambda v, nm: check_float(nm, v, low=0.0, high=1.0,
                                                                         low_open=True, where="raspa"))
    ranks = _check_ranks(tt_ranks) if rank_map is None else None
    dens = check_float("density", density, low=0.0, high=1.0, low_open=True, where="raspa") \
        if dens_map is None else None
    from ..penalty import AdaptiveRho

    if not (isinstance(rho, str) and rho == "auto") and not isinstance(rho, AdaptiveRho):
        rho = check_float("rho", rho, low=0.0, low_open=True, where="raspa")
    all_ranks = list(rank_map.values()) if rank_map is not None else [ranks]
    if layout in ("oki", "paired"):
        tensor = "(O, kh*kw, I)" if layout == "oki" else "(o1 i1, kh*kw, o2 i2)"
        if d is not None or factors is not None:
            raise ValueError(f"raspa: d={d!r} / factors={factors!r} choose channel factorizations of the "
                             f"'eq9' layout; layout={layout!r} tensorizes {tensor} and takes neither "
                             f"(pass layout='eq9' to use them)")
        for r in all_ranks:
            if isinstance(r, tuple) and len(r) > 2:
                raise ValueError(f"raspa: tt_ranks={r} has {len(r)} entries but layout={layout!r} views a weight "
                                 f"as the 3-way {tensor}, which has 2 internal TT ranks (r1, r2)")

        def view_for(r):
            return tt_layout_view(layout)
    else:
        if d is not None:
            d = check_int("d", d, low=1, where="raspa")
            for r in all_ranks:
                if isinstance(r, tuple) and len(r) > d:
                    raise ValueError(f"raspa: tt_ranks={r} has {len(r)} entries but with d={d} channel "
                                     f"factors the tensorized weight has at most d + 1 = {d + 1} modes, i.e. "
                                     f"at most {d} internal ranks")

        def view_for(r):
            return AutoTTView(d=d, factors=factors, n_ranks=len(r) if isinstance(r, tuple) else None)
    r0 = ranks if rank_map is None else next(iter(rank_map.values()))
    d0 = dens if dens_map is None else next(iter(dens_map.values()))
    constraint = Sum(TTRank(r0), Cardinality(density=d0))
    spec = Constrain(targets, constraint, view=view_for(r0), exclude=exclude, name="raspa",
                     skip_unexportable=targets is nn.Conv2d)
    solver = RaspaSolver(spec, rho=rho, every=every, rho_growth=rho_growth, rho_max=rho_max, tol=tol,
                         init=init, decompose_iters=decompose_iters)
    if rank_map is not None or dens_map is not None:
        solver._per_layer = _PerLayer(rank_map if rank_map is not None else ranks,
                                      dens_map if dens_map is not None else dens, view_for, spec)
    return solver


def tt_target_layers(model: nn.Module, targets, exclude, view, where: str) -> list:
    """``[(name, module)]`` of the Linear/Conv layers ``targets`` / ``exclude`` select, checked
    before any work: a layer the TT export cannot build (a grouped or depthwise convolution, ...)
    raises ``ValueError`` naming it, the reason and the fix."""
    from ..exportable import refusal
    from ..specs import Constrain as _C

    layers = [(n, m) for n, m in _C(targets, TTRank(1), view=view, exclude=exclude).select(model)
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError(f"{where}: targets={targets!r} selects no Linear/Conv layer of the model")
    bad = [(n, msg) for n, m in layers if (msg := refusal(m, "weight", TTRank(1), view))]
    if bad:
        listed = "; ".join(f"{n!r}: {msg}" for n, msg in bad[:3])
        listed += f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"{where}: {len(bad)} of the {len(layers)} selected layers have no TT export ({listed}); "
                         f"leave them out with exclude=[...] or targets=lambda name, m: ..., e.g. "
                         f"targets=lambda n, m: isinstance(m, nn.Conv2d) and m.groups == 1")
    return layers


def layer_io_shapes(model: nn.Module, layers, input_size) -> dict:
    """``{name: [(input shape, output shape), ...]}`` (without batch) of every call of each of
    ``layers`` (``[(name, module)]``) in one eval-mode forward pass of zeros of shape
    ``(1, *input_size)``; the model's training mode is restored."""
    shapes: dict = {}
    hooks = []

    def record(name):
        def hook(mod, inp, out):
            shapes.setdefault(name, []).append((tuple(inp[0].shape[1:]), tuple(out.shape[1:])))
        return hook

    for n, m in layers:
        hooks.append(m.register_forward_hook(record(n)))
    p0 = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *tuple(input_size), dtype=p0.dtype, device=p0.device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return shapes


def tt_unfolding_spectra(weight: torch.Tensor, view) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(K, s^(1), s^(2))``: the middle mode size of ``weight`` seen through the TT ``view``
    (``(a, K, c)``, e.g. ``(O, kh*kw, I)`` for :meth:`TTView.oki`) and the singular values of its
    unfoldings ``X_<1>`` (``a x K c``) and ``X_<2>`` (``a K x c``), divided by ``||W||_F`` (float64).
    Keeping ranks ``(r_1, r_2)`` loses at most ``sum_{i > r_1} s^(1)_i^2 + sum_{j > r_2} s^(2)_j^2``
    of the relative squared energy (TT-SVD, Oseledets 2011, Thm. 2.2)."""
    w = weight.detach().double()
    K = math.prod(w.shape[2:])
    x = view.to(w)  # (a, K, c): (O, K, I) for oki, the paired modes otherwise
    a, c = x.shape[0], x.shape[2]
    norm = float(w.norm()) or 1.0
    return K, torch.linalg.svdvals(x.reshape(a, K * c)) / norm, torch.linalg.svdvals(x.reshape(a * K, c)) / norm


def tt_ranks_for_budget(model: nn.Module, reduction: float, metric: str = "params", *, targets=nn.Conv2d,
                        exclude=None, density: float = 0.0, input_size: Sequence[int] | None = None,
                        layout: str = "oki") -> dict:
    """Per-layer ``"oki"`` (or ``"paired"``) TT ranks ``{layer: (r_1, r_2)}`` that meet a parameter
    or MAC budget.

    Global selection over the singular values of the TT unfoldings: every targeted weight ``W``
    is viewed as ``X = (O, kh*kw, I)`` (:meth:`TTView.oki`; ``(o_1 i_1, kh*kw, o_2 i_2)`` with
    ``layout="paired"``, :meth:`TTView.paired`, ``O`` and ``I`` below read as those mode sizes);
    its two unfoldings ``X_<1>``
    (``O x K I``) and ``X_<2>`` (``O K x I``) have singular values ``s^(1), s^(2)``, normalized
    by ``||W||_F`` so layers compete on relative energy.  One global threshold ``t`` gives
    ``r_1 = #{s^(1) > t}``, ``r_2 = min(#{s^(2) > t}, K r_1)`` (at least 1); the cost is monotone
    in ``t``, so a bisection over all the normalized singular values finds the smallest ``t``
    (largest ranks) whose model cost is within the budget.  The TT-SVD error of a layer is
    bounded by the discarded singular values of the two unfoldings (Oseledets 2011, Thm. 2.2),
    which is what a global threshold balances across layers.

    Parameters
    ----------
    model : nn.Module
        The (pre-trained) model; its current weights define the singular values.
    reduction : float in (0, 1)
        Target fraction of the *whole model's* parameters (``metric="params"``) or MACs
        (``metric="macs"``, ptflops count at ``input_size``) to remove; untargeted layers and
        everything else count as dense.
    metric : {"params", "macs"}
    targets, exclude :
        Layers to compress, as for :func:`raspa` (Conv1d/2d/3d and Linear weights).
    density : float in [0, 1)
        Density of the sparse branch ``S`` that will be used with these ranks (its kept entries
        count in the budget; 0 for a pure TT model such as ``admm_tt``).
    input_size : tuple of int
        Input shape without batch (needed for ``metric="macs"``).
    layout : {"oki", "paired"}
        The TT layout the ranks are for (costs: :func:`~admm_compress.layers.tt.tt_oki_cost` /
        :func:`~admm_compress.layers.tt.tt_paired_cost`); pass the same to :func:`raspa`.

    Returns
    -------
    dict
        ``{layer name: (r_1, r_2)}``, usable as ``raspa(tt_ranks=..., density=density, layout=layout)``.

    Raises
    ------
    ValueError
        Bad arguments, a selected layer the TT export cannot build (a grouped or depthwise
        convolution; before any work, see :func:`tt_target_layers`), or a budget that rank 1
        everywhere cannot meet (the message gives the largest achievable reduction).

    See Also
    --------
    admm_compress.methods.tt_latency_ranks.tt_ranks_for_latency : ranks for a budget of measured
        time on a backend (MACs do not predict a TT chain's CPU time; ONNX Runtime, for one,
        favours ranks that are multiples of 16).
    """
    from ..complexity import complexity
    from ..specs import unwrap

    red = check_float("reduction", reduction, low=0.0, high=1.0, low_open=True, high_open=True,
                      where="tt_ranks_for_budget")
    metric = check_choice("metric", metric, ("params", "macs"), where="tt_ranks_for_budget")
    dens = check_float("density", density, low=0.0, high=1.0, high_open=True, where="tt_ranks_for_budget")
    layout = check_choice("layout", layout, ("oki", "paired"), where="tt_ranks_for_budget")
    if metric == "macs" and input_size is None:
        raise ValueError("tt_ranks_for_budget: metric='macs' needs input_size (the input shape without batch)")
    model = unwrap(model)
    view = tt_layout_view(layout)
    layers = tt_target_layers(model, targets, exclude, view, "tt_ranks_for_budget")
    pos = {n: (1, 1) for n, _ in layers}
    if metric == "macs":  # positions per sample of each layer's input and output (its last call)
        for n, calls in layer_io_shapes(model, layers, input_size).items():
            pos[n] = (math.prod(calls[-1][0][1:]), math.prod(calls[-1][1][1:]))
        total = complexity(model, tuple(input_size)).macs
    else:
        total = sum(p.numel() for p in model.parameters())
    info = []
    fixed = total
    for n, m in layers:
        w = m.weight.detach()
        O, I = w.shape[0], w.shape[1]
        K, s1, s2 = tt_unfolding_spectra(w, view)
        pin, pout = pos[n]
        kept = round(dens * O * I * K)
        dense_cost = O * I * K * (pout if metric == "macs" else 1)
        fixed -= dense_cost
        padded = tt_layers._pads(m)
        info.append((n, tuple(w.shape), K, s1, s2, pin, pout, kept, padded))

    def ranks_at(t):
        out = {}
        for n, shape, K, s1, s2, *_ in info:
            r1 = max(1, int((s1 > t).sum()))
            r2 = max(1, min(int((s2 > t).sum()), K * r1))
            out[n] = (r1, r2)
        return out

    def cost(ranks):
        c = fixed
        for n, shape, K, s1, s2, pin, pout, kept, padded in info:
            p, mac = tt_layers.tt_layer_cost(view, shape, ranks[n], pin, pout, padded=padded)
            c += (mac + kept * pout) if metric == "macs" else (p + kept)
        return c

    budget = (1.0 - red) * total
    cands = torch.cat([torch.cat([i[3], i[4]]) for i in info]).unique().sort(descending=True).values.tolist()
    lo_rank = ranks_at(float("inf"))
    if cost(lo_rank) > budget:
        raise ValueError(f"tt_ranks_for_budget: reduction={red} of the model's {metric} is out of reach: TT ranks "
                         f"(1, 1) on every targeted layer (density={dens}) remove only "
                         f"{100 * (1 - cost(lo_rank) / total):.1f} %")
    # a threshold keeps the singular values strictly above it; +inf keeps none (ranks 1, fits), -1
    # keeps all; cost is non-decreasing as the threshold falls: the last one that fits
    thresholds = [float("inf")] + cands + [-1.0]
    best = ranks_at(thresholds[largest_within(len(thresholds) - 1,
                                              lambda t: cost(ranks_at(thresholds[t])) <= budget)])
    log.info("tt_ranks_for_budget: %s reduction %.1f %% (target %.1f %%)", metric,
             100 * (1 - cost(best) / total), 100 * red)
    return best
